"""PPO (and GRPO, RLOO) from a reward: sample, score, and push the policy toward what scores well.

    python train_ppo.py --model llama                # SmolLM2-135M-Instruct, VADER sentiment reward
    python train_ppo.py --model llama --algo grpo    # G samples per prompt, group-relative
    python train_ppo.py --model llama --reward pink  # -1 for mentioning the pink elephant, else 0
    python train_ppo.py --model llama --reward verify  # 1 for the right answer to a + b, else 0
    python train_ppo.py --resume out/train_ppo/RUN   # continue an interrupted run exactly
    torchrun --nproc_per_node 2 train_ppo.py -- --model llama   # DDP

RLHF with PPO as in Ziegler et al. 2019 and Stiennon et al. 2020, with the details of Huang et al.
2024 ("The N+ Implementation Details of RLHF with PPO", arXiv 2403.17031; N+ below). One step:

  rollout  --batch-size responses at --temperature (no top-k / top-p: the trainer would not see
           the truncated distribution, trl#417), each ending at its first EOS or the length cap.
  score    --reward vader (VADER compound), rm:PATH (a reward model), pink (-1 for a mention of
           what it was told to avoid) or verify (1 when the reply's last number is the problem's
           answer), on the last real token; --missing-eos-penalty if cut (N+).
  forward  π_old, V_old and π_ref with the *same* forwards as the update's: ratio 1 at first (N+).
  rewards  r_t = -β·KL_t + the score at the last token; GAE -> advantages, whitened over the batch.
  update   --ppo-epochs over shuffled minibatches, one AdamW step each: the clipped policy loss +
           --vf-coef · the clipped value loss.
--algo grpo (Shao et al. 2024): G = --group-size samples per prompt, the group-relative advantage
on every token, no critic, the KL as k3 in the loss. --algo rloo (Ahmadian et al. 2024): the mean of
the other G-1 rewards as baseline. Evaluation before and after training (and every --eval-every
steps): the held-out reward (and --gold's) ± SE and KL(π‖π₀); for verify the reward is T=1 pass@1,
and greedy accuracy is measured too (nanorlhf/tasks/policy_eval.py).
Shapes: B responses, L response positions (right-padded), V the vocabulary; `mask` (B, L) is 1 on
real response tokens (up to and including the first EOS). Outputs in RUN/: config.json,
metrics.jsonl, eval.json, training.svg, model/ (HF layout); RUN/state/ every --save-every steps.
"""

import copy
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from nanorlhf import distributed, lora
from nanorlhf.checkpoint import load_model, resolve_model, save_model
from nanorlhf.data import check_vocab
from nanorlhf.errors import NonFiniteLogits, UserError, run_cli
from nanorlhf.run import (Run, THREADS_HELP, check_finite, choose_threads, exit_interrupted, flag,
                          load_state, parse_config, read_results, resume_run, run_dir, save_state,
                          seed_everything)
from nanorlhf.model import autocast, device
from nanorlhf.sampling import (SAMPLERS, SAMPLER_HELP, Sampler, generate_batched, left_pad,
                               sample_responses)
from nanorlhf.svg import line_plots
from nanorlhf.tasks import pink, verify
from nanorlhf.tasks.policy_eval import (Scorer, evaluate_policy, prompt_rows, prompt_scorer,
                                        report)
from nanorlhf.tokenizer import Tokenizer


