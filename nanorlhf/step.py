"""A training step's shared pieces: the batch layout and the response log-probs its loss reads,
then its learning rate, its clipped gradient norm and its metrics over every torchrun rank.

    batch = collate(prompts, responses, pad_id)      # input_ids, attention_mask, loss_mask: (B, T)
    logps = response_logps(model, batch)             # (B,) log p(response | prompt), summed
    lr = peak_lr * lr_at(step, total, warmup)        # linear warmup, then linear decay to 0
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from nanorlhf import distributed
from nanorlhf.model import autocast


def collate(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> dict[str, Tensor]:
    """Right-padded batch of prompt+response rows.

    -> input_ids (B, T), attention_mask (B, T) 1 on real tokens, loss_mask (B, T) 1 on response
    tokens only: the tokens whose log-probability the losses score.
    """
    width = max(len(p) + len(r) for p, r in zip(prompts, responses))
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    loss_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, (p, r) in enumerate(zip(prompts, responses)):
        input_ids[row, :len(p) + len(r)] = torch.tensor(p + r, dtype=torch.long)
        attention_mask[row, :len(p) + len(r)] = 1
        loss_mask[row, len(p):len(p) + len(r)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def sequence_logps(logits: Tensor, input_ids: Tensor, loss_mask: Tensor,
                   average: bool = False) -> Tensor:
    """Log-prob of the masked tokens of each row: logits (B, T, V), input_ids (B, T),
    loss_mask (B, T) -> (B,).

    The result is fp32 for bf16/fp16/fp32 logits (fp64 stays fp64).
    loss_mask is aligned with input_ids: 1 where the token is a target (the completion, including
    its EOS), 0 on prompt and padding. Logits at position t predict token t+1, so token t+1 is
    scored by logits[:, t] and loss_mask[:, 0] is never used (the first token has nothing
    predicting it). average=False gives the sum over the masked tokens (DPO); True gives their
    mean (IPO), and 0 for a row with no masked tokens.
    """
    # At least fp32 before log_softmax: in bf16/fp16 the normaliser loses precision and fp16 can
    # overflow (trl#878). promote_types keeps fp64 as fp64 (the tests' precision), not narrowed.
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


def response_logps(model, batch: dict[str, Tensor], average: bool = False) -> Tensor:
    """sequence_logps(model(input_ids), ...) for a collate() batch, but the vocabulary projection
    runs only where a token is scored: prompt and padding positions (a third of a typical pair)
    skip the largest matmul and the log-softmax over the vocabulary. -> (B,) fp32."""
    scored = batch["loss_mask"][:, 1:].bool()  # (B, T-1): position t predicts token t+1
    at = F.pad(scored, (0, 1))  # (B, T): the last position predicts nothing
    # one forward call (DDP and FSDP hook it); fp32 before the log-softmax, even under bf16 autocast
    logits = model(batch["input_ids"], batch["attention_mask"], logits_at=at).float()  # (N, V)
    targets = batch["input_ids"][:, 1:][scored]  # (N,): the N scored tokens of all rows
    token_logps = logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)  # (N,)
    rows = scored.nonzero()[:, 0]  # (N,): the row of each scored token
    total = torch.zeros(scored.shape[0], device=scored.device).index_add(0, rows, token_logps)
    return total / scored.sum(-1).clamp(min=1) if average else total


@torch.no_grad()
def response_logps_batched(model, prompts: list[list[int]], responses: list[list[int]],
                           pad_id: int, batch_size: int = 16) -> list[float]:
    """log p(response | prompt), summed over each response's tokens: response_logps in
    right-padded batches on the model's device (bf16 autocast on CUDA)."""
    device, out = next(model.parameters()).device, []
    for i in range(0, len(prompts), batch_size):
        batch = collate(prompts[i:i + batch_size], responses[i:i + batch_size], pad_id)
        with autocast(device):
            out += response_logps(model, {k: v.to(device) for k, v in batch.items()}).tolist()
    return out


# --- preference pairs: one forward pass scores a batch's chosen and rejected responses together ---

def pair_batch(pairs: list[dict], pad_id: int) -> dict[str, Tensor]:
    """B pairs -> one batch of 2B rows: chosen rows first, then rejected (one forward for both)."""
    prompts = [p["prompt"] for p in pairs]
    responses = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    return collate(prompts + prompts, responses, pad_id)


def batch_logps(model, batch: dict[str, Tensor], dev, average: bool) -> tuple[Tensor, Tensor]:
    """-> (chosen_logps, rejected_logps), each (B,), for a pair_batch."""
    batch = {k: v.to(dev) for k, v in batch.items()}
    with autocast(dev):
        logps = response_logps(model, batch, average)  # (2B,) fp32: sequence_logps of full logits
    return logps.chunk(2)


@torch.no_grad()
def reference_logps(model, batches: list[list[dict]], pad_id: int, dev, average: bool) -> None:
    """π_ref never changes, so score every pair once before training and store it on the pair.
    With LoRA, call it inside lora.disabled(model): the reference is the base network, no copy."""
    model.eval()
    for chunk in distributed.bar(batches, desc="reference log-probs", unit="batch"):
        chosen, rejected = batch_logps(model, pair_batch(chunk, pad_id), dev, average)
        for pair, c, r in zip(chunk, chosen.tolist(), rejected.tolist()):
            pair["ref_chosen"], pair["ref_rejected"] = c, r


# --- one optimizer step, the same in every training loop ---

def lr_at(step: int, total: int, warmup: int) -> float:
    """Multiplier on the peak lr at optimizer step `step` (0-based): linear warmup over `warmup`
    steps, then linear decay to 0 at `total` (nanoGPT's get_lr, without the cosine). Warmup keeps
    AdamW's first, badly estimated steps small."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def clip_grad_norm(params, max_norm: float) -> float:
    """clip_grad_norm_ -> the norm before clipping, a float (FSDP's, a DTensor, is gathered)."""
    norm = torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], max_norm)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def mean_metrics(parts: list[tuple[float, dict[str, float]]]) -> dict[str, float]:
    """[(weight, {name: value})] of this rank -> {name: Σ weight·value / Σ weight} over the parts
    of every rank: under torchrun one all-reduce adds up every rank's sums."""
    keys = list(parts[0][1])
    rows = [[w * m[k] for k in keys] + [w] for w, m in parts]  # weight·value per key, then weight
    sums = torch.tensor(rows, dtype=torch.float64).sum(0)
    if dist.is_initialized():
        sums = sums.to("cuda" if dist.get_backend() == "nccl" else "cpu")  # NCCL: CUDA tensors only
        dist.all_reduce(sums)
    return {k: (sums[i] / sums[-1]).item() for i, k in enumerate(keys)}
