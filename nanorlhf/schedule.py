"""One optimizer step, the same in every training loop: its learning rate, its gradient norm
(logged, then clipped) and its metrics, as means over the step's examples on every torchrun rank."""

import torch
import torch.distributed as dist


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
