"""train_ppo.py's math against hand-computed values and plain-Python float64 re-derivations."""

import math
import random

import pytest
import torch

import train_ppo as ppo


def test_masked_mean_by_hand():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 100.0, 100.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert ppo.masked_mean(x, mask).item() == pytest.approx(2.0)  # (1 + 2 + 3) / 3
    torch.testing.assert_close(ppo.masked_mean(x, mask, dim=1), torch.tensor([1.5, 3.0]))


def test_masked_whiten_uses_real_tokens_only():
    x = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 5.0, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    real = [1.0, 2.0, 3.0, 4.0, 5.0]
    mean = sum(real) / 5  # 3
    var = sum((v - mean) ** 2 for v in real) / 4  # Bessel: 10 / 4 = 2.5
    white = ppo.masked_whiten(x, mask, eps=0.0)
    expected = [[(v - mean) / math.sqrt(var) for v in row] for row in ([1, 2, 3], [4, 5])]
    assert white[0, :3].tolist() == pytest.approx(expected[0], abs=1e-12)
    assert white[1, :2].tolist() == pytest.approx(expected[1], abs=1e-12)
    assert white[0, 3] == 0 and white[1, 2:].abs().sum() == 0  # padding comes back as 0
    # padding values change nothing
    x2 = x.clone()
    x2[1, 2:] = 1e6
    torch.testing.assert_close(ppo.masked_whiten(x2, mask, eps=0.0), white)
    # shift_mean=False: the same scale, the mean kept
    kept = ppo.masked_whiten(x, mask, shift_mean=False, eps=0.0)
    assert kept[0, 0].item() == pytest.approx((1 - mean) / math.sqrt(var) + mean, abs=1e-12)
    assert ppo.masked_mean(kept, mask).item() == pytest.approx(mean, abs=1e-12)


def reference_gae(rewards: list[float], values: list[float], gamma: float, lam: float
                  ) -> tuple[list, list]:
    """The recursion unrolled in plain Python floats, for one unpadded response."""
    T, adv = len(rewards), [0.0] * len(rewards)
    for t in range(T):  # A_t = Σ_l (γλ)^l δ_{t+l}, the closed form (GAE paper eq. 16)
        for l in range(T - t):
            next_v = values[t + l + 1] if t + l + 1 < T else 0.0
            delta = rewards[t + l] + gamma * next_v - values[t + l]
            adv[t] += (gamma * lam) ** l * delta
    return adv, [a + v for a, v in zip(adv, values)]


def test_gae_by_hand():
    # r = (0, 0, 1), V = (0.5, 0.2, 0.1), γ = 1, λ = 0.5:
    # δ = (0 + 0.2 - 0.5, 0 + 0.1 - 0.2, 1 + 0 - 0.1) = (-0.3, -0.1, 0.9)
    # A_2 = 0.9, A_1 = -0.1 + 0.5·0.9 = 0.35, A_0 = -0.3 + 0.5·0.35 = -0.125
    rewards = torch.tensor([[0.0, 0.0, 1.0, 7.0]], dtype=torch.float64)  # the 7 sits on padding
    values = torch.tensor([[0.5, 0.2, 0.1, 3.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0]])
    adv, ret = ppo.gae(rewards, values, mask, 1.0, 0.5)
    assert adv[0].tolist() == pytest.approx([-0.125, 0.35, 0.9, 0.0], abs=1e-12)
    assert ret[0].tolist() == pytest.approx([0.375, 0.55, 1.0, 0.0], abs=1e-12)


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.5), (0.99, 1.0), (1.0, 0.0)])
def test_gae_matches_unrolled_recursion_on_padded_rows(gamma, lam):
    rng = random.Random(0)
    lengths, L = [5, 1, 3, 5], 5
    rewards = [[rng.uniform(-1, 1) for _ in range(L)] for _ in lengths]
    values = [[rng.uniform(-1, 1) for _ in range(L)] for _ in lengths]
    mask = torch.tensor([[1] * n + [0] * (L - n) for n in lengths])
    adv, ret = ppo.gae(torch.tensor(rewards, dtype=torch.float64),
                       torch.tensor(values, dtype=torch.float64), mask, gamma, lam)
    for i, n in enumerate(lengths):
        want_adv, want_ret = reference_gae(rewards[i][:n], values[i][:n], gamma, lam)
        assert adv[i, :n].tolist() == pytest.approx(want_adv, abs=1e-12)
        assert ret[i, :n].tolist() == pytest.approx(want_ret, abs=1e-12)
        assert adv[i, n:].abs().sum() == 0 and ret[i, n:].abs().sum() == 0


