"""The learning-rate schedule every training script uses (nanoGPT's get_lr, without the cosine)."""


def lr_at(step: int, total: int, warmup: int) -> float:
    """Multiplier on the peak lr at optimizer step `step` (0-based): linear warmup over `warmup` steps,
    then linear decay to 0 at `total`. Warmup keeps AdamW's first, badly estimated steps small."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))
