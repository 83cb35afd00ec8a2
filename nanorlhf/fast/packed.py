"""Matmuls through oneDNN with pre-packed weights: `with packed_linears(model): ...`, or
pack_linears(model).

torch's CPU F.linear calls MKL's sgemm, and MKL picks its AVX-512 kernels on Intel CPUs only: on AMD
ones it runs its AVX2 kernels. oneDNN, which torch also ships (it is what inductor calls for
linears), picks kernels by the CPU's features, and with each weight reordered once into its blocked
layout its fp32 matmul ran at 2.0-2.4x MKL's rate at the decode and training shapes here on a Zen 5
core (`bench/bench_floor.py`). Every plain nn.Linear of a packed model multiplies through oneDNN: in
inference with the packed weight, in training with all three products of forward and backward
(_PackedLinearFunction). They are the same fp32 sums in another order, equal to F.linear's up to
rounding (tests/test_packed.py), but not to the bit: generate()'s default path and training (unless
--onednn true, scale.py) keep MKL, so their results stay as the README reports them.

A packed weight is a copy (the weights once more in memory, 0.5 GB for SmolLM2-135M; training keeps
W^T packed too), kept while the weight lives and repacked only when it changed (an optimizer step or
a load bumps its version): once per sampling phase in an RL loop, once per step in training. Without
oneDNN, and for tensors on a GPU or not in fp32, F.linear runs as before.
"""

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

# weight -> (its version and storage when packed, the packed copy); keyed by identity (a
# tensor's == is elementwise), weakly: an entry dies with its weight. One table for W, one for
# W^T (backward's product)
_packed, _packed_t = WeakIdKeyDictionary(), WeakIdKeyDictionary()
# oneDNN chooses the blocked layout for this many rows; any row count works, at similar speed
ROWS_HINT = 128


def available() -> bool:
    """Whether this torch has the oneDNN ops (x86 and aarch64 builds do) and they are
    switched on."""
    return (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def _matmul(x: Tensor, packed: Tensor, bias: Tensor | None) -> Tensor:
    """x (..., in) @ the packed (out, in) matrix's transpose (+ bias) -> (..., out)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def _pack(matrix: Tensor) -> Tensor:
    """(out, in) -> oneDNN's blocked copy, for x (..., in) -> (..., out) products."""
    return torch.ops.mkldnn._reorder_linear_weight(matrix.detach().contiguous(), ROWS_HINT)


def packed_weight(weight: Tensor, transposed: bool = False) -> Tensor:
    """weight (out, in) fp32 on the CPU -> its packed copy (of weight.T with transposed), packed
    again only if the weight changed since."""
    table, state = (_packed_t if transposed else _packed), (weight._version, weight.data_ptr())
    hit = table.get(weight)
    if hit is None or hit[0] != state:
        hit = (state, _pack(weight.t() if transposed else weight))
        table[weight] = hit
    return hit[1]


class _PackedLinearFunction(torch.autograd.Function):
    """F.linear with all three matmuls of training through oneDNN: y = x W^T + b in forward; in
    backward grad_x = grad_y W (W^T packed and cached like W) and grad_W = grad_y^T x (x^T packed on
    the spot: it is new every step)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        # x (..., in) -> y (..., out)
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _matmul(x, packed_weight(weight), bias)

    @staticmethod
    def backward(ctx, grad_y: Tensor):  # grad_y (..., out)
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        rows = grad_y.reshape(-1, grad_y.shape[-1])  # (N, out)
        if ctx.needs_input_grad[0]:
            grad_x = _matmul(grad_y, packed_weight(weight, transposed=True), None)  # (..., in)
        if ctx.needs_input_grad[1]:
            grad_w = _matmul(rows.t(), _pack(x.reshape(-1, x.shape[-1]).t()), None)  # (out, in)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = rows.sum(0)
        return grad_x, grad_w, grad_b


def packed_forward(linear: nn.Linear, x: Tensor) -> Tensor:
    """x (..., in) -> (..., out), as linear(x) computes it; F.linear itself off the CPU or off fp32
    (a model moved to a GPU after its linears were packed)."""
    w = linear.weight
    if not (x.device.type == w.device.type == "cpu" and x.dtype == w.dtype == torch.float32):
        return F.linear(x, w, linear.bias)
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or
                                    (linear.bias is not None and linear.bias.requires_grad)):
        return _PackedLinearFunction.apply(x, w, linear.bias)
    return _matmul(x, packed_weight(w), linear.bias)


class PackedLinear(nn.Linear):
    """An nn.Linear whose forward is packed_forward. pack_linears switches a Linear's class to it
    (the module, its parameters and their names stay), so a deep copy is a PackedLinear of its own
    weights."""

    def forward(self, x: Tensor) -> Tensor:
        return packed_forward(self, x)


def pack_linears(model: nn.Module) -> list[nn.Linear]:
    """From now on every nn.Linear of `model` (not subclasses such as LoRALinear, whose forward adds
    more) computes through packed_forward, in inference and in training. -> the linears it switched
    (none without oneDNN; ones already packed are left to whoever packed them)."""
    if not available():
        return []
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    for m in linears:
        m.__class__ = PackedLinear
    return linears


@contextlib.contextmanager
def packed_linears(model: nn.Module):
    """pack_linears(model) for the length of a `with` block (sampling, judging); plain nn.Linear
    again after."""
    linears = pack_linears(model)
    try:
        yield
    finally:
        for m in linears:
            m.__class__ = nn.Linear
