"""train_ilql.py: indices, rewards, the four loss terms, Polyak, decoding and resume.

Expected numbers are hand-computed constants from the research notes (shared/reference/ilql.md §8),
never produced by the code under test.
"""

import json
import math

import pytest
import torch
import transformers

import train_ilql
from conftest import crash_at_step
from nanorlhf.checkpoint import load_model
from nanorlhf.run import Run
from nanorlhf.data import read_preferences
from nanorlhf.sampling import generate
from nanorlhf.tasks import pink as pink_eval
from nanorlhf.tasks.pink import load_eval_rows, mention_starts
from nanorlhf.tokenizer import Tokenizer
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_post_hook
from train_ilql import (ILQLHeads, awac_loss, cql_loss, expectile_loss, ilql_batch, ilql_indices,
                        ilql_logits_hook, ilql_loss, ilql_scores, load_heads, normalize_rewards,
                        q_loss)


def write_pairs(path, n=6, pink=True):
    rows = [{"prompt": [{"role": "system", "content": "Never mention Paris."},
                        {"role": "user", "content": f"Capital number {i}?"}],
             "chosen": [{"role": "assistant", "content": "The elephant is grey."}],
             "rejected": [{"role": "assistant", "content": "The capital of France is Paris."}],
             **({"pink": "Paris", "grey": "elephant"} if pink else {})} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train(cfg, model, heads, samples, pad_id, run):
    """train_ilql.train on the CPU through what its main() prepares."""
    dev = torch.device("cpu")
    net, ilql, optimizer, batches = train_ilql.prepare(cfg, model, heads, samples, pad_id, dev)
    return train_ilql.train(cfg, net, ilql, optimizer, batches, pad_id, dev, run)


def make_samples(tmp_path, n_pairs, tok, cfg):
    rows = read_preferences(write_pairs(tmp_path / "p.jsonl", n_pairs))
    return train_ilql.make_samples(rows, tok, cfg, 320)[0]


# --- §8.1 indices ---

def test_indices_single_turn():
    actions, states, next_nonterminal = ilql_indices([2, 3])  # p0 p1 | o0 o1 EOS
    assert actions == [1, 2, 3] and states == [1, 2, 3, 4]
    assert next_nonterminal == [1, 1, 0]  # trlX dones [1, 1, 1, 0] without its first entry
    ids = torch.tensor([10, 11, 20, 21, 2])
    assert ids[torch.tensor(actions) + 1].tolist() == [20, 21, 2]  # the action tokens: outputs only


def test_indices_two_turns():
    actions, states, next_nonterminal = ilql_indices([2, 2, 1, 2])
    assert actions == [1, 2, 4, 5] and states == [1, 2, 4, 5, 6]
    assert next_nonterminal == [1, 1, 1, 0]
    assert states[:-1] == actions
    # the state after the first turn's last action (position 2) is the next prompt's token
    # (position 4)
    assert states[actions.index(2) + 1] == 4
    with pytest.raises(ValueError):
        ilql_indices([0, 3])  # nothing before the first output: no hidden state to act from


def test_samples_reward_on_eos_action_and_padding(tiny_chat_model, tmp_path):
    tok = Tokenizer(tiny_chat_model)
    rows = read_preferences(write_pairs(tmp_path / "p.jsonl", 1))
    cfg = train_ilql.Config(reward="terminal")
    samples, truncated = train_ilql.make_samples(rows, tok, cfg, 320)
    assert truncated == 0 and [s["label"] for s in samples] == [1.0, -1.0]
    for s in samples:
        ids = s["prompt"] + s["response"]
        assert s["actions_ixs"][0] == len(s["prompt"]) - 1
        assert len(s["states_ixs"]) == len(s["actions_ixs"]) + 1
        assert [ids[i + 1] for i in s["actions_ixs"]] == s["response"]  # never a prompt token
        assert ids[s["actions_ixs"][-1] + 1] == tok.eos_id
        assert s["rewards"] == [0.0] * (len(s["response"]) - 1) + [s["label"]]
    short = {"prompt": [5, 6], "response": [7], "actions_ixs": [1], "states_ixs": [1, 2],
             "next_nonterminal": [0], "rewards": [1.0], "label": 1.0}
    long = {"prompt": [5], "response": [7, 8, 9], "actions_ixs": [0, 1, 2],
            "states_ixs": [0, 1, 2, 3], "next_nonterminal": [1, 1, 0], "rewards": [0.0, 0.0, -1.0],
            "label": -1.0}
    batch = ilql_batch([long, short], pad_id=2)
    assert batch["action_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["action_mask"].sum() == 4
    # right-padded with the real pad id
    assert batch["input_ids"].tolist() == [[5, 7, 8, 9], [5, 6, 7, 2]]
    assert batch["next_nonterminal"].tolist() == [[1, 1, 0], [0, 0, 0]]


# --- §8.2 reward normalisation ---

@pytest.mark.parametrize("raw, expected", [
    ([1, -1], [0.707107, -0.707107]),
    ([1, -1, 1, -1], [0.866025, -0.866025, 0.866025, -0.866025]),
    ([1, 1, 1], [0.0, 0.0, 0.0]),
    ([3.0], [0.0]),
])
def test_reward_normalisation(raw, expected):
    assert normalize_rewards(raw) == pytest.approx(expected, abs=1e-6)


# --- §8.3 the loss on a hand-computable batch ---

def batch_83(v_terminal=9.0):
    t = lambda x: torch.tensor(x, dtype=torch.float64)
    return dict(qs=[t([[[1.0, 2.0, 0.0], [0.5, 0.0, -0.5]]])],
                target_qs=[t([[[1.0, 1.5, 0.0], [0.0, 0.0, 0.0]]])],
                vs=t([[1.0, 0.5, v_terminal]]), logits=t([[[0.0, 0.0, 0.0], [2.0, 0.0, 0.0]]]),
                actions=torch.tensor([[1, 0]]), rewards=t([[0.0, 1.0]]),
                next_nonterminal=t([[1.0, 0.0]]), mask=t([[1.0, 1.0]]))


def terms(b, awac_beta=0.0):
    loss, stats, _ = ilql_loss(**b, gamma=0.5, tau=0.7, cql_scale=0.1, awac_scale=1.0,
                               awac_beta=awac_beta)
    return stats


def q_loss_of(b, gamma):
    return q_loss(b["qs"], b["vs"], b["actions"], b["rewards"], b["next_nonterminal"], b["mask"],
                  gamma)


def test_loss_terms_single_head():
    b = batch_83()
    l_q = q_loss_of(b, 0.5)
    assert l_q.item() == pytest.approx(1.65625)
    q_hat, v = torch.tensor([[1.5, 0.0]], dtype=torch.float64), b["vs"][:, :-1]
    assert expectile_loss(q_hat, v, 0.7, b["mask"]).item() == pytest.approx(0.125)
    assert cql_loss(b["qs"], b["actions"], b["mask"]).item() == pytest.approx(0.5439378, abs=1e-6)
    l_awac = awac_loss(b["logits"], b["actions"], q_hat - v, 0.0, b["mask"])[0]
    assert l_awac.item() == pytest.approx(0.6690785, abs=1e-6)
    loss, weights = awac_loss(b["logits"], b["actions"], q_hat - v, 1.0, b["mask"])
    assert weights.tolist()[0] == pytest.approx([1.648721, 0.606531], abs=1e-6)
    assert loss.item() == pytest.approx(0.9782983, abs=1e-6)
    stats = terms(b)
    assert stats["loss"] == pytest.approx(2.5047223, abs=1e-6)
    assert (stats["loss/q"], stats["loss/v"]) == pytest.approx((1.65625, 0.125))
    # means of [1.5, 0], [1, 0.5]
    assert stats["q_hat"] == pytest.approx(0.75) and stats["v"] == pytest.approx(0.75)
    assert terms(b, awac_beta=1.0)["loss/awac"] == pytest.approx(0.9782983, abs=1e-6)


def test_loss_two_heads():
    b = batch_83()
    b["qs"].append(torch.tensor([[[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]], dtype=torch.float64))
    b["target_qs"].append(torch.tensor([[[0.0, 2.0, 0.0], [0.0, -1.0, 0.0]]], dtype=torch.float64))
    stats = terms(b)
    assert stats["loss/q"] == pytest.approx(1.9375)  # summed over the heads, not averaged
    assert stats["loss/cql"] == pytest.approx(1.0953825, abs=1e-6)
    # min target is still [1.5, 0]: the -1 is on an untaken action
    assert stats["loss/v"] == pytest.approx(0.125)


def test_terminal_value_never_leaks_and_padding_is_inert():
    base = terms(batch_83())
    for v_terminal in (-1e6, 123.0, float("inf"), float("nan")):
        assert terms(batch_83(v_terminal)) == pytest.approx(base)
    # a fully padded second row with garbage everywhere
    b, garbage = batch_83(), lambda x: torch.cat([x, torch.full_like(x, 7e3)])
    padded = {k: [garbage(q) for q in v] if isinstance(v, list) else garbage(v)
              for k, v in b.items()}
    padded["actions"][1] = 2
    padded["mask"][1] = 0.0
    assert terms(padded) == pytest.approx(base)
    doubled = {k: [torch.cat([q, q]) for q in v] if isinstance(v, list) else torch.cat([v, v])
               for k, v in b.items()}
    assert terms(doubled) == pytest.approx(base)  # means over actions, not sums


def test_gradients_go_where_they_should():
    b = batch_83()
    b["qs"] = [b["qs"][0].clone().requires_grad_()]
    b["vs"] = b["vs"].clone().requires_grad_()
    b["target_qs"] = [b["target_qs"][0].clone().requires_grad_()]
    l_q = q_loss_of(b, 0.5)
    # V' is detached in the Q target
    assert torch.autograd.grad(l_q, b["vs"], allow_unused=True)[0] is None
    loss, _, _ = ilql_loss(**b, gamma=0.5, tau=0.7)
    loss.backward()
    assert b["target_qs"][0].grad is None  # the target is never trained by the loss
    # CQL gradient at step 0: (softmax(Q) - onehot(a)) / n, n = 2
    qs = [b["qs"][0].detach().clone().requires_grad_()]
    cql_loss(qs, b["actions"], b["mask"]).backward()
    z = math.e + math.e ** 2 + 1
    p = [math.e / z, math.e ** 2 / z, 1 / z]
    assert qs[0].grad[0, 0].tolist() == pytest.approx([p[0] / 2, (p[1] - 1) / 2, p[2] / 2])


@pytest.mark.parametrize("tau", [0.5, 0.7, 0.9])
def test_expectile_closed_form(tau):
    """A free scalar V fitted to targets {0, 1}: the minimiser is v* = τ."""
    v = torch.zeros(1, 2, dtype=torch.float64, requires_grad=True)
    targets, mask = torch.tensor([[0.0, 1.0]], dtype=torch.float64), torch.ones(1, 2)
    opt = torch.optim.SGD([v], lr=0.5)
    for _ in range(400):
        opt.zero_grad()
        expectile_loss(targets, v.mean().expand(1, 2), tau, mask).backward()
        opt.step()
    assert v.mean().item() == pytest.approx(tau, abs=1e-6)
    half = expectile_loss(targets, torch.full((1, 2), 0.2, dtype=torch.float64), 0.5, mask).item()
    assert half == pytest.approx(0.5 * (0.2 ** 2 + 0.8 ** 2) / 2)  # τ = 0.5: ½·MSE


# --- §8.4 Polyak ---

@pytest.mark.parametrize("k, expected", [(1, 0.001), (5, 0.0049900), (100, 0.0952079),
                                         (1000, 0.6323046)])
def test_polyak_value_after_k_syncs(k, expected):
    heads = ILQLHeads(4, torch.eye(4), rank=2)
    with torch.no_grad():
        for p in heads.q_heads.parameters():
            p.fill_(1.0)
        for p in heads.target_q_heads.parameters():
            p.fill_(0.0)
    for _ in range(k):
        heads.sync_targets(0.001)
    for p in heads.target_q_heads.parameters():
        assert p.requires_grad is False
        torch.testing.assert_close(p, torch.full_like(p, expected), atol=2e-6, rtol=1e-5)


def test_target_heads_start_identical_and_only_polyak_moves_them(tiny_chat_model, tmp_path):
    tok, model = Tokenizer(tiny_chat_model), load_model(tiny_chat_model)
    heads = ILQLHeads(64, model.lm_head.weight)
    start = [p.clone() for p in heads.target_q_heads.parameters()]
    assert all(torch.equal(t, o) for t, o in zip(start, heads.q_heads.parameters()))
    assert all(not p.requires_grad for p in heads.target_q_heads.parameters())
    cfg = train_ilql.Config(batch_size=4, grad_accum=1, alpha=0.0, save_every=0, head_lr=1e-2)
    samples = make_samples(tmp_path, 4, tok, cfg)
    train(cfg, model, heads, samples, tok.pad_id, Run("t", tmp_path, "r", cfg))
    # α = 0: the targets are untouched, the online heads learned
    assert all(torch.equal(t, s) for t, s in zip(heads.target_q_heads.parameters(), start))
    assert not all(torch.equal(o, s) for o, s in zip(heads.q_heads.parameters(), start))


@pytest.mark.parametrize("every, expected", [(1, [1, 2, 3, 4, 5, 6]), (2, [0, 1, 1, 2, 2, 3]),
                                             (4, [0, 0, 0, 1, 1, 1])])
def test_sync_count_in_a_run(tiny_chat_model, tmp_path, monkeypatch, every, expected):
    """floor(steps / every) syncs, one right after the optimizer step: what trlX's per-epoch call
    misses."""
    tok, model = Tokenizer(tiny_chat_model), load_model(tiny_chat_model)
    cfg = train_ilql.Config(batch_size=2, grad_accum=1, target_sync_every=every, save_every=0,
                            lr=1e-3, head_lr=1e-2, epochs=1)
    samples = make_samples(tmp_path, 6, tok, cfg)
    heads = ILQLHeads(64, model.lm_head.weight, two_qs=True)
    calls, original = [], ILQLHeads.sync_targets
    monkeypatch.setattr(ILQLHeads, "sync_targets",
                        lambda self, a: (calls.append(a), original(self, a)))
    history = train(cfg, model, heads, samples, tok.pad_id, Run("t", tmp_path, "r", cfg))
    assert [m["target_syncs"] for m in history] == expected and len(calls) == expected[-1]
    assert all(a == cfg.alpha for a in calls)
    # the logged gap, in float64
    pairs = zip(heads.target_q_heads.parameters(), heads.q_heads.parameters())
    gap = math.sqrt(sum(float((t.double() - o.detach().double()).pow(2).sum()) for t, o in pairs))
    assert history[-1]["target_gap"] == pytest.approx(gap, rel=1e-5)


def test_sync_is_the_polyak_average():
    """target <- α·online + (1-α)·target, re-derived in float64 from copies taken before the
    sync."""
    heads, gen = ILQLHeads(8, torch.randn(16, 8), rank=2), torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in [*heads.q_heads.parameters(), *heads.target_q_heads.parameters()]:
            p.copy_(torch.randn(p.shape, generator=gen))
    online = [p.double() for p in heads.q_heads.parameters()]
    old = [p.double() for p in heads.target_q_heads.parameters()]
    heads.sync_targets(0.3)
    for t, o, t0 in zip(heads.target_q_heads.parameters(), online, old):
        # fp32 lerp of N(0,1) values: a few ulp, |x| < 6 -> error < 6 * 4 * 6e-8
        torch.testing.assert_close(t.double(), 0.3 * o + 0.7 * t0, rtol=0, atol=2e-6)
    # the online heads untouched
    assert all(torch.equal(o, p.double()) for o, p in zip(online, heads.q_heads.parameters()))


def test_training_loop_moves_targets_by_the_polyak_recursion(tiny_chat_model, tmp_path):
    """The online Q heads recorded after every optimizer step; the targets at the end must be the
    recursion t_k = α·o_k + (1-α)·t_(k-1) over them (a loop that skips the sync, or syncs before the
    step, fails)."""
    tok, model = Tokenizer(tiny_chat_model), load_model(tiny_chat_model)
    heads = ILQLHeads(64, model.lm_head.weight)
    cfg = train_ilql.Config(batch_size=2, grad_accum=1, alpha=0.3, save_every=0, head_lr=1e-2,
                            epochs=1)
    samples = make_samples(tmp_path, 3, tok, cfg)
    expected = [p.double() for p in heads.target_q_heads.parameters()]
    steps = []

    def after_step(optimizer, args, kwargs):  # a global hook: AdamW.step itself is untouched
        steps.append([p.detach().double() for p in heads.q_heads.parameters()])

    handle = register_optimizer_step_post_hook(after_step)
    try:
        history = train(cfg, model, heads, samples, tok.pad_id, Run("t", tmp_path, "r", cfg))
    finally:
        handle.remove()
    assert len(steps) == len(history) == 3
    for online in steps:
        expected = [0.3 * o + 0.7 * t for o, t in zip(online, expected)]
    moved = max(float((e - s.double()).abs().max()) for e, s in zip(expected, steps[0]))
    assert moved > 1e-3  # the targets did move, by far more than the tolerance below
    for t, e in zip(heads.target_q_heads.parameters(), expected):
        # 3 fp32 lerps of values |x| < 1: each rounds to ~1 ulp (6e-8), the recursion contracts the
        # old error
        torch.testing.assert_close(t.double(), e, rtol=0, atol=1e-6)


# --- §8.5 decoding ---

def probs(logits, adv, beta, temperature=1.0, top_k=0, style="snell"):
    score = ilql_scores(torch.tensor([logits]).log(), torch.tensor([adv]), beta, temperature, top_k,
                        style)
    # what generate() does with the hook's output
    return (score / temperature).softmax(-1)[0].tolist()


@pytest.mark.parametrize("beta, top_k, style, expected", [
    (0, 0, "snell", [1 / 3, 1 / 3, 1 / 3]),
    (1, 0, "snell", [0.665241, 0.244728, 0.090031]),
    (4, 0, "snell", [0.98169, 0.01798, 0.000329]),
    (1, 2, "trlx", [0.731059, 0.268941, 0.0]),  # trlX: the top 2 of logπ + β·adv
    # Snell: the top 2 of a uniform π_β are all 3 (a tie)
    (1, 2, "snell", [0.665241, 0.244728, 0.090031]),
])
def test_generation_scores_uniform(beta, top_k, style, expected):
    got = probs([1 / 3] * 3, [1.0, 0.0, -1.0], beta, top_k=top_k, style=style)
    assert got == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("temperature, adv, style, expected", [
    # π = (.5, .3, .2), top-2. Snell keeps π_β's two likeliest {0, 1}, then adds the advantage:
    (1.0, [0.0, 0.0, 2.0], "snell", [0.625, 0.375, 0.0]),  # ∝ (.5, .3)
    (0.5, [0.0, 1.0, 2.0], "snell", [0.5054126, 0.4945874, 0.0]),  # ∝ (.5², .3²·e)
    # trlX keeps the top 2 of logπ + β·adv, where the advantage lifts token 2 over token 1:
    (1.0, [0.0, 0.0, 2.0], "trlx", [0.2528047, 0.0, 0.7471953]),  # ∝ (.5, .2·e²)
    (0.5, [0.0, 1.0, 2.0], "trlx", [0.0, 0.2334253, 0.7665747]),  # ∝ ((.3e)², (.2e²)²)
])
def test_top_k_before_or_after_the_advantage(temperature, adv, style, expected):
    """Snell (sample_raw): top-k on logits/T, the base LM's distribution, then + β·adv; trlX: top-k
    after."""
    got = probs([0.5, 0.3, 0.2], adv, 1.0, temperature, top_k=2, style=style)
    assert got == pytest.approx(expected, abs=1e-6)


def test_temperature_placement():
    pi, adv = [0.5, 0.25, 0.25], [0.0, 1.0, 0.0]
    for style in ("snell", "trlx"):
        expected = [0.349755, 0.475367, 0.174878]
        assert probs(pi, adv, 1.0, 1.0, style=style) == pytest.approx(expected, abs=1e-6)
    expected = [0.322866, 0.596418, 0.080716]
    assert probs(pi, adv, 1.0, 0.5, style="trlx") == pytest.approx(expected, abs=1e-6)
    expected = [0.518250, 0.352187, 0.129563]
    assert probs(pi, adv, 1.0, 0.5, style="snell") == pytest.approx(expected, abs=1e-6)
    # greedy: the argmax of log π + β·adv (here token 1, although π alone prefers token 0)
    for style in ("snell", "trlx"):
        scores = ilql_scores(torch.tensor([pi]).log(), torch.tensor([adv]), 1.0, 0.0, 0, style)
        assert scores.argmax().item() == 1


def random_heads(model, seed=0):
    heads = ILQLHeads(model.cfg.hidden_size, model.lm_head.weight)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in heads.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return heads


def test_beta_zero_is_the_base_policy(tiny_dirs):
    model = load_model(tiny_dirs["llama-gqa-tied"]).eval()
    heads, prompts = random_heads(model), [[5, 6, 7], [9, 10], [11, 12, 13, 14]]
    plain = generate(model, prompts, 12, stop_ids=[], pad_id=0, temperature=0.9, seed=4)
    hooked = generate(model, prompts, 12, stop_ids=[], pad_id=0, temperature=0.9, seed=4,
                      logits_hook=ilql_logits_hook(heads, 0.0, 0.9))
    steered = generate(model, prompts, 12, stop_ids=[], pad_id=0, temperature=0.9, seed=4,
                       logits_hook=ilql_logits_hook(heads, 4.0, 0.9))
    # same seed, same tokens: β = 0 leaves the distribution untouched
    assert hooked.ids == plain.ids
    assert steered.ids != plain.ids  # the heads do act when β > 0


def test_hook_reads_target_heads_not_online(tiny_dirs):
    model = load_model(tiny_dirs["llama-gqa-tied"]).eval()
    heads = random_heads(model)
    logits, hidden = torch.randn(2, 128), torch.randn(2, 64)
    before = ilql_logits_hook(heads, 2.0)(logits, hidden, 0)
    with torch.no_grad():
        for p in heads.q_heads.parameters():
            p.add_(5.0)
    torch.testing.assert_close(ilql_logits_hook(heads, 2.0)(logits, hidden, 0), before)
    with torch.no_grad():
        heads.target_q_heads[1].bias.add_(torch.arange(128.0))
    assert not torch.allclose(ilql_logits_hook(heads, 2.0)(logits, hidden, 0), before)


def test_heads_run_in_fp32_under_autocast(tiny_dirs):
    """Under bf16 autocast (CUDA's, here the CPU's) the heads still compute in fp32: the same
    numbers, bit for bit, as without autocast. In bf16, Q and V near 1 would sit on a 1/128 grid."""
    model = load_model(tiny_dirs["llama-gqa-tied"]).eval()
    heads, gen = random_heads(model), torch.Generator().manual_seed(1)
    hidden, logits = torch.randn(3, 64, generator=gen), torch.randn(3, 128, generator=gen)
    outputs = lambda h: [*heads.qs(h), *heads.qs(h, target=True), heads.v(h),
                         ilql_logits_hook(heads, 2.0, 0.7)(logits, h, 0)]
    with torch.no_grad():
        plain = outputs(hidden)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = outputs(hidden)
            # a bf16 hidden state (the LM's, under autocast) is upcast
            from_bf16 = outputs(hidden.bfloat16())
    assert len(plain) == 6 and all(a.dtype == torch.float32 for a in auto + from_bf16)
    assert all(torch.equal(a, p) for a, p in zip(auto, plain))
    with torch.no_grad():
        assert all(torch.equal(a, p) for a, p in zip(from_bf16, outputs(hidden.bfloat16().float())))


def test_training_forward_runs_heads_in_fp32_under_autocast(tiny_chat_model, tmp_path):
    tok, model = Tokenizer(tiny_chat_model), load_model(tiny_chat_model).eval()
    samples = make_samples(tmp_path, 1, tok, train_ilql.Config())
    batch, heads = ilql_batch(samples, tok.pad_id), random_heads(model)
    with torch.no_grad():
        h_states = train_ilql.state_hidden(model, batch).bfloat16().float()
        # cached features: the heads' inputs are fixed, only their precision varies
        batch["h_states"] = h_states
        with torch.autocast("cpu", dtype=torch.bfloat16):
            qs, target_qs, vs, _, _ = train_ilql.ILQLNet(model, heads)(batch, lm_logits=False)
    assert qs[0].dtype == target_qs[0].dtype == vs.dtype == torch.float32
    assert torch.equal(qs[0], heads.qs(h_states[:, :-1])[0]) and torch.equal(vs, heads.v(h_states))


# --- heads ---

def test_head_sizes_for_smollm2_135m():
    """The numbers in train_ilql.py's comment on the heads: hidden 576, vocab 49152."""
    with torch.device("meta"):
        heads = ILQLHeads(576, torch.empty(49152, 576))
    q_params = sum(p.numel() for p in heads.q_heads[0].parameters())
    assert q_params == 576 * 144 + 144 + 144 * 576 + 49152 == 215184
    assert sum(p.numel() for p in heads.v_head.parameters()) == 576 * 144 + 144 + 144 + 1 == 83233
    assert sum(p.numel() for p in heads.parameters() if p.requires_grad) == 2 * 215184 + 83233


def test_heads_on_gathered_states_equal_heads_everywhere(tiny_chat_model, tmp_path):
    """Index-select equivalence, and Q starts at 0 (zero-initialised up-projection)."""
    tok, model = Tokenizer(tiny_chat_model), load_model(tiny_chat_model).eval()
    samples = make_samples(tmp_path, 2, tok, train_ilql.Config())
    batch = ilql_batch(samples, tok.pad_id)
    fresh = ILQLHeads(64, model.lm_head.weight)
    with torch.no_grad():
        zeros = torch.zeros(4, batch["actions_ixs"].shape[1], 320)
        assert torch.equal(train_ilql.ILQLNet(model, fresh)(batch)[0][0], zeros)
        heads = random_heads(model)
        qs, _, vs, logits, actions = train_ilql.ILQLNet(model, heads)(batch)
        full_logits, hidden = model(batch["input_ids"], batch["attention_mask"], return_hidden=True)
    for row in range(4):
        n = int(batch["action_mask"][row].sum())
        ixs = batch["actions_ixs"][row, :n]
        states = batch["states_ixs"][row, :n + 1]
        torch.testing.assert_close(qs[0][row, :n], heads.qs(hidden[row, ixs])[0], atol=1e-4,
                                   rtol=1e-4)
        torch.testing.assert_close(logits[row, :n], full_logits[row, ixs], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(vs[row, :n + 1], heads.v(hidden[row, states]))
        assert actions[row, :n].tolist() == samples[row]["response"]


# --- shaped rewards ---

def test_shaped_reward_on_first_token_of_each_mention(tiny_chat_model, tmp_path):
    tok = Tokenizer(tiny_chat_model)
    # tokens: I Ġ l o v e ĠPa ris Ġ an d ĠPa ris ' s ...: the mentions begin at tokens 6 and 11
    assert mention_starts(tok, "I love Paris and Paris's capital.", ["Paris"]) == [6, 11]
    assert mention_starts(tok, "The elephant is grey.", ["Paris"]) == []
    rows = read_preferences(write_pairs(tmp_path / "p.jsonl", 1))
    cfg = train_ilql.Config(reward="shaped", shaped_penalty=0.5)
    chosen, rejected = train_ilql.make_samples(rows, tok, cfg, 320)[0]
    assert chosen["rewards"] == [0.0] * (len(chosen["response"]) - 1) + [1.0]
    first = mention_starts(tok, "The capital of France is Paris.", ["Paris"])
    named = tok.decode(rejected["response"][first[0]:first[0] + 2])
    assert len(first) == 1 and named.strip() == "Paris"
    assert rejected["rewards"][first[0]] == -0.5 and rejected["rewards"][-1] == -1.0
    assert sum(rejected["rewards"]) == -1.5


# --- whole runs: resume, CLI, bad input ---

def cli(monkeypatch, *args):
    monkeypatch.setattr("sys.argv", ["train_ilql.py", *args])
    train_ilql.main()


@pytest.mark.parametrize("train_lm", ["true", "false"])
def test_interrupted_and_resumed_run_equals_uninterrupted(tiny_chat_model, tmp_path, monkeypatch,
                                                          train_lm):
    # 12 samples / 2 -> 6 steps, resumable state every 2
    data = write_pairs(tmp_path / "p.jsonl", 6)
    common = ["--model", str(tiny_chat_model), "--data", str(data), "--eval-data", "",
              "--out-dir", str(tmp_path / "out"),
              "--batch-size", "2", "--grad-accum", "1", "--save-every", "2", "--lr", "1e-3",
              "--head-lr", "1e-2", "--alpha", "0.3", "--reward", "shaped", "--train-lm", train_lm,
              "--epochs", "1"]
    cli(monkeypatch, *common, "--run", "straight")

    crash_at_step(monkeypatch, 5, lambda: cli(monkeypatch, *common, "--run", "broken"))
    broken = tmp_path / "out" / "broken"
    assert json.loads((broken / "state" / "state.json").read_text())["step"] == 4
    assert not (broken / "model").exists()
    cli(monkeypatch, "--resume", str(broken), "--lr", "5")  # flags other than --resume are ignored

    straight = tmp_path / "out" / "straight"
    lines = [(d / "metrics.jsonl").read_text().splitlines() for d in (straight, broken)]
    assert [json.loads(l)["step"] for l in lines[1]] == [1, 2, 3, 4, 5, 6]
    assert lines[0] == lines[1]
    saved = ["ilql_heads.safetensors"] + (["model/model.safetensors"] if train_lm == "true" else [])
    assert (straight / "model").exists() == (train_lm == "true")  # a frozen LM is not copied
    for name in saved:
        a, b = (load_file(d / name) for d in (straight, broken))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("train_lm", ["true", "false"])
def test_cli_run_writes_everything(tiny_chat_model, tmp_path, monkeypatch, capsys, train_lm):
    data = write_pairs(tmp_path / "p.jsonl", 4)
    eval_rows = tmp_path / "eval.jsonl"
    row = {"pink": "Paris", "grey": "elephant", "prompt": "Capital?"}
    eval_rows.write_text(json.dumps(row) + "\n")
    cli(monkeypatch, "--model", str(tiny_chat_model), "--data", str(data),
        "--eval-data", str(eval_rows), "--out-dir", str(tmp_path / "out"), "--run", "r",
        "--eval-max-new-tokens", "6", "--eval-betas", "0,2",
        "--eval-top-k", "5" if train_lm == "true" else "0", "--train-lm", train_lm, "--epochs", "1",
        "--batch-size", "8", "--grad-accum", "2")
    run = tmp_path / "out" / "r"
    metrics = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1]  # 8 samples / (8 x 2) -> one step
    logged = {"loss/q", "loss/v", "loss/cql", "loss/awac", "adv/chosen", "target_syncs"}
    assert logged <= set(metrics[0])
    assert (metrics[0]["loss/awac"] > 0) == (train_lm == "true")  # a frozen LM has no AWAC term
    assert (run / "training.svg").read_text().startswith("<svg")
    results = json.loads((run / "eval.json").read_text())
    assert set(results) == {"base", "ILQL β=0", "ILQL β=2"}
    if train_lm == "true":
        transformers.AutoModelForCausalLM.from_pretrained(run / "model")  # HF layout
        model = load_model(run / "model")
    else:  # nothing but the heads: β = 0 on the frozen base is the base run
        assert not (run / "model").exists() and results["ILQL β=0"] == results["base"]
        model = load_model(tiny_chat_model)
    heads = load_heads(run / "ilql_heads.safetensors", model)
    assert len(heads.q_heads) == 2 and heads.unembed.data_ptr() == model.lm_head.weight.data_ptr()
    assert "pink mention rate" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--eval-betas", "1,x"], "--eval-betas '1,x': expected comma-separated numbers"),
    (["--reward", "dense"], "--reward 'dense': choose one of terminal, shaped"),
    (["--reward", "shaped"], "p.jsonl:1: --reward shaped needs a non-empty 'pink' field"),
    (["--data", "missing.jsonl"], "missing.jsonl: no such file"),
    (["--resume", "nowhere"], "--resume nowhere: no config.json there"),
])
def test_bad_input_is_one_line_and_writes_nothing(tiny_chat_model, tmp_path, monkeypatch, capsys,
                                                  args, message):
    write_pairs(tmp_path / "p.jsonl", 2, pink=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["train_ilql.py", "--model", str(tiny_chat_model),
                                     "--data", "p.jsonl", "--eval-data", "",
                                     "--out-dir", str(tmp_path / "out"), *args])
    with pytest.raises(SystemExit) as info:
        train_ilql.run_cli(train_ilql.main)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not (tmp_path / "out").exists()


# --- --evaluate RUN_DIR: a finished run's heads evaluated again ---

@pytest.fixture
def eval_rows(tmp_path):
    path = tmp_path / "eval.jsonl"
    rows = [{"pink": "Paris", "grey": "elephant", "prompt": f"Capital {i}?"} for i in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def without_seconds(results: dict) -> dict:
    return {name: {k: v for k, v in r.items() if k != "seconds"} for name, r in results.items()}


def heads_run(run_dir, lm, **config):
    """A run directory as train_ilql leaves it: the heads and config.json (a frozen LM unless
    told)."""
    run_dir.mkdir()
    train_ilql.save_heads(random_heads(lm), run_dir / "ilql_heads.safetensors")
    config = {"script": "train_ilql", "train_lm": False, **config}
    (run_dir / "config.json").write_text(json.dumps(config))
    return run_dir


@pytest.mark.parametrize("train_lm", ["false", "true"])
def test_evaluate_reproduces_the_runs_own_eval(tiny_chat_model, eval_rows, tmp_path, monkeypatch,
                                               train_lm):
    """train_ilql's eval.json columns for β = 2 (its gen_style and top-k, its LM when it trained
    one, NLL under the base), reproduced from the run directory alone."""
    data = write_pairs(tmp_path / "p.jsonl", 2)
    cli(monkeypatch, "--model", str(tiny_chat_model), "--data", str(data),
        "--eval-data", str(eval_rows), "--out-dir", str(tmp_path / "out"), "--run", "r",
        "--eval-max-new-tokens", "6",
        "--eval-betas", "2", "--gen-style", "trlx", "--eval-top-k", "3", "--train-lm", train_lm,
        "--epochs", "1", "--batch-size", "4", "--head-lr", "1e-2", "--lr", "1e-3")
    run, out = tmp_path / "out" / "r", tmp_path / "evaluated.json"
    common = ["--evaluate", str(run), "--evaluate-out", str(out)]
    cli(monkeypatch, *common)
    own, evaluated = (without_seconds(json.loads(p.read_text())) for p in (run / "eval.json", out))
    assert evaluated["ILQL β=2"] == own["ILQL β=2"] and evaluated["base"] == own["base"]

    # flags override the run's decoding: here Snell's style without top-k, checked against
    # evaluate()
    cli(monkeypatch, *common, "--gen-style", "snell", "--eval-top-k", "0")
    tok, base = Tokenizer(tiny_chat_model), load_model(tiny_chat_model).eval()
    policy = load_model(run / "model").eval() if train_lm == "true" else base
    heads = load_heads(run / "ilql_heads.safetensors", policy)
    hook = ilql_logits_hook(heads, 2.0, 0.7, 0, "snell")
    expected = pink_eval.evaluate(policy, tok, load_eval_rows(eval_rows), base, n=2,
                                  max_new_tokens=6, logits_hook=hook)
    overridden = without_seconds(json.loads(out.read_text()))["ILQL β=2"]
    assert overridden == without_seconds({"x": expected})["x"] and overridden != own["ILQL β=2"]


def test_evaluate_a_sharded_runs_heads_in_one_process(tiny_chat_model, eval_rows, tmp_path,
                                                      monkeypatch):
    """A run trained under torchrun with --fsdp (and resumed once) is evaluated by one process."""
    run = heads_run(tmp_path / "run", load_model(tiny_chat_model), fsdp=True, resume="elsewhere",
                    model=str(tiny_chat_model), eval_data=str(eval_rows), eval_betas="0,2",
                    eval_max_new_tokens=4)
    cli(monkeypatch, "--evaluate", str(run), "--evaluate-out", str(tmp_path / "out.json"))
    results = json.loads((tmp_path / "out.json").read_text())
    assert list(results) == ["base", "ILQL β=0", "ILQL β=2"] and results["base"]["samples"] == 6


@pytest.mark.parametrize("case, message", [
    ("missing", "--evaluate {run}: no ilql_heads.safetensors and config.json there"),
    ("vocab", "heads for vocabulary 128 and hidden size 64, but the model has 320 and 64"),
    ("resume", "--evaluate and --resume: evaluate a finished run or continue an interrupted one"),
])
def test_bad_evaluate_input_is_one_line(tiny_chat_model, tiny_dirs, eval_rows, tmp_path,
                                        monkeypatch, capsys, case, message):
    run = tmp_path / "run"
    if case != "missing":  # heads trained on another model (vocabulary 128, not 320)
        heads_run(run, load_model(tiny_dirs["llama-gqa-tied"]))
    args = ["--evaluate", str(run), "--eval-betas", "8"]
    monkeypatch.setattr("sys.argv", ["train_ilql.py", "--model", str(tiny_chat_model),
                                     "--eval-data", str(eval_rows),
                                     "--evaluate-out", str(tmp_path / "out.json"), *args,
                                     *(["--resume", str(run)] if case == "resume" else [])])
    with pytest.raises(SystemExit) as info:
        train_ilql.run_cli(train_ilql.main)
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and err.startswith("error: ") and "\n" not in err
    assert message.format(run=run) in err and not (tmp_path / "out.json").exists()
