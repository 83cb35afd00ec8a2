"""packed_linears: oneDNN's packed matmul against a float64 product, the context's patching and restoring,
repacking after a weight changes, and the cases it must leave to F.linear (gradients, LoRA)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nanorlhf import lora
from nanorlhf.checkpoint import load_model
from nanorlhf.packed import available, packed_linears

pytestmark = pytest.mark.skipif(not available(), reason="this torch has no oneDNN ops")
EPS32 = 2.0 ** -24  # fp32 unit roundoff


def assert_fp32_product(out: torch.Tensor, x: torch.Tensor, linear: nn.Linear) -> None:
    """out equals x @ W^T + b computed in float64, within the bound of any fp32 summation order: a sum of K
    products is off by at most ~(K + 1) * eps * sum |x_k w_k| (+ the bias's rounding)."""
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
        assert "forward" in vars(linear)  # the packed path is what ran
        out = linear(x)
    assert out.shape == (*shape[:-1], 40)
    assert_fp32_product(out, x, linear)
    assert "forward" not in vars(linear)  # Linear.forward again


def test_weight_change_is_repacked():
    # an optimizer step or a load changes the weight: the packed copy must follow it, not the old values
    torch.manual_seed(1)
    linear, x = nn.Linear(32, 16), torch.randn(4, 32)
    with torch.no_grad(), packed_linears(linear):
        linear(x)  # packs the weight
        linear.weight.mul_(-2.0)  # in place: the same storage, a new version
        assert_fp32_product(linear(x), x, linear)
        linear.weight.data = torch.randn(16, 32)  # a new storage
        assert_fp32_product(linear(x), x, linear)


def test_gradients_and_lora_keep_their_own_path(tiny_dirs):
    torch.manual_seed(2)
    linear, x = nn.Linear(16, 8), torch.randn(3, 16, requires_grad=True)
    with packed_linears(linear):
        linear(x).sum().backward()  # oneDNN's op has no backward: F.linear must have run
    torch.testing.assert_close(x.grad, linear.weight.sum(0).expand(3, 16), rtol=0, atol=1e-6)
    model = lora.add(load_model(tiny_dirs["llama-gqa-tied"]).eval(), rank=4, alpha=8)
    with packed_linears(model):
        q = model.model.layers[0].self_attn.q_proj
        assert isinstance(q, lora.LoRALinear) and "forward" not in vars(q)  # its forward adds the adapter
        assert "forward" in vars(model.lm_head)


def test_model_logits_equal_outside_and_inside(tiny_dirs):
    # a whole tiny model: the packed matmuls change only the order of fp32 sums, as the fast-decode tests
    # bound for the attention (1e-5 on O(1) logits; a wrong weight or a missing bias moves them by O(1e-2))
    model = load_model(tiny_dirs["qwen2-bias"]).eval()
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain = model(ids)
        with packed_linears(model), packed_linears(model):  # nested: the inner one leaves the outer's patch
            packed = model(ids)
            assert "forward" in vars(model.lm_head)
        assert "forward" not in vars(model.lm_head)
    torch.testing.assert_close(packed, plain, atol=1e-5, rtol=1e-5)
