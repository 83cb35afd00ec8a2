"""Inference matmuls through oneDNN with pre-packed weights: `with packed_linears(model): ...`.

torch's CPU F.linear calls MKL's sgemm, and MKL picks its AVX-512 kernels on Intel CPUs only: on AMD ones
it runs its AVX2 kernels. oneDNN, which torch also ships (it is what inductor calls for linears), picks
kernels by the CPU's features, and with each weight reordered once into its blocked layout its fp32
matmul ran at 2.0-2.6x MKL's rate at the decode shapes here (16-192 rows) on a Zen 5 core
(`bench/bench_floor.py`). Inside the context every plain nn.Linear of the model multiplies through
oneDNN with its packed weight, when no gradient is wanted; the products are the same fp32 sums in another
order, equal to F.linear up to rounding (tests/test_packed.py). Outside it nothing changes, so training
and generate()'s default path keep MKL and their results.

A packed weight is a copy (the model's weights once more in memory, 0.5 GB for SmolLM2-135M), kept while
the weight lives and repacked only when it changed (an optimizer step or a load bumps its version), so an
RL loop repacks once per sampling phase. Where oneDNN is missing, or on a GPU, the context does nothing.
"""

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

# weight -> (its version and storage when packed, the packed copy); keyed by identity (a tensor's == is
# elementwise), weakly: an entry dies with its weight
_packed = WeakIdKeyDictionary()
ROWS_HINT = 128  # oneDNN chooses the blocked layout for this many rows; any row count works, at similar speed


def available() -> bool:
    """Whether this torch has the oneDNN ops (x86 and aarch64 builds do) and they are switched on."""
    return (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def packed_weight(weight: Tensor) -> Tensor:
    """weight (out, in) fp32 on the CPU -> its oneDNN-packed copy, packed again only if it changed."""
    state = (weight._version, weight.data_ptr())
    hit = _packed.get(weight)
    if hit is None or hit[0] != state:
        hit = (state, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), ROWS_HINT))
        _packed[weight] = hit
    return hit[1]


def packed_forward(linear: nn.Linear, x: Tensor) -> Tensor:
    """x (..., in) -> (..., out), as linear(x) computes it."""
    if torch.is_grad_enabled() and (x.requires_grad or linear.weight.requires_grad):
        return F.linear(x, linear.weight, linear.bias)  # oneDNN's op has no backward
    return torch.ops.mkldnn._linear_pointwise(x, packed_weight(linear.weight), linear.bias, "none", [], "")


@contextlib.contextmanager
def packed_linears(model: nn.Module):
    """Within: every nn.Linear of `model` (not subclasses such as LoRALinear, whose forward adds more)
    with fp32 CPU weights computes through packed_forward. Nested uses keep the outer one's."""
    linears = []
    if available():
        linears = [m for m in model.modules() if type(m) is nn.Linear and "forward" not in vars(m)
                   and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32]
    for m in linears:
        m.forward = lambda x, m=m: packed_forward(m, x)  # an instance attribute: shadows Linear.forward
    try:
        yield
    finally:
        for m in linears:
            del m.forward