@dataclass
class Config:
    model: str = flag("llama", "checkpoint dir, HF cache id, or 'llama' (embedded SmolLM2-135M)")
    reward: str = flag("vader", "vader (VADER sentiment) | rm:PATH[@TEMPLATE] (a reward model) | "
                                "pink (-1 per pink mention) | verify (1 for a checked answer)")
    tasks: str = flag("add1", "verify: comma-separated problem families (tasks/verify.py)")
    prompts: str = flag(str(pink.DATA_DIR / "rest_prompts.jsonl"), "vader/rm: jsonl of {\"prompt\"}"
                        ", the last --eval-prompts held out (pink: data/pink_elephant_pairs.json)")
    gold: str = flag("", "also score the evaluations with this (vader | rm:PATH), e.g. the RM the "
                         "--reward proxy learned from (frontier.py); empty: none")
    out_dir: str = flag("out/train_ppo", "runs are written to OUT_DIR/RUN")
    run: str = flag("", "run name (empty: a timestamp)")
    resume: str = flag("", "RUN_DIR of an interrupted run: continue it with its own config")
    algo: str = flag("ppo", "ppo (critic + GAE) | grpo (group-relative, KL in the loss) | rloo "
                            "(leave-one-out)", choices=("ppo", "grpo", "rloo"))
    steps: int = flag(12, "rollout + update rounds (~1 min each on 2 cores, as set here)", min=1)
    batch_size: int = flag(16, "responses per step (prompts x --group-size), over all ranks", min=1)
    group_size: int = flag(1, "samples per prompt (grpo and rloo need >= 2)", min=1)
    minibatch_size: int = flag(8, "responses per optimizer step", min=1)
    ppo_epochs: int = flag(2, "passes over each batch of rollouts", min=1)
    max_new_tokens: int = flag(32, "response length cap", min=1)
    temperature: float = flag(1.0, "sampling temperature (the trainer's log-probs use it)", gt=0)
    missing_eos_penalty: float = flag(0.0, "added to the score of a response with no EOS", max=0)
    lr: float = flag(3e-5, "AdamW peak learning rate (policy and critic)", gt=0)
    weight_decay: float = flag(0.0, "AdamW weight decay", min=0)
    warmup_steps: int = flag(4, "optimizer steps of linear warmup, then linear decay to 0", min=0)
    grad_clip: float = flag(1.0, "max gradient norm", gt=0)
    kl_coef: float = flag(0.05, "β: weight of the KL to π_ref (in the reward; grpo: loss)", min=0)
    kl_estimator: str = flag("k1", "the KL in the reward: k1 = log π/π_ref | k3 = (ρ-1) - log ρ",
                             choices=("k1", "k3"))
    whiten_rewards: bool = flag(False, "ppo: rescale the per-token rewards to unit variance")
    gamma: float = flag(1.0, "GAE discount γ", min=0, max=1)
    lam: float = flag(0.95, "GAE λ", min=0, max=1)
    clip: float = flag(0.2, "PPO ratio clip ε", gt=0)
    value_clip: float = flag(0.2, "value clip ε_v", gt=0)
    vf_coef: float = flag(0.1, "weight of the value loss", min=0)
    critic: str = flag("shared", "separate (a backbone copy, N+) | shared (a head on the policy's "
                                 "detached features: half the compute)",
                       choices=("separate", "shared"))
    dr_grpo: bool = flag(False, "grpo: no std scaling, tokens summed over a constant (Dr.GRPO)")
    lora_rank: int = flag(0, "LoRA rank r: train adapters on --lora-targets only (0: all)", min=0)
    lora_alpha: float = flag(16.0, "LoRA α: the adapter update is scaled by α/r", gt=0)
    lora_targets: str = flag(",".join(lora.TARGETS), "comma-separated projections with adapters")
    grad_checkpointing: bool = flag(False, "recompute activations in backward: less memory")
    onednn: bool = flag(False, "CPU matmuls through oneDNN with packed weights: faster on AMD "
                               "CPUs, equal to MKL's up to rounding")
    eval_prompts: int = flag(24, "vader/rm: held-out prompts (the last rows of --prompts)", min=1)
    eval_n: int = flag(4, "samples per held-out prompt", min=1)
    eval_every: int = flag(0, "also evaluate every N steps (0 = before and after only)", min=0)
    gen_batch_size: int = flag(48, "sampling batch size (evaluation)", min=1)
    sampler: str = flag("batch", SAMPLER_HELP, choices=SAMPLERS)
    threads: int = flag(0, THREADS_HELP, min=0)
    save_every: int = flag(8, "write RUN/state every N steps (0 = never)", min=0)
    seed: int = flag(0, "seed for prompts, sampling, minibatch order and init")

    def check(self) -> None:
        """The rules between flags, before any work (parse_config calls this)."""
        lora.parse_targets(self.lora_targets)
        rm = lambda spec: spec.startswith("rm:") and len(spec) > 3  # a reward-model checkpoint
        if self.reward not in ("vader", "pink", "verify") and not rm(self.reward):
            raise UserError(f"--reward {self.reward!r}: choose vader, pink, verify or rm:PATH")
        if self.gold and self.gold != "vader" and not rm(self.gold):
            raise UserError(f"--gold {self.gold!r}: choose vader or rm:PATH")
        if self.algo in ("grpo", "rloo") and self.group_size < 2:
            raise UserError(f"--algo {self.algo} compares samples of one prompt: --group-size must "
                            "be >= 2")
        if self.batch_size % self.group_size:
            raise UserError(f"--batch-size {self.batch_size}: must be a multiple of --group-size "
                            f"{self.group_size}")
        if self.dr_grpo and self.algo != "grpo":
            raise UserError("--dr-grpo applies to --algo grpo only")


# --- the math: pure functions on (B, L) tensors; the caller reduces them (token weights) ---

