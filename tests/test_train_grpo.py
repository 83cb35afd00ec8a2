"""train_grpo.py: the three loss reductions, clip-higher, reward scaling, RLOO and pass@k against
float64 values worked out by hand; β = 0 loads no reference; whole runs on the tiny model; resume.
"""

import json
import math
import re

import pytest
import torch
import transformers
from safetensors.torch import load_file

import train_grpo
from conftest import crash_at_step
from nanorlhf.tasks.stats import pass_at_k

F64 = torch.float64


# --- the math, by hand ---

def surrogate_case():
    """Two replies, ratios chosen by hand: reply 0 (A = +1) has 2 tokens and a pad, reply 1 (A = -2)
    has 3."""
    ratios = torch.tensor([[1.5, 0.5, 1.0], [1.1, 0.7, 1.3]], dtype=F64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    return ratios.log(), torch.zeros(2, 3, dtype=F64), torch.tensor([1.0, -2.0], dtype=F64), mask


def test_clip_higher_by_hand():
    logp, old, adv, mask = surrogate_case()
    loss, low, high = train_grpo.clipped_surrogate(logp, old, adv, 0.2, 0.28)
    # A = +1: ρ 1.5 -> min(1.5, 1.28) = 1.28 (clipped high); ρ 0.5 -> min(0.5, 0.8) = 0.5
    # A = -2: ρ 1.1 -> -2.2; ρ 0.7 -> min(-1.4, -1.6) = -1.6 (clipped low); ρ 1.3 -> -2.6
    expected = torch.tensor([[-1.28, -0.5], [2.2, 1.6]], dtype=F64)
    assert torch.allclose(loss[:, :2], expected, atol=1e-12, rtol=0)
    assert abs(loss[1, 2].item() - 2.6) < 1e-12
    assert high.tolist() == [[True, False, False], [False, False, False]]
    assert low.tolist() == [[False, False, False], [False, True, False]]
    # symmetric clipping (ε_high = ε_low = 0.2) stops the first token at 1.2 instead
    loss, _, high = train_grpo.clipped_surrogate(logp, old, adv, 0.2, 0.2)
    assert abs(loss[0, 0].item() + 1.2) < 1e-12 and abs(loss[1, 2].item() - 2.6) < 1e-12
    # the gradient: through ρ where unclipped (dL/dlogp = -A·ρ), 0 where clipped
    logp = logp.clone().requires_grad_(True)
    loss, _, _ = train_grpo.clipped_surrogate(logp, old, adv, 0.2, 0.28)
    (loss * mask).sum().backward()
    grad = torch.tensor([[0.0, -0.5, 0.0], [2.2, 0.0, 2.6]], dtype=F64)
    assert torch.allclose(logp.grad, grad, atol=1e-12, rtol=0)


# the token losses of surrogate_case at ε_low 0.2, ε_high 0.28: [-1.28, -0.5 | 2.2, 1.6, 2.6]
TOKEN_LOSS = torch.tensor([[-1.28, -0.5, 99.0], [2.2, 1.6, 2.6]], dtype=F64)  # 99: a pad, masked
MASK = torch.tensor([[1, 1, 0], [1, 1, 1]])


def test_grpo_loss_by_hand():
    # per reply: (-1.28 - 0.5)/2 = -0.89 and (2.2 + 1.6 + 2.6)/3 = 2.1333..., then their mean
    assert abs(train_grpo.grpo_loss(TOKEN_LOSS, MASK, 2).item() - (-0.89 + 6.4 / 3) / 2) < 1e-12


def test_dr_grpo_loss_by_hand():
    # every token summed: -1.78 + 6.4 = 4.62, over B · L_max = 2 · 4 (the cap, not the longest)
    assert abs(train_grpo.dr_grpo_loss(TOKEN_LOSS, MASK, 2, 4).item() - 4.62 / 8) < 1e-12


def test_dapo_loss_by_hand():
    # every token summed, over the 5 real tokens of the batch
    assert abs(train_grpo.dapo_loss(TOKEN_LOSS, MASK, 5).item() - 4.62 / 5) < 1e-12


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_micro_batch_shares_add_up_to_the_whole_batch(loss_type):
    """Accumulation: the shares of micro-batches of 2, 3 and 1 replies sum to the one-batch loss."""
    gen = torch.Generator().manual_seed(0)
    token_loss = torch.randn(6, 5, generator=gen, dtype=F64)
    mask = torch.tensor([[1] * n + [0] * (5 - n) for n in (5, 1, 3, 2, 4, 5)])
    counts = dict(num_sequences=6, num_tokens=int(mask.sum()), max_tokens=7)
    whole = train_grpo.reduce_loss(loss_type, token_loss, mask, **counts)
    parts = sum(train_grpo.reduce_loss(loss_type, token_loss[a:b], mask[a:b], **counts)
                for a, b in ((0, 2), (2, 5), (5, 6)))
    assert abs(whole.item() - parts.item()) < 1e-12
    # and each is the equation itself, written out row by row
    rows = [token_loss[i, :int(mask[i].sum())].tolist() for i in range(6)]
    expected = {"grpo": sum(sum(r) / len(r) for r in rows) / 6,
                "dr_grpo": sum(map(sum, rows)) / (6 * 7),
                "dapo": sum(map(sum, rows)) / sum(map(len, rows))}[loss_type]
    assert abs(whole.item() - expected) < 1e-12


def test_k3_by_hand():
    # π = 0.5, π_ref = 0.25: ρ = π_ref/π = 0.5, k3 = 0.5 - 1 - ln 0.5 = 0.19314718...
    k3 = train_grpo.kl_k3(torch.tensor([math.log(0.5)], dtype=F64),
                          torch.tensor([math.log(0.25)], dtype=F64))
    assert abs(k3.item() - 0.1931471805599453) < 1e-15
    assert train_grpo.kl_k3(torch.zeros(3, dtype=F64), torch.zeros(3, dtype=F64)).eq(0).all()


REWARDS = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 1], [0, 0, 0, 0]], dtype=F64)


