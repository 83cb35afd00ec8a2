"""The DPO loss family and sequence log-probs on plain tensors.

Expected values are hand-computed constants (research notes §5.1, §5.2, §5.4) or float64
re-derivations with `math`, never numbers produced by the functions under test.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from nanorlhf.step import sequence_logps
from train_dpo import dpo_loss, dpo_metrics

D = torch.float64


def t(*xs: float, grad: bool = False) -> torch.Tensor:
    return torch.tensor(xs, dtype=D, requires_grad=grad)


def nls(x: float) -> float:
    """-log σ(x) in float64, the stable way: log(1 + e^-x)."""
    return math.log1p(math.exp(-x)) if x > -30 else -x + math.log1p(math.exp(x))


# --- §5.1 hand-computed cases ---

# Case A: β = 0.1, logπ(y_w) = -10, logπ(y_l) = -20, ref both -15 -> h = 10, βh = 1.
CASE_A = [
    ("sigmoid", 0.0, 0.3132617, nls(1)),
    ("sigmoid", 0.1, 0.4132617, 0.9 * nls(1) + 0.1 * nls(-1)),  # cDPO
    ("robust", 0.1, 0.1882617, (0.9 * nls(1) - 0.1 * nls(-1)) / 0.8),
    ("hinge", 0.0, 0.0, 0.0),
    ("ipo", 0.0, 25.0, (10 - 5) ** 2),  # one-token completions, so the average is the sum
]


@pytest.mark.parametrize("loss_type,eps,hand,derived", CASE_A)
def test_case_a_values(loss_type, eps, hand, derived):
    losses, chosen, rejected = dpo_loss(t(-10.0), t(-20.0), t(-15.0), t(-15.0), beta=0.1,
                                        loss_type=loss_type, label_smoothing=eps)
    assert losses.shape == (1,)
    assert losses.item() == pytest.approx(hand, abs=5e-8)
    assert losses.item() == pytest.approx(derived, abs=1e-12)
    assert chosen.item() == pytest.approx(0.5, abs=1e-12)
    assert rejected.item() == pytest.approx(-0.5, abs=1e-12)


def test_case_a_gradients_and_metrics():
    pc, pr = t(-10.0, grad=True), t(-20.0, grad=True)
    rc, rr = t(-15.0, grad=True), t(-15.0, grad=True)
    losses, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=0.1)
    losses.sum().backward()
    sig_m1 = 1 / (1 + math.exp(1))  # σ(-1)
    assert pc.grad.item() == pytest.approx(-0.0268941, abs=5e-8)
    assert pc.grad.item() == pytest.approx(-0.1 * sig_m1, abs=1e-12)
    assert pr.grad.item() == pytest.approx(+0.1 * sig_m1, abs=1e-12)
    assert rc.grad is None and rr.grad is None  # the reference is detached inside the loss
    assert not chosen.requires_grad and not rejected.requires_grad

    m = dpo_metrics(losses, chosen, rejected, pc, pr)
    assert m["loss"] == pytest.approx(0.3132617, abs=5e-8)
    assert m["rewards/chosen"] == pytest.approx(0.5)
    assert m["rewards/rejected"] == pytest.approx(-0.5)
    assert m["rewards/margins"] == pytest.approx(1.0)
    assert m["rewards/accuracies"] == 1.0
    assert m["logps/chosen"] == -10.0 and m["logps/rejected"] == -20.0
    assert all(isinstance(v, float) for v in m.values())


# Case B (ms-swift PR #10167): β = 0.1, h = 6, βh = 0.6. ∂L/∂h = ∂L/∂logπ(y_w).
CASE_B = [
    ("sigmoid", 0.4374880, -0.0354344, nls(0.6), -0.1 / (1 + math.exp(0.6))),
    ("hinge", 0.4, -0.1, 0.4, -0.1),
    ("ipo", 1.0, 2.0, (6 - 5) ** 2, 2 * (6 - 5)),
]


@pytest.mark.parametrize("loss_type,hand,hand_grad,derived,derived_grad", CASE_B)
def test_case_b_values_and_dl_dh(loss_type, hand, hand_grad, derived, derived_grad):
    pc = t(-1.0, grad=True)
    losses, _, _ = dpo_loss(pc, t(-7.0), t(-3.0), t(-3.0), beta=0.1, loss_type=loss_type)
    losses.sum().backward()
    assert losses.item() == pytest.approx(hand, abs=5e-8)
    assert losses.item() == pytest.approx(derived, abs=1e-12)
    assert pc.grad.item() == pytest.approx(hand_grad, abs=5e-8)
    assert pc.grad.item() == pytest.approx(derived_grad, abs=1e-12)


# Case D: at initialisation every log-ratio is 0.
CASE_D = [("sigmoid", 0.0, math.log(2)), ("sigmoid", 0.1, math.log(2)),
          ("sigmoid", 0.5, math.log(2)), ("robust", 0.1, math.log(2)), ("robust", 0.3, math.log(2)),
          ("hinge", 0.0, 1.0), ("ipo", 0.0, 25.0)]


@pytest.mark.parametrize("loss_type,eps,expected", CASE_D)
def test_case_d_init_values(loss_type, eps, expected):
    losses, chosen, rejected = dpo_loss(t(-4.0, -9.0), t(-6.0, -2.0), t(-4.0, -9.0), t(-6.0, -2.0),
                                        beta=0.1, loss_type=loss_type, label_smoothing=eps)
    torch.testing.assert_close(losses, t(expected, expected), atol=1e-12, rtol=0)
    assert (chosen == 0).all() and (rejected == 0).all()
    assert abs(math.log(2) - 0.6931472) < 5e-8  # the notes' constant


# --- §5.2 invariants ---

def test_policy_equals_reference_gives_log2_and_zero_rewards():
    g = torch.Generator().manual_seed(0)
    c, r = -50 * torch.rand(16, generator=g, dtype=D), -50 * torch.rand(16, generator=g, dtype=D)
    losses, chosen, rejected = dpo_loss(c, r, c.clone(), r.clone(), beta=0.1)
    torch.testing.assert_close(losses, torch.full((16,), math.log(2), dtype=D), atol=1e-12, rtol=0)
    assert (chosen == 0).all() and (rejected == 0).all()
    assert dpo_metrics(losses, chosen, rejected, c, r)["rewards/accuracies"] == 0.0  # strict >
    # and the gradient is not zero there: ∂L/∂h = -β/2
    pc = c.clone().requires_grad_()
    dpo_loss(pc, r, c, r, beta=0.1)[0].sum().backward()
    torch.testing.assert_close(pc.grad, torch.full((16,), -0.05, dtype=D), atol=1e-12, rtol=0)


def test_gradient_signs_and_no_reference_gradient():
    g = torch.Generator().manual_seed(1)
    pc, pr, rc, rr = (-20 * torch.rand(8, generator=g, dtype=D) for _ in range(4))
    pc.requires_grad_(), pr.requires_grad_(), rc.requires_grad_(), rr.requires_grad_()
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.5)
    losses.mean().backward()
    assert (pc.grad < 0).all()  # raise the chosen log-prob
    assert (pr.grad > 0).all()  # lower the rejected one
    assert rc.grad is None and rr.grad is None


@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("sigmoid", 0.2), ("robust", 0.2),
                                           ("hinge", 0.0), ("ipo", 0.0)])
def test_finite_difference_gradients(loss_type, eps):
    """Central differences with step 1e-4 in float64 agree with autograd to 1e-7 (§5.3)."""
    g = torch.Generator().manual_seed(2)
    base = [-10 * torch.rand(6, generator=g, dtype=D) for _ in range(4)]
    beta = 0.3
    if loss_type == "hinge":  # stay away from the kink at βh = 1
        h = (base[0] - base[1]) - (base[2] - base[3])
        base[0] = base[0] - h + torch.tensor([-4.0, -2.0, 0.0, 1.0, 2.5, 10.0], dtype=D)
    pc, pr = base[0].clone().requires_grad_(), base[1].clone().requires_grad_()
    dpo_loss(pc, pr, base[2], base[3], beta, loss_type, eps)[0].sum().backward()

    def total(c: torch.Tensor, r: torch.Tensor) -> float:
        return dpo_loss(c, r, base[2], base[3], beta, loss_type, eps)[0].sum().item()

    step = 1e-4
    for which, grad in ((0, pc.grad), (1, pr.grad)):
        for i in range(6):
            plus, minus = [b.clone() for b in base[:2]], [b.clone() for b in base[:2]]
            plus[which][i] += step
            minus[which][i] -= step
            fd = (total(*plus) - total(*minus)) / (2 * step)
            assert fd == pytest.approx(grad[i].item(), abs=1e-7)


def test_sigmoid_antisymmetry():
    """Swapping chosen and rejected gives L(-h), and L(h) - L(-h) = -βh exactly."""
    g = torch.Generator().manual_seed(3)
    pc, pr, rc, rr = (-30 * torch.rand(10, generator=g, dtype=D) for _ in range(4))
    beta = 0.2
    fwd = dpo_loss(pc, pr, rc, rr, beta)[0]
    swapped = dpo_loss(pr, pc, rr, rc, beta)[0]
    h = (pc - pr) - (rc - rr)
    torch.testing.assert_close(fwd - swapped, -beta * h, atol=1e-12, rtol=0)


def test_robust_is_unbiased():
    """(1-ε)·L_rob(h) + ε·L_rob(-h) = -log σ(βh) for every h and ε (rDPO's defining property)."""
    g = torch.Generator().manual_seed(4)
    pc, pr = -30 * torch.rand(10, generator=g, dtype=D), -30 * torch.rand(10, generator=g, dtype=D)
    zero = torch.zeros(10, dtype=D)
    beta = 0.1
    for eps in (0.0, 0.1, 0.25, 0.45):
        fwd = dpo_loss(pc, pr, zero, zero, beta, "robust", eps)[0]
        back = dpo_loss(pr, pc, zero, zero, beta, "robust", eps)[0]
        expected = torch.tensor([nls(beta * (c - r)) for c, r in zip(pc.tolist(), pr.tolist())],
                                dtype=D)
        torch.testing.assert_close((1 - eps) * fwd + eps * back, expected, atol=1e-12, rtol=0)
    # the notes' example: βh = 1, ε = 0.1
    one, zero1 = t(10.0), t(0.0)
    assert dpo_loss(one, zero1, zero1, zero1, 0.1, "robust", 0.1)[0].item() == pytest.approx(
        0.1882617, abs=5e-8)
    assert dpo_loss(zero1, one, zero1, zero1, 0.1, "robust", 0.1)[0].item() == pytest.approx(
        1.4382617, abs=5e-8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_numerical_stability(dtype):
    z = torch.zeros(1, dtype=dtype)
    pc = torch.tensor([200.0], dtype=dtype, requires_grad=True)  # βh = 20
    loss = dpo_loss(pc, z, z, z, beta=0.1)[0]
    assert loss.item() == pytest.approx(math.log1p(math.exp(-20)), rel=1e-5)  # 2.06e-9
    assert loss.item() == pytest.approx(2.06e-9, rel=1e-3)
    pr = torch.tensor([2000.0], dtype=dtype, requires_grad=True)  # βh = -200: loss 200, not inf
    loss = dpo_loss(z, pr, z, z, beta=0.1)[0]
    assert loss.item() == pytest.approx(200.0, rel=1e-6)
    loss.backward()
    assert torch.isfinite(pr.grad).all() and pr.grad.item() == pytest.approx(0.1, rel=1e-6)


def test_bad_arguments_raise():
    x = t(-1.0)
    with pytest.raises(ValueError, match="sigmoid.*robust.*hinge.*ipo"):
        dpo_loss(x, x, x, x, beta=0.1, loss_type="simpo")
    with pytest.raises(ValueError):
        # divides by 1 - 2ε = 0
        dpo_loss(x, x, x, x, beta=0.1, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError):
        dpo_loss(x, x, x, x, beta=0.1, loss_type="sigmoid", label_smoothing=0.6)
    with pytest.raises(ValueError):
        # would be silently ignored
        dpo_loss(x, x, x, x, beta=0.1, loss_type="ipo", label_smoothing=0.1)


# --- §5.4 sequence log-probs and masking ---

def completion_mask(prompt_len: int, completion_len: int, pad: int = 0) -> torch.Tensor:
    return torch.tensor([[0] * prompt_len + [1] * completion_len + [0] * pad])


@pytest.mark.parametrize("prompt_len", [1, 2, 5])
def test_uniform_logits(prompt_len):
    T = prompt_len + 3
    logits = torch.zeros(1, T, 4)
    ids = torch.arange(T).remainder(4).unsqueeze(0)
    mask = completion_mask(prompt_len, 3)
    assert sequence_logps(logits, ids, mask).item() == pytest.approx(-4.1588831, abs=1e-6)
    assert sequence_logps(logits, ids, mask).item() == pytest.approx(-3 * math.log(4), rel=1e-6)
    assert sequence_logps(logits, ids, mask, average=True).item() == pytest.approx(-1.3862944,
                                                                                   abs=1e-6)


def test_off_by_one_detector():
    """Position t puts +10 on token ids[t+1]; only the correct shift scores ~0 per token."""
    ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2]])  # no token repeats its predecessor
    T = ids.shape[1]
    logits = torch.zeros(1, T, 4, dtype=D)
    for pos in range(T - 1):
        logits[0, pos, ids[0, pos + 1]] = 10.0
    mask = completion_mask(3, 4)
    per_token = -math.log1p(3 * math.exp(-10))  # 10 - log(e^10 + 3)
    assert per_token == pytest.approx(-1.3619e-4, rel=1e-4)
    assert sequence_logps(logits, ids, mask, average=True).item() == pytest.approx(per_token,
                                                                                   rel=1e-9)
    assert sequence_logps(logits, ids, mask).item() == pytest.approx(4 * per_token, rel=1e-9)