def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Σ x·mask / Σ mask over `dim` (all if None). x, mask (B, L) -> scalar, or (B,) / (L,)."""
    mask = mask.to(x.dtype)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - μ)/√(σ² + eps), μ and σ² (unbiased, as TRL's) over the real tokens only, (B, L) ->
    (B, L), 0 on padding. shift_mean=False adds μ back: rescaled, not centred, as TRL and N+ do for
    *rewards* (a reward's sign, e.g. the no-EOS penalty's, means something; an advantage's not)."""
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

    Unbiased for KL(π‖π_ref) when a ~ π (E_π[log π/π_ref] = KL), but a sample can be negative."""
    return logp - ref_logp


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k3 = (ρ - 1) - log ρ with ρ = π_ref(a|s)/π(a|s), per sampled token, (B, L) -> (B, L).

    Unbiased (E_π[ρ] = 1, so E_π[k3] = E_π[-log ρ] = KL(π‖π_ref)) and ≥ 0 for every sample
    (x - 1 ≥ log x), with lower variance than k1 when π ≈ π_ref. GRPO's KL (DeepSeekMath eq. 4)."""
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
    """(B, L) -> (B, L) one-hot at each row's last real token (all 0 for an empty row)."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = (positions * mask.long()).argmax(-1)  # the largest position whose mask is 1
    one_hot = torch.zeros_like(mask, dtype=torch.bool)
    one_hot[torch.arange(mask.shape[0], device=mask.device), last] = True
    return one_hot & mask.bool()


def per_token_rewards(scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """r_t = -β·KL_t on every real token, plus the sequence's score on its last real token (Ziegler
    et al. 2019 eq. 2; Stiennon et al. 2020 eq. 1). scores (B,), kl, mask (B, L) -> (B, L).

    The score belongs to the last *real* token (the EOS, or the last token of a response cut by
    the cap), never to padding: there it would be discounted away from the tokens it judges."""
    mask_f = mask.to(kl.dtype)
    rewards = -kl_coef * kl * mask_f
    return rewards + last_token_mask(mask).to(kl.dtype) * scores[:, None].to(kl.dtype)


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
        ) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16) over right-padded responses:

        δ_t = r_t + γ·V(s_{t+1}) - V(s_t),   A_t = δ_t + γλ·A_{t+1},   returns R_t = A_t + V(s_t)

    with V = 0 and A = 0 after the last real token (the episode ends at the EOS or the cap).
    rewards, values, mask (B, L) -> (advantages, returns) (B, L) each, 0 on padding."""
    mask_f = mask.to(values.dtype)
    rewards, values = rewards * mask_f, values * mask_f  # padding: no reward, no value -> δ = 0
    advantages = torch.zeros_like(values)
    next_value = next_advantage = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):  # over L (a few hundred at most), vectorised over B
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask_f[:, t]
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    return advantages, (advantages + values) * mask_f


def policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, clip: float
                ) -> tuple[Tensor, Tensor, Tensor]:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7) as a loss per token, (B, L) each ->

        loss_t = max(-A_t·ρ_t, -A_t·clip(ρ_t, 1-ε, 1+ε)),   ρ_t = π(a_t|s_t) / π_old(a_t|s_t)

    and clipped_t (1.0 where the clipped term is the larger: gradient 0) and approx_kl_t = k3 of
    π_old vs π, (ρ - 1) - log ρ (its mean estimates KL(π_old‖π)). old_logp, advantages: constant."""
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


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, clip: float
               ) -> tuple[Tensor, Tensor]:
    """Clipped value loss (the PPO baselines' and N+'s form) per token, (B, L) each ->

        loss_t = ½·max((V_t - R_t)², (clip(V_t, V_old,t - ε_v, V_old,t + ε_v) - R_t)²)

    and clipped_t (1.0 where the clipped term is the larger). old_values, returns: constants.
    V is clamped into the band itself (as TRL): V_old + clamp(V - V_old, -ε_v, ε_v) can land an ulp
    from an unclipped V and count it as clipped."""
    old_values, returns = old_values.detach(), returns.detach()
    clipped_values = torch.clamp(values, old_values - clip, old_values + clip)
    unclipped_loss, clipped_loss = (values - returns) ** 2, (clipped_values - returns) ** 2
    with torch.no_grad():
        clipped_frac = (clipped_loss > unclipped_loss).to(values.dtype)
    return 0.5 * torch.maximum(unclipped_loss, clipped_loss), clipped_frac


def group_advantages(scores: Tensor, scale_by_std: bool = True, eps: float = 1e-4) -> Tensor:
    """GRPO's outcome advantage (DeepSeekMath §4.1.2): scores (P, G), G samples per prompt -> (P, G)

        A_i = (r_i - mean(r_group)) / (std(r_group) + eps)

    std is the unbiased sample std (torch.std, as TRL). scale_by_std=False is Dr.GRPO's fix: the
    std weights prompts whose samples barely differ the most (a question-level difficulty bias)."""
    centred = scores - scores.mean(-1, keepdim=True)
    return centred / (scores.std(-1, keepdim=True) + eps) if scale_by_std else centred


def rloo_advantages(scores: Tensor) -> Tensor:
    """RLOO (Ahmadian et al. 2024, eq. 8): scores (P, G), G ≥ 2 -> (P, G), each reward minus the
    mean of the *other* G-1 rewards of its prompt: A_i = r_i - (Σ_j r_j - r_i)/(G-1). The baseline
    does not depend on sample i, so the REINFORCE estimate stays unbiased."""
    G = scores.shape[-1]
    return scores - (scores.sum(-1, keepdim=True) - scores) / (G - 1)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) along the last axis, (..., V) -> (...): logsumexp(z) - Σ p·z,
    in at least fp32 (bf16 logits lose the small probabilities)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return torch.logsumexp(logits, -1) - (logits.softmax(-1) * logits).sum(-1)


# --- the networks: rows are left-padded prompts (P columns), then right-padded responses (L) ---

def rollout_batch(prompts: list[list[int]], responses: list[list[int]], pad_id: int
                  ) -> dict[str, Tensor]:
    """-> ids, attn (B, P+L), mask (B, L) on response tokens, and P. Response token j sits in
    column P+j and is predicted by column P+j-1: slices give (B, L) tensors aligned with it."""
    prompt_ids, prompt_attn = left_pad(prompts, pad_id)
    L = max(map(len, responses))
    resp = torch.full((len(responses), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(responses), L), dtype=torch.long)
    for i, r in enumerate(responses):
        resp[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
    return {"ids": torch.cat([prompt_ids, resp], 1), "attn": torch.cat([prompt_attn, mask], 1),
            "mask": mask, "P": prompt_ids.shape[1]}


def token_logps(lm: nn.Module, ids: Tensor, attn: Tensor, P: int, temperature: float
                ) -> tuple[Tensor, Tensor, Tensor]:
    """-> lm's log-probs (B, L) of the response tokens ids[:, P:], its logits (B, L, V) in fp32
    divided by the temperature the sampler used (N+: else π_old is not the sampling policy), and
    the hidden states (B, P+L, H). Logits only on the columns that predict the response (P-1 ..
    P+L-2): the lm_head's big matmul skips the prompt."""
    at = torch.zeros_like(ids, dtype=torch.bool)
    at[:, P - 1:-1] = True
    logits, hidden = lm(ids, attn, return_hidden=True, logits_at=at)  # (B·L, V), (B, P+L, H)
    logits = logits.view(ids.shape[0], -1, logits.shape[-1]).float() / temperature
    return logits.log_softmax(-1).gather(-1, ids[:, P:, None]).squeeze(-1), logits, hidden


class Critic(nn.Module):
    """V(s_t): a backbone (a copy of the policy's, N+; None: the policy's own) and a scalar head."""

    def __init__(self, backbone: nn.Module | None, hidden_size: int):
        super().__init__()
        self.model = copy.deepcopy(backbone) if backbone is not None else None
        self.head = nn.Linear(hidden_size, 1, bias=True)  # main() moves it to the device
        nn.init.zeros_(self.head.weight)  # V = 0 at first: no random values in the first advantages
        nn.init.zeros_(self.head.bias)


class ActorCritic(nn.Module):
    """The policy, its critic (None: grpo/rloo) and the one forward a training step makes (DDP hooks
    it): -> log π(a_t|s_t) at the sampling temperature (B, L), V(s_t) (B, L) or None, logits
    (B, L, V). π_old and the update's π both come from it (N+: the first ratio is exactly 1)."""

    def __init__(self, policy: nn.Module, critic: Critic | None):
        super().__init__()
        self.policy, self.critic = policy, critic

    def forward(self, ids: Tensor, attn: Tensor, P: int, temperature: float):
        logp, logits, hidden = token_logps(self.policy, ids, attn, P, temperature)
        if self.critic is None:
            return logp, None, logits
        # shared: the head reads the policy's features, detached, so the value loss trains the head
        # alone and cannot pull the policy where the reward does not (as a separate critic can't)
        h = hidden.detach() if self.critic.model is None else self.critic.model(ids, attn)
        return logp, self.critic.head(h[:, P - 1:-1]).squeeze(-1).float(), logits  # (B, L)


# --- the task: prompts and a reward ---

