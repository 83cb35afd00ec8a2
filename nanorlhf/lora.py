"""LoRA (Hu et al. 2021, arXiv 2106.09685) by hand, on chosen projections:
y = W x + b + (α/r)·B(A x).

W and b stay frozen (so does everything else in the model); only A (r, in) and B (out, r) train.
A starts random and B at zero, so an adapted model starts out exactly equal to its base. Default
targets: all seven projections of a block, attention and MLP; QLoRA (Dettmers et al. 2023) found
that adapting every linear layer is what matches full fine-tuning (the LoRA paper's q_proj,v_proj
trains fewer parameters). Saved checkpoints hold merged weights W + (α/r)·BA in the plain HF
layout (checkpoint.save_model).

    lora.add(model, rank=16, alpha=32)  # in place; only adapters have requires_grad
    with lora.disabled(model): ...      # the base model, e.g. DPO's reference, no second copy
    lora.BaseView(model)                # the same, as a module (shares the weights)
    lora.merge(model)                   # fold the adapters in: a plain model again
"""

import math
import random
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nanorlhf.errors import UserError

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Linear):
    """`base`'s own weight and bias (so state-dict names do not change) plus a rank-r update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, gen: torch.Generator):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        # kaiming_uniform(a=√5), as nn.Linear and PEFT initialise A
        bound = 1 / math.sqrt(self.in_features)
        a = (torch.rand(rank, self.in_features, generator=gen) * 2 - 1) * bound
        # a meta-device base (checkpoint.load_model_sharded fills it in after sharding) still gets
        # real adapters on the CPU: they are not in any checkpoint, and FSDP moves them to the
        # device when it shards
        device = torch.device("cpu") if base.weight.is_meta else base.weight.device
        self.lora_A = nn.Parameter(a.to(device, base.weight.dtype))
        zeros = torch.zeros(self.out_features, rank, device=device, dtype=base.weight.dtype)
        self.lora_B = nn.Parameter(zeros)
        self.scale, self.enabled = alpha / rank, True

    def forward(self, x: Tensor) -> Tensor:  # (..., in) -> (..., out)
        y = F.linear(x, self.weight, self.bias)
        if self.enabled:  # x -> A -> B: two thin matmuls, never the (out, in) product
            y = y + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale
        return y

    def delta(self) -> Tensor:  # (out, in): what merging adds to the weight
        return self.scale * (self.lora_B @ self.lora_A)


def _children(model: nn.Module, kind: type):
    return [(parent, name, child) for parent in list(model.modules())
            for name, child in list(parent.named_children()) if type(child) is kind]


def add(model: nn.Module, rank: int, alpha: float, targets=TARGETS, seed: int = 0) -> nn.Module:
    """Freeze all of `model` and adapt every nn.Linear whose attribute name is in `targets`.
    In place."""
    gen = torch.Generator().manual_seed(seed)
    model.requires_grad_(False)
    for parent, name, child in _children(model, nn.Linear):
        if name in targets:
            setattr(parent, name, LoRALinear(child, rank, alpha, gen))
    return model


def parse_targets(text: str) -> tuple[str, ...]:
    """--lora-targets "q_proj,v_proj" -> ("q_proj", "v_proj").

    An unknown or empty name is one line."""
    targets = tuple(t.strip() for t in text.split(",") if t.strip())
    unknown = [t for t in targets if t not in TARGETS] or ([] if targets else [""])
    if unknown:
        raise UserError(f"--lora-targets {text!r}: unknown projection {unknown[0]!r}; "
                        f"choose from {','.join(TARGETS)}")
    return targets


def adapt(
    model: nn.Module, rank: int, alpha: float, targets: str, seed: int | str = 0
) -> nn.Module:
    """A script's --lora-rank/--lora-alpha/--lora-targets: add() with A drawn from `seed`, or with
    rank 0 nothing (full fine-tuning). In place."""
    if rank:
        add(model, rank, alpha, parse_targets(targets), random.Random(seed).getrandbits(63))
    return model


@contextmanager
def disabled(model: nn.Module):
    """Inside the block `model` computes its base function: every adapter is off."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in layers:
        m.enabled = False
    try:
        yield model
    finally:
        for m in layers:
            m.enabled = True


class BaseView(nn.Module):
    """`model` with its adapters off, as a module of its own: the base model for free, e.g. to score
    samples under the base after training (the weights are shared, nothing is copied)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.adapted, self.cfg = model, model.cfg

    def forward(self, *args, **kwargs):
        with disabled(self.adapted):
            return self.adapted(*args, **kwargs)


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """W += (α/r)·BA and plain nn.Linear back in every adapted place; every parameter trains
    again. In place."""
    for parent, name, child in _children(model, LoRALinear):
        child.weight += child.delta()
        has_bias = child.bias is not None
        plain = nn.Linear(child.in_features, child.out_features, bias=has_bias, device="meta")
        plain.weight, plain.bias = child.weight, child.bias
        setattr(parent, name, plain)
    return model.requires_grad_(True)


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """model.state_dict() with every adapter folded into its weight and no lora_* entries; the
    model is unchanged."""
    state = {k: v for k, v in model.state_dict().items() if not k.endswith((".lora_A", ".lora_B"))}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            state[f"{name}.weight"] = m.weight + m.delta()
    return state