def random_batch(seed: int, B: int = 3, T: int = 9, V: int = 11, dtype=D):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(B, T, V, generator=g)).to(dtype)
    ids = torch.randint(0, V, (B, T), generator=g)
    # rows: prompt 2 + completion 7; prompt 4 + completion 3 + 2 pads;
    # prompt 1 + completion 5 + 3 pads
    mask = torch.cat([completion_mask(2, 7), completion_mask(4, 3, 2), completion_mask(1, 5, 3)])
    return logits, ids, mask


def test_equals_cross_entropy():
    logits, ids, mask = random_batch(0)
    labels = ids.masked_fill(mask == 0, -100)
    for average in (False, True):
        got = sequence_logps(logits, ids, mask, average=average)
        for b in range(ids.shape[0]):
            ce = F.cross_entropy(logits[b, :-1], labels[b, 1:], ignore_index=-100, reduction="sum")
            expected = -ce / mask[b, 1:].sum() if average else -ce
            assert got[b].item() == pytest.approx(expected.item(), abs=1e-10)


def test_prompt_positions_do_not_matter():
    logits, ids, mask = random_batch(1)
    before = sequence_logps(logits, ids, mask)
    g = torch.Generator().manual_seed(5)
    # position t predicts token t+1: positions whose next token is prompt (or pad) are not scored
    unscored = torch.zeros_like(mask, dtype=torch.bool)
    unscored[:, :-1] = mask[:, 1:] == 0
    unscored[:, -1] = True  # the last position predicts nothing
    changed = logits.clone()
    changed[unscored] = 100 * torch.randn(int(unscored.sum()), logits.shape[-1], generator=g,
                                          dtype=D)
    other_ids = ids.clone()
    # different prompt and pad tokens
    other_ids[mask == 0] = (ids[mask == 0] + 1) % logits.shape[-1]
    torch.testing.assert_close(sequence_logps(changed, other_ids, mask), before, atol=1e-12, rtol=0)
    # even -inf there (log-prob -inf of an unscored token) must not leak in as nan
    changed[0, 0, other_ids[0, 1]] = -math.inf
    torch.testing.assert_close(sequence_logps(changed, other_ids, mask), before, atol=1e-12, rtol=0)
    # the test can fail: touching one scored position (the first completion target of row 0) does
    # change it
    changed[0, 1] += torch.randn(logits.shape[-1], generator=g, dtype=D)
    assert (sequence_logps(changed, ids, mask) - before)[0].abs() > 1e-3