def make_task(cfg: Config, dev) -> tuple[list[dict], list[dict], dict[str, Scorer]]:
    """-> (train rows, held-out rows, {"reward": score, "gold": --gold's}), rows with `messages`."""
    gold = {"gold": prompt_scorer(cfg.gold, dev)} if cfg.gold else {}
    if cfg.reward == "verify":  # problems with one integer answer: 1.0 when the checker agrees
        return (*verify.chat_rows(cfg.tasks), {"reward": verify.score, **gold})
    if cfg.reward == "pink":  # the pink-elephant judge: -1 for a mention of what it must avoid
        train = pink.eval_rows_from_pairs(pink.load_pairs(), "train")
        held = pink.load_eval_rows(pink.HELDOUT_PATH)
        judge = lambda rows, texts: [-float(pink.judge(t, r)["pink"]) for r, t in zip(rows, texts)]
        chats = lambda rows: [{**r, "messages": pink.avoid_messages(r)} for r in rows]
        return chats(train), chats(held), {"reward": judge, **gold}
    train, held = prompt_rows(cfg.prompts, cfg.eval_prompts)  # the last --eval-prompts held out
    return train, held, {"reward": prompt_scorer(cfg.reward, dev), **gold}


def step_rows(pool: list[dict], step: int, n: int, seed: int) -> list[dict]:
    """Step `step`'s n prompts: consecutive rows of the pool, reshuffled on every pass (seeded by
    the pass), so a step's prompts follow from its number alone (a resume needs nothing else)."""
    out = []
    for i in range(step * n, (step + 1) * n):
        order = list(range(len(pool)))
        random.Random(f"{seed}:pass{i // len(pool)}").shuffle(order)
        out.append(pool[order[i % len(pool)]])
    return out


def minibatches(B: int, size: int, seed: str) -> list[list[int]]:
    order = list(range(B))
    random.Random(seed).shuffle(order)
    return [order[i:i + size] for i in range(0, B, size)]


# --- one step: rollout, score, forward, advantages, update ---

@torch.no_grad()
def rollout(cfg: Config, policy, tok: Tokenizer, rows: list[dict], score: Scorer, seed: int, dev,
            sampler: Sampler) -> dict:
    """Sample --group-size responses per row and score them -> the batch, scores (B,), logs."""
    prompts, responses, texts = sample_responses(
        policy, tok, [r["messages"] for r in rows], cfg.group_size, cfg.temperature, seed,
        cfg.max_new_tokens, len(rows) * cfg.group_size, desc="rollout", sampler=sampler)
    ended = torch.tensor([r[-1] in tok.stop_ids for r in responses], dtype=torch.float32)
    raw = torch.tensor(score([r for r in rows for _ in range(cfg.group_size)], texts),
                       dtype=torch.float32)
    scores = raw + cfg.missing_eos_penalty * (1 - ended)  # N+: a response cut by the cap pays
    batch = rollout_batch(prompts, responses, tok.pad_id)
    batch = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in batch.items()}
    return {**batch, "scores": scores.to(dev), "raw_scores": raw, "ended": ended, "texts": texts}


@torch.no_grad()
def old_forward(cfg: Config, ac: ActorCritic, ref: nn.Module, batch: dict, parts: list[list[int]]
                ) -> dict[str, Tensor]:
    """π_old, V_old, π_ref on every response token, (B, L) each, minibatch by minibatch in the first
    epoch's order and on this rank's shard of each: the exact forwards the first update repeats
    with grad, so its ratio is 1 to the last bit. A sum over ranks assembles the batch."""
    B, L = batch["mask"].shape
    out = {k: torch.zeros(B, L, device=batch["ids"].device) for k in ("logp", "values", "ref_logp")}
    for part in parts:
        rows, real = distributed.shard(part)
        if not real:
            continue
        ids, attn, P = batch["ids"][rows], batch["attn"][rows], batch["P"]
        with autocast(ids.device):  # π_ref: the same arithmetic as the policy's in ActorCritic
            logp, values, _ = ac(ids, attn, P, cfg.temperature)
            out["ref_logp"][rows] = token_logps(ref, ids, attn, P, cfg.temperature)[0]
        out["logp"][rows] = logp
        if values is not None:
            out["values"][rows] = values
    return {k: distributed.all_reduce_sum(v) for k, v in out.items()}


