"""The arithmetic of PPO, GRPO and RLOO for language models, as pure functions on tensors.

Shapes: B rows (responses), L response positions, right-padded; `mask` (B, L) is 1 on real response tokens
(up to and including the first EOS) and 0 on padding. Per-token functions return per-token tensors and leave
the reduction to the caller (masked_mean, or a weighted sum when torchrun splits a minibatch over ranks).

References: Schulman et al. 2017 (PPO, arXiv 1707.06347); Schulman et al. 2016 (GAE, arXiv 1506.02438);
Ziegler et al. 2019 / Stiennon et al. 2020 (per-token KL penalty); Huang et al. 2024, "The N+ Implementation
Details of RLHF with PPO" (arXiv 2403.17031); Schulman 2020, "Approximating KL divergence" (k1, k3);
Shao et al. 2024 (GRPO, arXiv 2402.03300); Liu et al. 2025 (Dr.GRPO, arXiv 2503.20783); Ahmadian et al. 2024
(RLOO, arXiv 2402.14740).
"""

import torch
from torch import Tensor


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Σ x·mask / Σ mask over `dim` (all elements if None). x, mask (B, L) -> scalar, or (B,) / (L,)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - μ)/√(σ² + eps) with μ, σ² over the real tokens only (padding must not set the scale), (B, L) -> (B, L).

    σ² is the unbiased (Bessel-corrected) variance, as in TRL's masked_whiten. shift_mean=False adds μ back:
    rescaled but not centred, the variant TRL and the N+ details use for *rewards* (a reward's sign, e.g. the
    no-EOS penalty, means something; an advantage's mean does not). Padding positions come back as 0."""
    mask_f = mask.to(x.dtype)
    n = mask_f.sum()
    mean = (x * mask_f).sum() / n
    var = (((x - mean) * mask_f) ** 2).sum() / (n - 1).clamp(min=1)
    white = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        white = white + mean
    return white * mask_f


def kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k1 = log π(a|s) - log π_ref(a|s) per sampled token, (B, L) -> (B, L).

    Unbiased for KL(π‖π_ref) when a ~ π (E_π[log π/π_ref] = KL), but single samples can be negative."""
    return logp - ref_logp


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k3 = (ρ - 1) - log ρ with ρ = π_ref(a|s)/π(a|s), per sampled token, (B, L) -> (B, L).

    Unbiased (E_π[ρ] = 1, so E_π[k3] = E_π[-log ρ] = KL(π‖π_ref)) and ≥ 0 for every sample (x - 1 ≥ log x),
    with lower variance than k1 when π ≈ π_ref (Schulman 2020). GRPO's KL term (DeepSeekMath eq. 4)."""
    log_rho = ref_logp - logp
    return torch.expm1(log_rho) - log_rho  # expm1: exact near ρ = 1, where (ρ - 1) would cancel


def kl_estimate(logp: Tensor, ref_logp: Tensor, estimator: str) -> Tensor:
    """k1 or k3 by name, (B, L) -> (B, L)."""
    if estimator == "k1":
        return kl_k1(logp, ref_logp)
    if estimator == "k3":
        return kl_k3(logp, ref_logp)
    raise ValueError(f"unknown KL estimator {estimator!r}: k1 or k3")


def last_token_mask(mask: Tensor) -> Tensor:
    """(B, L) right-padded response mask -> (B, L) one-hot at each row's last real token (all 0 for an empty row)."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = (positions * mask.long()).argmax(-1)  # the largest position whose mask is 1
    one_hot = torch.zeros_like(mask, dtype=torch.bool)
    one_hot[torch.arange(mask.shape[0], device=mask.device), last] = True
    return one_hot & mask.bool()


def per_token_rewards(scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """r_t = -β·KL_t on every real token, plus the sequence's score on its last real token (Ziegler et al.
    2019 eq. 2; Stiennon et al. 2020 eq. 1). scores (B,), kl (B, L), mask (B, L) -> rewards (B, L), 0 on padding.

    The score belongs to the last *real* token (the EOS, or the last token of a response cut by the length
    cap), never to a padding position: a score on padding would be discounted away from the tokens it judges."""
    mask_f = mask.to(kl.dtype)
    rewards = -kl_coef * kl * mask_f
    return rewards + last_token_mask(mask).to(kl.dtype) * scores[:, None].to(kl.dtype)


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16) over right-padded responses.

        δ_t = r_t + γ·V(s_{t+1}) - V(s_t),   A_t = δ_t + γλ·A_{t+1},   returns R_t = A_t + V(s_t)

    with V = 0 and A = 0 after the last real token (the episode ends at the EOS or the length cap).
    rewards, values, mask (B, L) -> (advantages (B, L), returns (B, L)), both 0 on padding. The loop runs over
    L (≤ a few hundred), each step vectorised over B."""
    mask_f = mask.to(values.dtype)
    rewards, values = rewards * mask_f, values * mask_f  # padding: no reward, no value -> δ = 0 there
    advantages = torch.zeros_like(values)
    next_value = next_advantage = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask_f[:, t]
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    return advantages, (advantages + values) * mask_f


def policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, clip: float) -> tuple[Tensor, Tensor, Tensor]:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7) as a loss, per token: (B, L) each ->

        loss_t = max(-A_t·ρ_t, -A_t·clip(ρ_t, 1-ε, 1+ε)),   ρ_t = exp(log π(a_t|s_t) - log π_old(a_t|s_t))

    and two per-token statistics: clipped_t (1.0 where the clipped term is the larger, i.e. the gradient is 0)
    and approx_kl_t = k3 of π_old vs π, (ρ - 1) - log ρ (≥ 0; its mean estimates KL(π_old‖π)). old_logp and
    advantages are treated as constants (detached)."""
    old_logp, advantages = old_logp.detach(), advantages.detach()
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip, 1 + clip)
    loss = torch.maximum(unclipped, clipped)
    with torch.no_grad():
        clipped_frac = (clipped > unclipped).to(logp.dtype)
        approx_kl = torch.expm1(log_ratio) - log_ratio
    return loss, clipped_frac, approx_kl


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, clip: float) -> tuple[Tensor, Tensor]:
    """Clipped value loss (the PPO baselines' and the N+ details' form), per token: (B, L) each ->

        loss_t = ½·max((V_t - R_t)², (clip(V_t, V_old,t - ε_v, V_old,t + ε_v) - R_t)²)

    and clipped_t (1.0 where the clipped term is the larger). old_values and returns are constants."""
    old_values, returns = old_values.detach(), returns.detach()
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    unclipped_loss, clipped_loss = (values - returns) ** 2, (clipped_values - returns) ** 2
    with torch.no_grad():
        clipped_frac = (clipped_loss > unclipped_loss).to(values.dtype)
    return 0.5 * torch.maximum(unclipped_loss, clipped_loss), clipped_frac


def group_advantages(scores: Tensor, scale_by_std: bool = True, eps: float = 1e-4) -> Tensor:
    """GRPO's outcome advantage (DeepSeekMath §4.1.2): scores (P, G), G samples per prompt -> (P, G)

        A_i = (r_i - mean(r_group)) / (std(r_group) + eps)

    std is the unbiased sample std (torch.std, as TRL). scale_by_std=False is Dr.GRPO's fix: dividing by the
    std weights prompts whose samples barely differ the most (a question-level difficulty bias)."""
    centred = scores - scores.mean(-1, keepdim=True)
    return centred / (scores.std(-1, keepdim=True) + eps) if scale_by_std else centred


def rloo_advantages(scores: Tensor) -> Tensor:
    """RLOO (Ahmadian et al. 2024, eq. 8): scores (P, G), G ≥ 2 -> (P, G), each sample's reward minus the mean
    of the *other* G-1 rewards of its prompt: A_i = r_i - (Σ_j r_j - r_i)/(G-1). The baseline does not depend
    on sample i, so the REINFORCE estimate stays unbiased."""
    G = scores.shape[-1]
    return scores - (scores.sum(-1, keepdim=True) - scores) / (G - 1)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) along the last axis, (..., V) -> (...): logsumexp(z) - Σ softmax(z)·z,
    computed in at least fp32 (bf16 logits lose the small probabilities)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return torch.logsumexp(logits, -1) - (logits.softmax(-1) * logits).sum(-1)