def test_right_padding_invariance():
    logits, ids, mask = random_batch(2)
    B, _, V = logits.shape
    g = torch.Generator().manual_seed(6)
    k = 4
    padded_logits = torch.cat([logits, torch.randn(B, k, V, generator=g, dtype=D)], dim=1)
    padded_ids = torch.cat([ids, torch.zeros(B, k, dtype=ids.dtype)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(B, k, dtype=mask.dtype)], dim=1)
    for average in (False, True):
        torch.testing.assert_close(sequence_logps(padded_logits, padded_ids, padded_mask, average),
                                   sequence_logps(logits, ids, mask, average), atol=1e-12, rtol=0)


def test_bf16_logits_are_upcast():
    logits, ids, mask = random_batch(3, V=257, dtype=torch.float32)
    out_bf16 = sequence_logps(logits.bfloat16(), ids, mask)
    assert out_bf16.dtype == torch.float32
    # ≈ the fp32 answer (bf16 keeps ~3 significant digits of each logit) ...
    torch.testing.assert_close(out_bf16, sequence_logps(logits, ids, mask), atol=0.15, rtol=0.01)
    # ... and exactly the fp32 computation on the rounded logits: log_softmax itself ran in fp32
    labels = ids.masked_fill(mask == 0, -100)
    rounded = logits.bfloat16().double()
    for b in range(ids.shape[0]):
        ce = F.cross_entropy(rounded[b, :-1], labels[b, 1:], ignore_index=-100, reduction="sum")
        assert out_bf16[b].item() == pytest.approx(-ce.item(), abs=1e-4)