def advantages_of(cfg: Config, batch: dict, old: dict) -> tuple[Tensor, Tensor | None, dict]:
    """-> advantages (B, L), returns (B, L) (ppo) and statistics. Identical on every rank."""
    mask, scores = batch["mask"], batch["scores"]
    kl = kl_estimate(old["logp"], old["ref_logp"], cfg.kl_estimator) * mask  # (B, L)
    stats = {"kl": (kl.sum(-1)).mean().item()}  # per response, summed over its tokens
    if cfg.algo == "ppo":
        rewards = per_token_rewards(scores, kl, mask, cfg.kl_coef)
        if cfg.whiten_rewards:  # N+, TRL: a scale for the rewards, the mean (a penalty's sign) kept
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = gae(rewards, old["values"], mask, cfg.gamma, cfg.lam)
        stats.update(value=masked_mean(old["values"], mask).item(),
                     returns=masked_mean(returns, mask).item())
        return masked_whiten(advantages, mask), returns, stats  # N+: whitened over the batch
    groups = scores.view(-1, cfg.group_size)  # (prompts, G): a prompt's samples are contiguous
    if cfg.algo == "rloo":  # the KL goes into the whole sequence's reward, k1 summed (Ahmadian)
        groups = groups - cfg.kl_coef * kl.sum(-1).view(-1, cfg.group_size)
        adv = rloo_advantages(groups)
    else:
        adv = group_advantages(groups, scale_by_std=not cfg.dr_grpo)
    return adv.reshape(-1, 1) * mask, None, stats  # the sequence's advantage on each of its tokens


def token_weights(cfg: Config, mask: Tensor) -> Tensor:
    """(b, L) -> the weight of each token in the minibatch's loss (Σ over the minibatch = one mean).

    ppo, rloo: a mean over all real tokens. grpo: a mean over each sequence's tokens, then over
    sequences (DeepSeekMath eq. 3); Dr.GRPO: every token weighs 1/(b · max_new_tokens), so long
    answers are not down-weighted per token."""
    mask = mask.float()
    if cfg.algo == "grpo" and cfg.dr_grpo:
        return mask / (mask.shape[0] * cfg.max_new_tokens)
    if cfg.algo == "grpo":
        return mask / (mask.sum(-1, keepdim=True).clamp(min=1) * mask.shape[0])
    return mask / mask.sum().clamp(min=1)