def test_score_goes_on_the_last_real_token_only():
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    rewards = ppo.per_token_rewards(torch.tensor([2.0, -1.0]), kl, mask, kl_coef=0.5)
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, -0.1, -0.15 + 2.0],
                                                      [-0.25 - 1.0, 0.0, 0.0]]))
    assert ppo.last_token_mask(mask).tolist() == [[False, False, True], [True, False, False]]
    # an empty row has none
    assert not ppo.last_token_mask(torch.zeros(1, 3, dtype=torch.long)).any()


def test_policy_loss_values_and_gradients_on_both_sides_of_the_clip():
    """ε = 0.2. ρ = 1.5 or 0.5 with A = +1 or -1:
      A=+1, ρ=1.5: max(-1.5, -1.2) = -1.2, clipped: gradient 0
      A=+1, ρ=0.5: max(-0.5, -0.8) = -0.5, d/dlogπ (-Aρ) = -ρ = -0.5
      A=-1, ρ=1.5: max(1.5, 1.2) = 1.5, gradient -Aρ = +1.5
      A=-1, ρ=0.5: max(0.5, 0.8) = 0.8, clipped: gradient 0"""
    old = torch.zeros(4, dtype=torch.float64)
    logp = torch.tensor([math.log(1.5), math.log(0.5), math.log(1.5), math.log(0.5)],
                        dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0], dtype=torch.float64)
    loss, clipped, approx_kl = ppo.policy_loss(logp, old, adv, 0.2)
    assert loss.tolist() == pytest.approx([-1.2, -0.5, 1.5, 0.8], abs=1e-12)
    assert clipped.tolist() == [1.0, 0.0, 0.0, 1.0]
    assert approx_kl.tolist() == pytest.approx([0.5 - math.log(1.5), -0.5 - math.log(0.5)] * 2,
                                               abs=1e-12)
    loss.sum().backward()
    assert logp.grad.tolist() == pytest.approx([0.0, -0.5, 1.5, 0.0], abs=1e-12)


