"""DPO (Rafailov et al. 2023, arXiv 2305.18290) and its loss variants cDPO, robust DPO, hinge and IPO.

(the training loop follows)
"""

import torch
import torch.nn.functional as F
from torch import Tensor

# --- the DPO family of losses ---

LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo")


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair preference loss and implicit rewards. Nothing is reduced: the caller takes the mean.

    Inputs are (B,) log-probs of each completion (prompt tokens excluded), as made by sequence_logps.
    With h = (logπ(y_w) - logπ(y_l)) - (logπ_ref(y_w) - logπ_ref(y_l)), ε = label_smoothing:

        sigmoid  -log σ(βh)                                   DPO paper eq. 7
                 (1-ε)·(-log σ(βh)) + ε·(-log σ(-βh))         with ε > 0: conservative DPO (cDPO),
                                                              ε = the assumed fraction of flipped labels
        robust   [(1-ε)·(-log σ(βh)) - ε·(-log σ(-βh))]/(1-2ε)  rDPO (Chowdhury et al. 2024): unbiased
                                                              under label flips, ε in [0, 0.5)
        hinge    max(0, 1 - βh)                               SLiC / RSO; 1/β is the margin
        ipo      (h - 1/(2β))²                                IPO (Azar et al. 2023, eq. 17)

    IPO: the paper and TRL use *per-token-averaged* log-probs (sequence_logps(..., average=True)), so
    h is a difference of mean token log-probs and the target 1/(2β) does not depend on length. This
    function uses whatever it is given; the summed log-probs (as in the DPO reference code) make the
    target a total over the sequence instead.

    Returns (losses, chosen_rewards, rejected_rewards), each (B,). The rewards are the implicit DPO
    rewards β·(logπ - logπ_ref), detached: they are for logging, never for the gradient.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; valid ones are {', '.join(LOSS_TYPES)}")
    if loss_type == "sigmoid" and not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5] for sigmoid (cDPO), got {label_smoothing}")
    if loss_type == "robust" and not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5) for robust, got {label_smoothing}")
    if loss_type in ("hinge", "ipo") and label_smoothing != 0.0:  # refuse rather than silently ignore it
        raise ValueError(f"label_smoothing applies only to sigmoid and robust, not to {loss_type}")

    # The reference is frozen by definition; detaching here means no gradient can reach it even if the
    # caller forgot torch.no_grad() around the reference forward.
    reference_chosen_logps = reference_chosen_logps.detach()
    reference_rejected_logps = reference_rejected_logps.detach()
    h = (policy_chosen_logps - policy_rejected_logps) - (reference_chosen_logps - reference_rejected_logps)

    # -log σ(x) as -logsigmoid(x), never -log(sigmoid(x)): sigmoid(-200) underflows to 0 and log gives inf.
    if loss_type == "sigmoid":
        eps = label_smoothing
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        eps = label_smoothing
        losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:  # ipo
        losses = (h - 1 / (2 * beta)) ** 2

    chosen_rewards = beta * (policy_chosen_logps - reference_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - reference_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


def sequence_logps(logits: Tensor, input_ids: Tensor, loss_mask: Tensor, average: bool = False) -> Tensor:
    """Log-prob of the masked tokens of each row: logits (B, T, V), input_ids (B, T), loss_mask (B, T) -> (B,).

    The result is fp32 for bf16/fp16/fp32 logits (fp64 stays fp64).
    loss_mask is aligned with input_ids: 1 where the token is a target (the completion, including its
    EOS), 0 on prompt and padding. Logits at position t predict token t+1, so token t+1 is scored by
    logits[:, t] and loss_mask[:, 0] is never used (the first token has nothing predicting it).
    average=False gives the sum over the masked tokens (DPO); True gives their mean (IPO), and 0 for a
    row with no masked tokens.
    """
    # At least fp32 before log_softmax: in bf16/fp16 the normaliser loses precision and fp16 can
    # overflow (trl#878). promote_types keeps fp64 as fp64 (the tests' precision) instead of narrowing it.
    logits = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))
    logps = logits.log_softmax(dim=-1)  # (B, T-1, V)
    targets = input_ids[:, 1:]  # (B, T-1)
    token_logps = logps.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    mask = loss_mask[:, 1:].to(token_logps.dtype)
    # where(), not token_logps * mask: an unscored position holding -inf would give -inf * 0 = nan.
    total = torch.where(mask > 0, token_logps, 0.0).sum(dim=-1)
    if average:
        return total / mask.sum(dim=-1).clamp(min=1)
    return total


def dpo_metrics(
    losses: Tensor,
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
) -> dict[str, float]:
    """Batch means of the per-pair (B,) tensors, under TRL's metric names."""
    return {
        "loss": losses.mean().item(),
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        # strict >, as in TRL and the DPO reference: exactly 0.0 at init, when policy == reference
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
        "logps/chosen": policy_chosen_logps.detach().mean().item(),
        "logps/rejected": policy_rejected_logps.detach().mean().item(),
    }
