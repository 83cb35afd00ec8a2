"""packed_linears: oneDNN's packed matmuls (forward, and backward's two products) against float64
products within the bound of fp32 summation, the context's patching and restoring, repacking after a
weight changes, and the layers it must leave alone (LoRA's)."""

import copy

import pytest
import torch
from torch import nn

from nanorlhf import lora
from nanorlhf.checkpoint import load_model
from nanorlhf.fast.packed import PackedLinear, available, pack_linears, packed_linears

pytestmark = pytest.mark.skipif(not available(), reason="this torch has no oneDNN ops")
EPS32 = 2.0 ** -24  # fp32 unit roundoff


def assert_fp32_product(out: torch.Tensor, x: torch.Tensor, linear: nn.Linear) -> None:
    """out equals x @ W^T + b computed in float64, within the bound of any fp32 summation order:
    a sum of K products is off by at most ~(K + 1) * eps * sum |x_k w_k| (+ the bias's rounding)."""
    w, b = linear.weight.double(), linear.bias
    exact = x.double() @ w.T + (b.double() if b is not None else 0)
    scale = x.double().abs() @ w.abs().T + (b.double().abs() if b is not None else 0)
    K = x.shape[-1]
    assert ((out.double() - exact).abs() <= (K + 2) * EPS32 * scale).all()


@pytest.mark.parametrize("shape", [(5, 64), (3, 7, 64), (1, 64)])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_forward_is_the_fp32_product(shape, bias):
    torch.manual_seed(0)
    linear = nn.Linear(64, 40, bias=bias)
    x = torch.randn(shape)
    with torch.no_grad(), packed_linears(linear):
        assert type(linear) is PackedLinear  # the packed path is what runs
        out = linear(x)
    assert out.shape == (*shape[:-1], 40)
    assert_fp32_product(out, x, linear)
    assert type(linear) is nn.Linear  # plain again


def test_a_deep_copy_computes_with_its_own_weights():
    # the critic, ILQL's target heads and a reward model start as deep copies of a
    # (maybe packed) module
    torch.manual_seed(4)
    linear, x = nn.Linear(32, 16), torch.randn(4, 32)
    pack_linears(linear)
    copy_ = copy.deepcopy(linear)
    with torch.no_grad():
        copy_.weight.mul_(3.0)
        assert type(copy_) is PackedLinear
        assert_fp32_product(copy_(x), x, copy_)
        assert_fp32_product(linear(x), x, linear)


def test_weight_change_is_repacked():
    # an optimizer step or a load changes the weight: the packed copy must follow it,
    # not the old values
    torch.manual_seed(1)
    linear, x = nn.Linear(32, 16), torch.randn(4, 32)
    with torch.no_grad(), packed_linears(linear):
        linear(x)  # packs the weight
        linear.weight.mul_(-2.0)  # in place: the same storage, a new version
        assert_fp32_product(linear(x), x, linear)
        linear.weight.data = torch.randn(16, 32)  # a new storage
        assert_fp32_product(linear(x), x, linear)


def within_fp32_sum(value: torch.Tensor, exact: torch.Tensor, abs_terms: torch.Tensor,
                    n: int) -> bool:
    """value, an fp32 sum of n terms in any order, against its float64 value:
    |error| <= (n + 1) eps sum|terms|."""
    return bool(((value.double() - exact).abs() <= (n + 1) * EPS32 * abs_terms).all())


@pytest.mark.parametrize("shape", [(6, 48), (2, 5, 48)])
def test_packed_gradients_are_the_fp32_products(shape):
    # training through oneDNN (--onednn): grad_x = gy W, grad_W = gy^T x, grad_b = sum gy,
    # each an fp32 sum
    torch.manual_seed(2)
    linear = nn.Linear(48, 24)
    x = torch.randn(shape, requires_grad=True)
    grad_y = torch.randn(*shape[:-1], 24)
    with packed_linears(linear):
        y = linear(x)
        # not F.linear's backward
        assert y.grad_fn is not None and "PackedLinear" in type(y.grad_fn).__name__
        y.backward(grad_y)
    assert_fp32_product(y.detach(), x.detach(), linear)
    gy = grad_y.reshape(-1, 24).double()
    xs = x.detach().reshape(-1, 48).double()
    w = linear.weight.detach().double()
    N = gy.shape[0]
    assert within_fp32_sum(x.grad.reshape(-1, 48), gy @ w, gy.abs() @ w.abs(), 24)
    assert within_fp32_sum(linear.weight.grad, gy.T @ xs, gy.abs().T @ xs.abs(), N)
    assert within_fp32_sum(linear.bias.grad, gy.sum(0), gy.abs().sum(0), N)


def test_frozen_weights_get_no_gradient_and_lora_keeps_its_forward(tiny_dirs):
    torch.manual_seed(3)
    linear, x = nn.Linear(16, 8).requires_grad_(False), torch.randn(3, 16, requires_grad=True)
    with packed_linears(linear):
        linear(x).sum().backward()
    # a frozen weight (LoRA's base, ILQL's LM) costs no grad_W product
    assert linear.weight.grad is None
    assert within_fp32_sum(x.grad, linear.weight.double().sum(0).expand(3, 16),
                           linear.weight.double().abs().sum(0), 8)
    model = lora.add(load_model(tiny_dirs["llama-gqa-tied"]).eval(), rank=4, alpha=8)
    with packed_linears(model):
        q = model.model.layers[0].self_attn.q_proj
        assert type(q) is lora.LoRALinear  # its own forward, which adds the adapter
        assert type(model.lm_head) is PackedLinear


def test_model_logits_equal_outside_and_inside(tiny_dirs):
    # a whole tiny model: the packed matmuls change only the order of fp32 sums, as the fast-decode
    # tests bound for the attention (1e-5 on O(1) logits; a wrong weight or a missing bias moves
    # them by O(1e-2))
    model = load_model(tiny_dirs["qwen2-bias"]).eval()
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain = model(ids)
        with packed_linears(model):
            with packed_linears(model):
                packed = model(ids)
            # nested: the inner one left the outer's packing
            assert type(model.lm_head) is PackedLinear
        assert type(model.lm_head) is nn.Linear
    torch.testing.assert_close(packed, plain, atol=1e-5, rtol=1e-5)