def test_policy_loss_at_ratio_one_is_the_policy_gradient():
    logp = torch.tensor([-1.0, -2.0], dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([0.7, -0.3], dtype=torch.float64)
    loss, clipped, approx_kl = ppo.policy_loss(logp, logp.detach(), adv, 0.2)
    loss.sum().backward()
    assert loss.tolist() == pytest.approx([-0.7, 0.3])
    assert clipped.sum() == 0 and approx_kl.abs().sum() == 0
    assert logp.grad.tolist() == pytest.approx([-0.7, 0.3])  # -A·∇log π: REINFORCE


def test_value_loss_values_and_gradients_on_both_sides_of_the_clip():
    """ε_v = 0.2, V_old = 0.5, so clip(V) ∈ [0.3, 0.7]:
      V=1.0, R=0: ½max(1.0², 0.7²) = 0.5, unclipped: dV = V - R = 1.0
      V=1.0, R=2: ½max(1.0², 1.3²) = 0.845, clipped term wins and is flat in V: dV = 0
      V=0.6, R=2: inside the clip, both terms 1.4²: 0.98, dV = V - R = -1.4"""
    values = torch.tensor([1.0, 1.0, 0.6], dtype=torch.float64, requires_grad=True)
    old = torch.full((3,), 0.5, dtype=torch.float64)
    returns = torch.tensor([0.0, 2.0, 2.0], dtype=torch.float64)
    loss, clipped = ppo.value_loss(values, old, returns, 0.2)
    assert loss.tolist() == pytest.approx([0.5, 0.845, 0.98], abs=1e-12)
    assert clipped.tolist() == [0.0, 1.0, 0.0]
    loss.sum().backward()
    assert values.grad.tolist() == pytest.approx([1.0, 0.0, -1.4], abs=1e-12)


def test_value_clip_keeps_an_unclipped_value_exactly():
    """V = 0.03 lies within ε_v = 0.2 of V_old = 0.1: not clipped, so its loss is the unclipped
    ½(V - R)² and its clipfrac 0. In float32, V_old + clamp(V - V_old, -ε_v, ε_v) lands one ulp
    above 0.03, whose larger squared error the old formula counted as clipped (issue 26)."""
    values = torch.tensor([0.03], requires_grad=True)  # float32
    old, returns = torch.tensor([0.1]), torch.tensor([0.0])
    one_ulp_above = torch.nextafter(values.detach(), torch.tensor(1.0))
    assert torch.equal(old + torch.clamp(values.detach() - old, -0.2, 0.2), one_ulp_above)
    loss, clipped = ppo.value_loss(values, old, returns, 0.2)
    assert clipped.tolist() == [0.0]
    assert torch.equal(loss, 0.5 * (values.detach() - returns) ** 2)
    loss.sum().backward()
    assert values.grad.tolist() == pytest.approx([0.03])  # dV = V - R


@pytest.mark.parametrize("p, q", [([0.5, 0.3, 0.2], [0.2, 0.2, 0.6]),
                                  ([0.9, 0.05, 0.05], [1 / 3] * 3),
                                  ([0.25, 0.25, 0.25, 0.25], [0.1, 0.2, 0.3, 0.4])])
def test_kl_estimators_are_unbiased_under_exact_enumeration(p, q):
    """E_{a~p}[k1] = E_{a~p}[k3] = KL(p‖q) = Σ p log(p/q), summing over every action with its
    probability."""
    exact = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    logp = torch.tensor(p, dtype=torch.float64).log()
    logq = torch.tensor(q, dtype=torch.float64).log()
    weights = torch.tensor(p, dtype=torch.float64)
    k1, k3 = ppo.kl_k1(logp, logq), ppo.kl_k3(logp, logq)
    assert float((weights * k1).sum()) == pytest.approx(exact, abs=1e-12)
    assert float((weights * k3).sum()) == pytest.approx(exact, abs=1e-12)
    assert (k3 >= 0).all()  # every k3 sample is ≥ 0; k1 samples are not
    assert (k1 < 0).any()
    ratio = [qi / pi for pi, qi in zip(p, q)]  # k3 by hand: (ρ - 1) - log ρ, ρ = q/p
    assert k3.tolist() == pytest.approx([r - 1 - math.log(r) for r in ratio], abs=1e-12)
    assert ppo.kl_estimate(logp, logq, "k3").tolist() == k3.tolist()
    with pytest.raises(ValueError, match="k2"):
        ppo.kl_estimate(logp, logq, "k2")


def test_group_advantages_by_hand():
    scores = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [1.0, 1.0, 4.0]], dtype=torch.float64)
    adv = ppo.group_advantages(scores, eps=1e-4)
    # row 0: mean 2, unbiased std 1 -> (-1, 0, 1)/(1 + 1e-4); row 1: all tied -> 0
    assert adv[0].tolist() == pytest.approx([-1 / 1.0001, 0.0, 1 / 1.0001], abs=1e-12)
    assert adv[1].tolist() == [0.0, 0.0, 0.0]
    # row 2: mean 2, std √((1 + 1 + 4)/2) = √3
    assert adv[2].tolist() == pytest.approx([-1 / (3 ** 0.5 + 1e-4)] * 2 + [2 / (3 ** 0.5 + 1e-4)],
                                            abs=1e-12)
    dr = ppo.group_advantages(scores, scale_by_std=False)  # Dr.GRPO: centred only
    assert dr[2].tolist() == pytest.approx([-1.0, -1.0, 2.0], abs=1e-12)


def test_rloo_baseline_is_the_mean_of_the_others():
    scores = torch.tensor([[1.0, 2.0, 3.0], [5.0, -1.0, 0.5]], dtype=torch.float64)
    adv = ppo.rloo_advantages(scores)
    assert adv[0].tolist() == pytest.approx([1 - 2.5, 2 - 2.0, 3 - 1.5], abs=1e-12)
    assert adv[1].tolist() == pytest.approx([5 - (-0.25), -1 - 2.75, 0.5 - 2.0], abs=1e-12)
    # with G samples the RLOO advantage is G/(G-1) x (r - mean): a known identity
    torch.testing.assert_close(adv, 1.5 * (scores - scores.mean(-1, keepdim=True)))


def test_entropy_from_logits():
    probs = [0.5, 0.25, 0.125, 0.125]
    logits = torch.tensor([probs], dtype=torch.float64).log() + 3.0  # a shift changes nothing
    expected = -sum(p * math.log(p) for p in probs)  # 1.75 bits = 1.2130... nats
    assert ppo.entropy_from_logits(logits).item() == pytest.approx(expected, abs=1e-12)
    assert ppo.entropy_from_logits(torch.zeros(2, 8)).tolist() == pytest.approx([math.log(8)] * 2,
                                                                               abs=1e-6)
    assert ppo.entropy_from_logits(torch.zeros(3, dtype=torch.bfloat16)).dtype == torch.float32