def test_reward_scaling_by_hand():
    # group 0: mean 1/4, unbiased std sqrt((0.5625 + 3·0.0625)/3) = 0.5; group 1: mean 3/4, std 0.5
    group = train_grpo.group_advantages(REWARDS, "group")
    expected = torch.tensor([[0.75, -0.25, -0.25, -0.25], [0.25, 0.25, -0.75, 0.25]], dtype=F64)
    assert torch.allclose(group[:2], expected / 0.5001, atol=1e-12, rtol=0)
    assert group[2].eq(0).all()  # all rewards equal: no signal, 0 (not nan) thanks to the eps
    # batch: one std over all 12 rewards (4 ones): var = (4·(2/3)² + 8·(1/3)²)/11 = 24/99
    batch = train_grpo.group_advantages(REWARDS, "batch")
    assert torch.allclose(batch[:2], expected / (math.sqrt(24 / 99) + 1e-4), atol=1e-12, rtol=0)
    none = train_grpo.group_advantages(REWARDS, "none")
    assert torch.allclose(none[:2], expected, atol=1e-15, rtol=0) and none[2].eq(0).all()


def test_rloo_by_hand():
    # r_i minus the mean of the 3 others: [1, -1/3, -1/3, -1/3] and [1/3, 1/3, -1, 1/3]
    rloo = train_grpo.rloo_advantages(REWARDS, "none")
    expected = torch.tensor([[1, -1 / 3, -1 / 3, -1 / 3], [1 / 3, 1 / 3, -1, 1 / 3], [0, 0, 0, 0]],
                            dtype=F64)
    assert torch.allclose(rloo, expected, atol=1e-15, rtol=0)
    assert torch.allclose(train_grpo.rloo_advantages(REWARDS, "group")[:2], expected[:2] / 0.5001,
                          atol=1e-12, rtol=0)


@pytest.mark.parametrize("n, c, k, expected", [
    (4, 1, 2, 0.5),        # 1 - C(3,2)/C(4,2) = 1 - 3/6
    (5, 2, 3, 0.9),        # 1 - C(3,3)/C(5,3) = 1 - 1/10
    (8, 3, 1, 0.375),      # k = 1: c/n
    (10, 3, 4, 1 - 35 / 210),  # 1 - C(7,4)/C(10,4)
    (4, 0, 2, 0.0), (4, 3, 2, 1.0), (4, 4, 4, 1.0),
])
def test_pass_at_k_by_hand(n, c, k, expected):
    assert abs(pass_at_k(n, c, k) - expected) < 1e-15  # tasks/stats.py: train_grpo's and PPO's


