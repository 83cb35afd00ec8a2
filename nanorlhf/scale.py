"""The flags that let a training script outgrow one small model on one device, checked and applied.

Each training script's Config inherits ScaleConfig, so every script has the same six --flags (listed
after its own; a script that cannot shard says why in its Config's fsdp_refused, and --fsdp is refused):

    --lora-rank 16 [--lora-alpha 32 --lora-targets q_proj,v_proj]   train adapters only (nanorlhf/lora.py)
    --grad-checkpointing true                                        recompute block activations in backward
    torchrun --nproc_per_node N SCRIPT ... [--fsdp true]             DDP, or FSDP (nanorlhf/distributed.py)
    --onednn true                                                    CPU matmuls through oneDNN (nanorlhf/packed.py)

bf16 needs no flag: on CUDA every forward runs under bf16 autocast (cli.autocast) while the weights,
gradients and AdamW state stay fp32, and log-softmaxes run in fp32.
"""

import random
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from nanorlhf import distributed, lora
from nanorlhf.fast import packed
from nanorlhf.run import flag
from nanorlhf.errors import UserError


@dataclass
class ScaleConfig:
    lora_rank: int = flag(0, "LoRA rank r: train rank-r adapters on --lora-targets only (0 = full fine-tuning)", min=0)
    lora_alpha: float = flag(16.0, "LoRA α: the adapter update is scaled by α/r", gt=0)
    lora_targets: str = flag(",".join(lora.TARGETS), "comma-separated projections that get adapters")
    grad_checkpointing: bool = flag(False, "recompute each block's activations in backward: less memory, "
                                           "~1/3 more compute")
    fsdp: bool = flag(False, "under torchrun: shard weights, gradients and optimizer state (FSDP2) instead of DDP")
    onednn: bool = flag(False, "CPU matmuls (training and sampling) through oneDNN with packed weights: ~1.9x "
                               "faster steps on AMD CPUs, where MKL runs AVX2 kernels; equal to MKL's up to "
                               "rounding, so not bit-equal to a default run")
    fsdp_refused: ClassVar[str] = ""  # a script that cannot run sharded: why (not a flag)

    def check(self) -> None:
        """Cross-flag rules, called by cli.parse_config; a script's Config.check calls super().check()."""
        check(self)


def check(cfg: ScaleConfig) -> tuple[str, ...]:
    """Bad scale flags end in one clear line; -> the LoRA target names."""
    targets = tuple(t.strip() for t in cfg.lora_targets.split(",") if t.strip())
    unknown = [t for t in targets if t not in lora.TARGETS] or ([] if targets else [""])
    if unknown:
        raise UserError(f"--lora-targets {cfg.lora_targets!r}: unknown projection {unknown[0]!r}; "
                        f"choose from {','.join(lora.TARGETS)}")
    if cfg.fsdp and cfg.fsdp_refused:  # before the torchrun rule below: that advice would not help here
        raise UserError(f"--fsdp: {cfg.fsdp_refused} (use DDP: torchrun without --fsdp)")
    if cfg.onednn and cfg.fsdp:
        raise UserError("--onednn with --fsdp: FSDP's sharded weights cannot be packed for oneDNN; use one of the two")
    if cfg.fsdp and not distributed.launched():
        raise UserError("--fsdp shards the model over processes: launch with torchrun --nproc_per_node N")
    return targets


def prepare(model: nn.Module, cfg: ScaleConfig, seed: int | str = 0) -> nn.Module:
    """LoRA adapters (everything else frozen; A drawn from `seed`), gradient checkpointing and oneDNN
    matmuls, as the flags say. In place."""
    if cfg.lora_rank:
        lora.add(model, cfg.lora_rank, cfg.lora_alpha, check(cfg), random.Random(seed).getrandbits(63))
    model.model.grad_checkpointing = cfg.grad_checkpointing  # the Backbone of an LM or a reward model
    if cfg.onednn:
        packed.pack_linears(model)  # after LoRA: adapted projections keep their own forward
    return model


def trainable(model: nn.Module) -> list[nn.Parameter]:
    """What the optimizer steps: everything, or with LoRA the adapters (and whatever was unfrozen after)."""
    return [p for p in model.parameters() if p.requires_grad]