def update(cfg: Config, net: nn.Module, optimizer, batch: dict, old: dict, advantages: Tensor,
           returns: Tensor | None, epochs: list, update_index: int, total_updates: int) -> dict:
    """--ppo-epochs of minibatch steps -> the means of their statistics. Every rank takes the same
    minibatches and trains on its shard of each; token weights make a loss the minibatch's mean."""
    logs: dict[str, list[float]] = {}
    first, params = update_index, optimizer.param_groups[0]["params"]
    for part in (part for parts in epochs for part in parts):
        # linear warmup over --warmup-steps, then linear decay to 0 (nanoGPT's get_lr, no cosine)
        i, warmup = update_index, cfg.warmup_steps
        lr = cfg.lr * ((i + 1) / warmup if i < warmup
                       else max(0.0, (total_updates - i) / max(1, total_updates - warmup)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        weights = token_weights(cfg, batch["mask"][part])  # over the whole minibatch
        rows, real = distributed.shard(part)
        # DDP averages the ranks' gradients: times world_size, the sum is the minibatch's mean
        w = weights[[part.index(r) for r in rows]] * (real * distributed.world_size())
        ids, attn, mask = batch["ids"][rows], batch["attn"][rows], batch["mask"][rows]
        with autocast(ids.device):
            logp, values, logits = net(ids, attn, batch["P"], cfg.temperature)
        pg, clipped, approx_kl = policy_loss(logp, old["logp"][rows], advantages[rows], cfg.clip)
        loss, named = pg, {"loss/policy": pg, "clipfrac": clipped, "approx_kl": approx_kl,
                           "ratio": torch.exp(logp - old["logp"][rows]).detach(),
                           "entropy": entropy_from_logits(logits.detach())}
        if cfg.algo == "grpo":  # GRPO's KL is in the loss: k3 of the current π vs π_ref (eq. 3)
            kl = kl_k3(logp, old["ref_logp"][rows])
            loss, named["loss/kl"] = loss + cfg.kl_coef * kl, kl.detach()
        if values is not None:
            vf, vf_clip = value_loss(values, old["values"][rows], returns[rows], cfg.value_clip)
            loss, named["loss/value"], named["vf_clipfrac"] = loss + cfg.vf_coef * vf, vf, vf_clip
        if update_index == first:  # N+: π_old came from this very forward, so ρ = 1 exactly
            named["ratio_dev_first"] = (named["ratio"] - 1).abs().amax().expand_as(mask)
        (loss * w).sum().backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))  # before clipping
        # a NaN or inf stops the run here, before the weights step on it: the last state stays
        check_finite(update_index + 1, "lower --lr (steps count updates)", grad_norm=grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        update_index += 1
        # minibatch means of each statistic over its real tokens, summed over ranks in float64
        sums = [float((v.detach() * mask).sum()) for v in named.values()] + [float(mask.sum())]
        sums = distributed.all_reduce_sum(torch.tensor(sums, dtype=torch.float64) * real)
        for k, v in zip(named, (sums[:-1] / sums[-1]).tolist()):
            logs.setdefault(k, []).append(v)
        logs.setdefault("grad_norm", []).append(grad_norm)
        logs.setdefault("lr", []).append(lr)
    return {k: sum(v) / len(v) for k, v in logs.items()}


# --- the run ---

def trainable_tensors(ac: ActorCritic) -> dict[str, Tensor]:
    """What trains: with LoRA the adapters and the head; a tied lm_head is the embedding (once)."""
    return {k: p for k, p in ac.named_parameters() if p.requires_grad}


def train(cfg: Config, net: nn.Module, ac: ActorCritic, ref: nn.Module, optimizer, sampler: Sampler,
          tok: Tokenizer, pool: list[dict], score: Scorer, run: Run, start: int,
          history: list[dict], evaluate_at: Callable[[int], None]) -> list[dict]:
    """Steps start .. --steps; the update trains through `net` (DDP's wrapper, or `ac` itself)."""
    dev = next(ac.parameters()).device
    per_step = cfg.ppo_epochs * math.ceil(cfg.batch_size / cfg.minibatch_size)
    bar = distributed.bar(total=cfg.steps, initial=start, desc=cfg.algo.upper(), unit="step")
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        # every seed follows from (--seed, step): a resumed run draws what the uninterrupted one did
        rows = step_rows(pool, step, cfg.batch_size // cfg.group_size, cfg.seed)
        seed = cfg.seed * 100_003 + step
        batch = rollout(cfg, ac.policy.eval(), tok, rows, score, seed, dev, sampler)
        t1 = time.perf_counter()
        # each epoch's minibatches; the first epoch's also orders the no-grad forwards
        epochs = [minibatches(cfg.batch_size, cfg.minibatch_size, f"{cfg.seed}:{step}:{e}")
                  for e in range(cfg.ppo_epochs)]
        old = old_forward(cfg, ac, ref, batch, epochs[0])
        advantages, returns, stats = advantages_of(cfg, batch, old)
        ac.train()  # no dropout in the model: train() changes nothing numerically (N+)
        stats.update(update(cfg, net, optimizer, batch, old, advantages, returns, epochs,
                            step * per_step, cfg.steps * per_step))
        ac.eval()
        # log the step: raw scores (without the EOS penalty), lengths, the update's statistics
        raw, lengths = batch["raw_scores"], batch["mask"].sum(-1).float()
        metrics = {"step": step + 1, "score": raw.mean().item(),
                   "score_std": raw.std().item() if cfg.batch_size > 1 else 0.0,
                   "eos_rate": batch["ended"].mean().item(),
                   "response_tokens": lengths.mean().item(),
                   **stats, "rollout_s": t1 - t0, "train_s": time.perf_counter() - t1}
        run.log(**metrics)
        history.append(metrics)
        bar.set_postfix(score=f"{metrics['score']:+.3f}", kl=f"{metrics['kl']:.3f}",
                        clip=f"{metrics['clipfrac']:.2f}")
        bar.update()
        done = step + 1  # rank 0 evaluates before it saves: a resume from here never repeats it
        if distributed.is_main() and done < cfg.steps:
            if cfg.eval_every and done % cfg.eval_every == 0:
                evaluate_at(done)
            if cfg.save_every and done % cfg.save_every == 0:
                save_state(run.dir, done, trainable_tensors(ac), optimizer)
    bar.close()
    return history


def prepare(cfg: Config, net: nn.Module, seed: int | str) -> None:
    """LoRA (rank 0: none), gradient checkpointing, oneDNN matmuls, as the flags say. In place."""
    lora.adapt(net, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, seed)
    net.model.grad_checkpointing = cfg.grad_checkpointing  # the Backbone of the LM or the critic
    if cfg.onednn:  # the optional speed layer, imported only where its flag is read
        from nanorlhf.fast.packed import pack_linears
        pack_linears(net)  # after LoRA: adapted projections keep their own forward


def main() -> None:
    cfg, start, history = parse_config(Config, __doc__), 0, []  # every flag checked before any work
    if cfg.resume:  # the interrupted run's own config, and its metrics up to the saved state
        cfg, start, history = resume_run(Config, cfg.resume, "train_ppo")
    else:
        run_dir(cfg.out_dir, cfg.run)  # refuse a used --run now, not after the model has loaded
    threads = choose_threads(cfg.threads)
    distributed.init()  # torchrun: every rank samples and scores alike; updates are sharded
    sampler = generate_batched
    if cfg.sampler == "stream":  # continuous batching, the optional fast layer
        from nanorlhf.fast.decode import generate_streamed as sampler
    seed_everything(cfg.seed)
    began, dev = time.perf_counter(), device()
    pool, held_out, scorers = make_task(cfg, dev)  # every input validated before any work
    model_dir = resolve_model(cfg.model)
    tok, policy = Tokenizer(model_dir), load_model(model_dir, device=dev).eval()
    # every tokenizer id needs an embedding: one line now, not an IndexError after the run dir
    check_vocab([tok.tok.get_vocab_size() - 1], policy.cfg.vocab_size,
                str(model_dir / "tokenizer.json"))
    backbone = policy.model if cfg.critic == "separate" else None
    critic = Critic(backbone, policy.cfg.hidden_size).to(dev) if cfg.algo == "ppo" else None
    prepare(cfg, policy, cfg.seed)
    if critic is not None and critic.model is not None:  # the separate critic's own backbone
        prepare(cfg, critic, f"{cfg.seed}:critic")
        critic.head.requires_grad_(True)  # LoRA froze it, but the head is new: it trains whole
    ac = ActorCritic(policy, critic)
    if cfg.lora_rank:  # π_ref = π₀ is the base network itself: the adapters off, no second copy
        ref = lora.BaseView(policy)
    else:  # π_ref = π₀, a frozen copy
        ref = load_model(model_dir, device=dev).eval().requires_grad_(False)
    net = distributed.wrap(ac)  # DDP under torchrun (every rank samples the same rollouts)
    params = [p for p in ac.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    run = Run("train_ppo", cfg.out_dir, cfg.run, cfg, resume=bool(cfg.resume))
    distributed.print0(
        f"{cfg.algo}: {cfg.steps} steps x {cfg.batch_size} responses ({cfg.group_size} per "
        f"prompt), reward {cfg.reward}, {len(pool)} train prompts, {len(held_out)} held out x "
        f"{cfg.eval_n}; {sum(p.numel() for p in params):,} trainable parameters; torch threads: "
        f"{threads}" + (f"; resuming {cfg.resume} after step {start}" if cfg.resume else ""))

    results = read_results(run.dir) if cfg.resume else {}  # a resume keeps its evaluations

    def evaluate_at(step: int, name: str = "") -> None:  # rank 0: the others wait at a collective
        results.setdefault("steps", {})[str(step)] = evaluate_policy(
            policy, ref, tok, held_out, scorers, cfg.eval_n, cfg.seed + 7, cfg.max_new_tokens,
            cfg.gen_batch_size, f"eval step {step}", sampler, greedy=cfg.reward == "verify")
        results.update({name: results["steps"][str(step)]} if name else {})
        run.write_json("eval.json", results)

    if distributed.is_main() and "before" not in results:
        evaluate_at(0, "before")
    if cfg.resume:  # the saved step's trained tensors (strict=False: only those), AdamW, RNGs
        ac.load_state_dict(load_state(run.dir, optimizer)[1], strict=False)
        run.rewrite(history)  # metrics.jsonl back to the state's step, once that state has loaded
    try:
        history = train(cfg, net, ac, ref, optimizer, sampler, tok, pool, scorers["reward"], run,
                        start, history, evaluate_at)
    except NonFiniteLogits as e:  # the last step's update overflowed the weights: nothing saved
        raise UserError(f"step {len(history) + 1}: {e} — lower --lr") from None
    except KeyboardInterrupt:  # Ctrl-C: what the finished steps learned is saved; one line, 130
        exit_interrupted(run, len(history), "model",  # LoRA: merged
                         lambda: save_model(policy, run.dir / "model", copy_from=model_dir))
    save_model(policy, run.dir / "model", copy_from=model_dir)  # rank 0 writes (LoRA merged)
    if not distributed.is_main():
        return
    evaluate_at(cfg.steps, "after")
    series = lambda *keys: {k: [(m["step"], m[k]) for m in history if k in m] for k in keys}
    line_plots([("training reward (raw score, mean)", series("score")),
                ("KL to the reference (per response)", series("kl")),
                ("losses", series("loss/policy", "loss/value", "loss/kl")),
                ("clip fraction, approx KL(π_old‖π), entropy",
                 series("clipfrac", "approx_kl", "entropy"))], run.dir / "training.svg")
    # complete. RUN/state went last: a crash in the writes above (eval, plot) can still resume
    shutil.rmtree(run.dir / "state", ignore_errors=True)
    print(f"\nheld-out: {results['before']['samples']} samples (temperature 1, seed "
          f"{cfg.seed + 7}), reward {cfg.reward}")
    print(report(results["before"], results["after"], cfg.algo, cfg.gold))
    print(f"policy, metrics and plots in {run.dir} ({(time.perf_counter() - began) / 60:.1f} min)")


if __name__ == "__main__":
    run_cli(main)