# --- whole runs on the tiny model ---

def write_problems(path, n, offset=0):
    rows = [{"id": str(i), "task": "add1", "prompt": f"What is {i % 9 + 1} + {i // 9 + 1}?",
             "answer": i % 9 + i // 9 + 2} for i in range(offset, offset + n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def even_length(reply: str, answer: int) -> bool:
    """A stand-in checker: the tiny random model never writes sums, but it does write replies of
    both parities, so groups get rewards that differ (the real checker is tested on its own)."""
    return len(reply) % 2 == 0


def run_cli(monkeypatch, *args):
    monkeypatch.setattr("sys.argv", ["train_grpo.py", *map(str, args)])
    train_grpo.main()


def common(model, tmp_path, *extra):
    return ["--model", model, "--out-dir", tmp_path / "out",
            "--train-problems", write_problems(tmp_path / "train.jsonl", 12),
            "--heldout-problems", write_problems(tmp_path / "held.jsonl", 3, offset=40),
            "--prompts-per-step", 2, "--group-size", 4, "--minibatch-size", 4,
            "--micro-batch-size", 2, "--max-new-tokens", 6, "--eval-n", 4, "--eval-k", 2,
            "--gen-batch-size", 8, "--lr", 3e-3, "--warmup-steps", 1, "--threads", 1, *extra]


@pytest.fixture
def varied_reward(monkeypatch):
    monkeypatch.setattr(train_grpo, "check", even_length)


@pytest.mark.parametrize("extra", [
    ["--loss-type", "grpo", "--beta", 0.1, "--epochs", 2],
    ["--loss-type", "dr_grpo", "--scale-rewards", "none", "--sampler", "batch"],
    ["--advantage", "rloo", "--filter-zero-std", "true", "--scale-rewards", "batch"],
    ["--lora-rank", 4, "--beta", 0.1],
], ids=["grpo-beta-epochs", "dr_grpo-batch-sampler", "rloo-filter", "lora-beta"])
def test_cli_run_writes_everything(tiny_chat_model, tmp_path, monkeypatch, capsys, varied_reward,
                                   extra):
    run_cli(monkeypatch, *common(tiny_chat_model, tmp_path, "--run", "r", "--steps", 2, *extra))
    run = tmp_path / "out" / "r"
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2] and lines[1]["completions"] == 16
    assert lines[0]["ratio_dev_first"] == 0.0  # π_old of the first minibatch is its own forward
    assert ("kl" in lines[0]) == ("--beta" in extra)
    if "--beta" in extra:
        assert lines[0]["kl"] >= 0 and lines[1]["kl"] > 0  # k3 >= 0; π left π_ref at step 1
    results = json.loads((run / "eval.json").read_text())
    before, after = results["before"], results["after"]
    assert results["steps"] == {"0": before, "2": after} and results["wall_s"] > 0
    assert before["kl"] == 0.0 and after["kl"] != 0.0 and after["samples"] == 12
    for r in (before, after):  # the pass@k estimates are ordered as they must be
        assert 0 <= r["pass1"] <= r["pass2"] <= 1 and len(r["greedy_by_problem"]) == 3
    assert (run / "training.svg").read_text().startswith("<svg") and not (run / "state").exists()
    transformers.AutoModelForCausalLM.from_pretrained(run / "model")  # HF layout (LoRA merged)
    assert "pass1 gain" in capsys.readouterr().out


def test_beta_zero_loads_no_reference(tiny_chat_model, tmp_path, monkeypatch, varied_reward):
    loads, seen = [], {}
    original_load, original_train = train_grpo.load_model, train_grpo.train

    def counting_load(*args, **kwargs):
        loads.append(args)
        return original_load(*args, **kwargs)

    def spying_train(cfg, policy, net, ref, *args):
        seen.update(ref=ref, loads=len(loads))
        return original_train(cfg, policy, net, ref, *args)

    monkeypatch.setattr(train_grpo, "load_model", counting_load)
    monkeypatch.setattr(train_grpo, "train", spying_train)
    run_cli(monkeypatch, *common(tiny_chat_model, tmp_path, "--run", "b0", "--steps", 1))
    assert seen == {"ref": None, "loads": 1}  # training held the policy alone
    assert len(loads) == 2  # π₀ loaded after training, for the evaluation's KL only
    seen.clear()
    run_cli(monkeypatch, *common(tiny_chat_model, tmp_path, "--run", "b1", "--steps", 1,
                                 "--beta", 0.1))
    assert seen["ref"] is not None and seen["loads"] == 4  # here the reference is loaded up front


def test_ratio_is_exactly_one_where_pi_old_comes_from_the_no_grad_forward(tiny_chat_model):
    """The no-grad pass (π_old of the later minibatches) and the update's forward share one layout:
    before any step they agree to the bit."""
    from nanorlhf.checkpoint import load_model
    from nanorlhf.tokenizer import Tokenizer

    tok, policy = Tokenizer(tiny_chat_model), load_model(tiny_chat_model)
    prompts = [tok.chat_prompt("What is 1 + 2?"), tok.chat_prompt("Hi")] * 2
    batch = train_grpo.rollout_batch(prompts, [[5, 6, 2], [7], [8, 9, 10, 11], [12, 2]],
                                     tok.pad_id, torch.device("cpu"))
    cfg = train_grpo.Config(micro_batch_size=2)
    old = train_grpo.logps_of(policy, batch, [[3, 0, 2, 1]], cfg)
    for micro in ([3, 0], [2, 1]):
        logp, _ = train_grpo.token_logps(policy, batch, micro, 1.0)
        assert torch.equal(logp.detach() * batch["mask"][micro], old[micro] * batch["mask"][micro])
    # and the layout's log-probs are those of each unpadded sequence
    for i in range(4):
        n = int(batch["mask"][i].sum())
        ids = torch.tensor([prompts[i] + batch["ids"][i, batch["P"]:batch["P"] + n].tolist()])
        full = policy(ids).float().log_softmax(-1)[0, len(prompts[i]) - 1:-1]
        want = full.gather(-1, ids[0, len(prompts[i]):, None]).squeeze(-1)
        assert torch.allclose(old[i, :n], want, atol=1e-5)


def test_interrupted_and_resumed_run_equals_uninterrupted(tiny_chat_model, tmp_path, monkeypatch,
                                                          varied_reward):
    args = common(tiny_chat_model, tmp_path, "--steps", 4, "--save-every", 2, "--eval-every", 1,
                  "--beta", 0.1, "--minibatch-size", 2)
    run_cli(monkeypatch, *args, "--run", "straight")
    crash_at_step(monkeypatch, 4, lambda: run_cli(monkeypatch, *args, "--run", "broken"))
    broken = tmp_path / "out" / "broken"
    assert json.loads((broken / "state" / "state.json").read_text())["step"] == 2
    assert not (broken / "model").exists()
    run_cli(monkeypatch, "--resume", broken, "--lr", 5)  # flags other than --resume are ignored
    straight = tmp_path / "out" / "straight"
    strip = lambda run: [{k: v for k, v in json.loads(line).items() if not k.endswith("_s")}
                         for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in strip(broken)] == [1, 2, 3, 4] and strip(broken) == strip(straight)
    a, b = (load_file(run / "model" / "model.safetensors") for run in (straight, broken))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    evals = [json.loads((run / "eval.json").read_text()) for run in (straight, broken)]
    for e in evals:
        e.pop("wall_s")
    assert evals[0] == evals[1] and sorted(evals[0]["steps"], key=int) == ["0", "1", "2", "3", "4"]


@pytest.mark.parametrize("args, message", [
    (["--epsilon-high", 0.1], "--epsilon-high 0.1: must be >= --epsilon-low 0.2"),
    (["--eval-n", 4, "--eval-k", 9], "--eval-k 9: pass@k needs --eval-n >= k"),
    (["--tasks", "add1,sub1"], "unknown task 'sub1'"),
    (["--loss-type", "bnpo"], "--loss-type 'bnpo': choose one of grpo, dr_grpo, dapo"),
    (["--resume", "nowhere"], "--resume nowhere: no "),
])
def test_bad_input_is_one_line(tmp_path, monkeypatch, args, message):
    from nanorlhf.errors import UserError

    with pytest.raises(UserError, match=re.escape(message)):
        run_cli(monkeypatch, "--out-dir", tmp_path / "out", *args)
    assert not (tmp_path / "out").exists()
