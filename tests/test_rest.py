"""rest_loop.py: ReST filtering and Improve bookkeeping, learning on a toy reward, bad input, resume
and the gold-label budget. Expected values are computed by hand (reference notes §5.6), never by the
code under test."""

import json
import math

import pytest
import torch
import transformers

import rest_loop
from nanorlhf.checkpoint import load_model, save_model
from nanorlhf.errors import UserError
from nanorlhf.reward import load_reward_model, reward_model_from_lm
from nanorlhf.tokenizer import Tokenizer

CPU = torch.device("cpu")


class ToyGold:
    """A deterministic stand-in for the gold scorer that rarely ties on random text; counts what it
    scores."""

    def __init__(self):
        self.scored = 0

    def score(self, prompts, responses):
        self.scored += len(responses)
        return [(sum(map(ord, r)) % 101) / 100 for r in responses]


def write_prompts(path, n=8):
    path.write_text("".join(json.dumps({"prompt": f"Describe place number {i}."}) + "\n"
                            for i in range(n)))
    return path


# --- filtering and bookkeeping ---

def test_quantile_threshold_hand_example():
    rewards = [0.1, 0.5, 0.9, 0.3]  # mean 0.45
    # sorted 0.1 0.3 0.5 0.9; q=0.75 sits at position 0.75·3 = 2.25: 0.5 + 0.25·(0.9 - 0.5) = 0.6
    # -> only 0.9
    assert rest_loop.thresholds(rewards, [0.75]) == [pytest.approx(0.6)]
    assert rest_loop.keep_above(rewards, 0.6) == [2]
    # q=0.5: position 1.5: 0.3 + 0.5·(0.5 - 0.3) = 0.4, below the mean: τ = 0.45 keeps 0.5 and 0.9
    (tau,) = rest_loop.thresholds(rewards, [0.5])
    assert tau == pytest.approx(0.45)
    assert rest_loop.keep_above(rewards, tau) == [1, 2]
    # ties at τ are dropped: [1, 1, 1, 2] at q=0.5 -> quantile 1, mean 1.25: only the 2 survives
    assert rest_loop.keep_above([1, 1, 1, 2], rest_loop.thresholds([1, 1, 1, 2], [0.5])[0]) == [3]
    assert rest_loop.keep_above([1, 1, 1, 2], 1.0) == [3]


def test_first_threshold_is_at_least_the_grow_mean():
    """ReST (Gulcehre et al. 2023, Alg. 1): τ_1 ≥ the mean reward of the grow set. A right-skewed
    grow set puts the 0.7 quantile below the mean; then every τ_i is raised to the mean (the
    quantiles above it stay)."""
    rewards = [0.0] * 7 + [1.0, 2.0, 9.0]  # mean 1.2
    # q=0.7 at position 0.7·9 = 6.3: 0 + 0.3·(1 - 0) = 0.3 < 1.2 -> 1.2;
    # q=0.9 at 8.1: 2 + 0.1·(9 - 2) = 2.7
    taus = rest_loop.thresholds(rewards, [0.7, 0.9])
    assert taus == [pytest.approx(1.2), pytest.approx(2.7)]
    # the 0.3 quantile alone would keep 1.0 too
    assert rest_loop.keep_above(rewards, taus[0]) == [8, 9]
    # both below: the mean
    assert rest_loop.thresholds([0.0] * 9 + [10.0], [0.7, 0.85]) == [pytest.approx(1.0)] * 2


def test_quantile_flag_must_rise():
    assert rest_loop.parse_quantiles("0.7,0.85") == [0.7, 0.85]
    for bad in ("0.8,0.7", "0.5,0.5", "1.0", "x", ""):
        with pytest.raises(UserError, match="--quantiles"):
            rest_loop.parse_quantiles(bad)


def grow_tiny(model_dir, n_prompts=2, k=4, seed=0):
    model, tok = load_model(model_dir).eval(), Tokenizer(model_dir)
    samples = rest_loop.grow(model, tok, [f"Prompt {i}" for i in range(n_prompts)], k, 1.0, 6, 16,
                             seed)
    return model, tok, samples


def test_bc_improve_steps_keep_shrinking_sets(tiny_chat_model):
    model, tok, samples = grow_tiny(tiny_chat_model)
    assert [s["prompt"] for s in samples] == ["Prompt 0"] * 4 + ["Prompt 1"] * 4  # prompt-major
    rewards = [i / 7 for i in range(8)]
    cfg = rest_loop.Config(improve="bc", k=4, lr=1e-3, batch_size=2)
    before = [p.detach().clone() for p in model.parameters()]
    stats = rest_loop.improve(cfg, model, rest_loop.preparer(cfg), samples, rewards, [0.5, 0.75],
                              tok.pad_id, CPU, "t")
    # τ1 at position 3.5 of 0/7..7/7 = 3.5/7 (= the mean): keeps 4/7..7/7 (4);
    # τ2 at 5.25/7: keeps 6/7, 7/7 (2)
    assert stats["thresholds"] == [pytest.approx(0.5), pytest.approx(0.75)]
    assert stats["kept"] == [4, 2]
    assert all(loss is not None and loss > 0 for loss in stats["improve_loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_dpo_improve_pairs_best_against_worst(tiny_chat_model):
    model, tok, samples = grow_tiny(tiny_chat_model, n_prompts=3)
    rewards = [0.2, 0.9, 0.1, 0.5,   # prompt 0: best 1 (0.9) vs worst 2 (0.1)
               0.3, 0.3, 0.3, 0.3,   # prompt 1: all tied -> no pair
               0.4, 0.0, 0.6, 0.2]   # prompt 2: best 10 (0.6) vs worst 9 (0.0)
    pairs = rest_loop.best_worst_pairs(samples, rewards, 4)
    assert [(p["chosen"], p["rejected"], p["reward"]) for p in pairs] == [
        (samples[1]["ids"], samples[2]["ids"], 0.9), (samples[10]["ids"], samples[9]["ids"], 0.6)]
    cfg = rest_loop.Config(improve="dpo", k=4, lr=1e-3, batch_size=2)
    # sorted rewards 0 .1 .2 .2 .3 .3 .3 .3 .4 .5 .6 .9; q=0.5 at position 5.5 -> 0.3, below the
    # mean 4.1/12: τ1 = 0.341667, both pairs (0.9, 0.6); q=0.85 at position 9.35
    # -> 0.5 + 0.35·0.1 = 0.535: still both; q=0.95 at 10.45 -> 0.6 + 0.45·0.3 = 0.735: one
    stats = rest_loop.improve(cfg, model, rest_loop.preparer(cfg), samples, rewards,
                              [0.5, 0.85, 0.95], tok.pad_id, CPU, "t")
    assert stats["thresholds"] == [pytest.approx(4.1 / 12), pytest.approx(0.535),
                                   pytest.approx(0.735)]
    assert stats["kept"] == [2, 2, 1]
    # first DPO batch: policy == reference
    assert stats["improve_loss"][0] == pytest.approx(0.6931472, abs=1e-5)



def test_dpo_loss_is_train_dpos_sigmoid_loss_to_the_last_bit():
    """rest_loop keeps its own DPO loss (no script imports another): the same values and gradients,
    bit for bit, as train_dpo.dpo_loss with its defaults, also where σ saturates."""
    import train_dpo

    gen = torch.Generator().manual_seed(0)
    logps = [torch.randn(64, generator=gen, dtype=torch.float32) * 30 for _ in range(4)]
    logps[0][:2] = torch.tensor([1e4, -1e4])  # β·h = ±1000: logsigmoid's far tails
    for beta in (0.1, 0.5):
        ours, theirs = [[t.clone().requires_grad_(i < 2) for i, t in enumerate(logps)]
                        for _ in range(2)]
        a = rest_loop.dpo_loss(*ours, beta)
        b = train_dpo.dpo_loss(*theirs, beta)[0]
        assert torch.equal(a, b)
        a.sum().backward()
        b.sum().backward()
        assert all(torch.equal(x.grad, y.grad) for x, y in zip(ours[:2], theirs[:2]))

def exact_kl(p_dir, q_dir, prompt: list[int], stops: list[int]) -> tuple[float, float]:
    """KL(p‖q) over every response of up to 2 tokens, by brute force in float64 with transformers'
    forward: a response ends at a stop token or after 2 tokens, so its probability is p(a)·p(b|a),
    or p(a) when a stops. -> (KL, the variance of log p(y) - log q(y) under p)."""
    def first_two(model_dir):  # -> (V,) log p(a | prompt), (V, V) log p(b | prompt, a)
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).double().eval()
        V = model.config.vocab_size
        ids = torch.cat([torch.tensor(prompt).expand(V, -1), torch.arange(V)[:, None]], 1)
        with torch.no_grad():
            logps = model(ids).logits.log_softmax(-1)  # (V, P+1, V)
        return logps[0, -2], logps[:, -1]
    (p1, p2), (q1, q2) = first_two(p_dir), first_two(q_dir)
    ends = torch.zeros(p1.shape[0], dtype=torch.bool)
    ends[stops] = True
    # (V, V) log-ratio of the two-token responses, and of the one-token ones
    two = (p1 - q1)[:, None] + (p2 - q2)
    one = p1 - q1
    prob_two, prob_one = (p1[:, None] + p2).exp() * ~ends[:, None], p1.exp() * ends
    kl = (prob_two * two).sum() + (prob_one * one).sum()
    second = (prob_two * two ** 2).sum() + (prob_one * one ** 2).sum()
    # every response enumerated once
    assert abs((prob_two.sum() + prob_one.sum()).item() - 1) < 1e-12
    return kl.item(), (second - kl ** 2).item()


def test_evaluate_kl_matches_brute_force(tiny_chat_model, tmp_path):
    """evaluate()'s KL(π‖π₀): the mean of log π(y|x) - log π₀(y|x) over y ~ π, a Monte Carlo
    estimate; checked against the exact sum over every response of up to 2 tokens. π is π₀ with
    noise on its final norm."""
    ref, tok = load_model(tiny_chat_model).eval(), Tokenizer(tiny_chat_model)
    policy = load_model(tiny_chat_model).eval()
    with torch.no_grad():
        noise = torch.randn(policy.model.norm.weight.shape,
                            generator=torch.Generator().manual_seed(0))
        policy.model.norm.weight.add_(4 * noise)
    save_model(policy, tmp_path / "policy", copy_from=tiny_chat_model)
    n = 4000
    # --temperature is Grow's: evaluation samples at T = 1 whatever it is, or the estimate would be
    # biased
    cfg = rest_loop.Config(eval_n=n, max_new_tokens=2, gen_batch_size=n, batch_size=64,
                           temperature=0.5)
    got = rest_loop.evaluate(cfg, policy, ref, reward_model_from_lm(ref), ToyGold(), tok, ["Hello"],
                             CPU)["kl"]
    prompt = tok.chat_prompt([{"role": "user", "content": "Hello"}])
    kl, var = exact_kl(tmp_path / "policy", tiny_chat_model, prompt, tok.stop_ids)
    assert kl > 0.2  # far from the π = π₀ case, where any estimator that returns 0 would pass
    # the estimate is a mean of n i.i.d. terms: by the CLT it lies within 5 standard errors but for
    # p ≈ 6e-7 (fp32 log-probs add ~1e-6, negligible next to it)
    assert abs(got - kl) < 5 * math.sqrt(var / n), (got, kl, var)


def test_label_pairs_spend_exactly_the_budget(tiny_chat_model):
    _, tok, samples = grow_tiny(tiny_chat_model, n_prompts=3)  # 3 prompts x K=4: 6 disjoint pairs
    gold = ToyGold()
    pairs = rest_loop.label_pairs(samples, 4, 5, gold, tok)
    assert gold.scored == 10  # 5 labels = 5 comparisons of 2 responses
    scores = gold.score([], [s["text"] for s in samples])
    # order: (0,1), (4,5), (8,9), then (2,3), (6,7); ties are dropped after being paid for
    expected = [(a, b) for a, b in [(0, 1), (4, 5), (8, 9), (2, 3), (6, 7)]
                if scores[a] != scores[b]]
    assert len(pairs) == len(expected)
    for pair, (a, b) in zip(pairs, expected):
        win, lose = (a, b) if scores[a] > scores[b] else (b, a)
        assert pair["chosen"] == tok.encode(samples[win]["text"])
        assert pair["rejected"] == tok.encode(samples[lose]["text"])


# --- learning: a toy reward whose optimum is known ---

def test_grow_improve_rounds_raise_a_toy_reward(tiny_chat_model):
    """Reward = fraction of response tokens with ids 100..163 (20% of the vocabulary by chance, 1.0
    at best): three seeded grow/improve rounds of ReST-BC must raise the mean reward of fresh
    samples."""
    torch.manual_seed(0)
    model, tok = load_model(tiny_chat_model).eval(), Tokenizer(tiny_chat_model)
    prompts = [f"Prompt {i}" for i in range(8)]
    reward = lambda s: sum(100 <= t < 164 for t in s["ids"]) / len(s["ids"])
    cfg = rest_loop.Config(improve="bc", k=4, lr=1e-2, lr_decay=1.0, batch_size=8)
    means = []
    for t in range(4):
        samples = rest_loop.grow(model, tok, prompts, cfg.k, 1.0, 6, 64, seed=100 + t)
        rewards = [reward(s) for s in samples]
        means.append(sum(rewards) / len(rewards))
        if t < 3:
            rest_loop.improve(cfg, model, rest_loop.preparer(cfg), samples, rewards, [0.5, 0.75],
                              tok.pad_id, CPU, f"round{t}")
    assert means[0] < 0.3
    assert means[-1] > means[0] + 0.2, means  # seeded: 0.19 -> 0.59 when written


# --- bad input ---

def test_bad_prompt_line_names_file_and_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "Describe a park."}\n{"prompt": ""}\n')
    with pytest.raises(UserError, match=r"p\.jsonl:2: field 'prompt' must be a non-empty string"):
        rest_loop.read_prompts(path)
    path.write_text('{"prompt": "Describe a park."}\n{"prompt": "x"\n')
    with pytest.raises(UserError, match=r"p\.jsonl:2: not valid JSON"):
        rest_loop.read_prompts(path)


def run_main(monkeypatch, *args):
    monkeypatch.setattr("sys.argv", ["rest_loop.py", *map(str, args)])
    rest_loop.main()


def cli_error(monkeypatch, capsys, *args) -> str:
    monkeypatch.setattr("sys.argv", ["rest_loop.py", *map(str, args)])
    with pytest.raises(SystemExit) as info:
        rest_loop.run_cli(rest_loop.main)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


def test_cli_bad_prompt_file_is_one_line_and_writes_nothing(tiny_chat_model, tmp_path, monkeypatch,
                                                            capsys):
    (tmp_path / "p.jsonl").write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    err = cli_error(monkeypatch, capsys, "--model", tiny_chat_model, "--prompts",
                    tmp_path / "p.jsonl", "--out-dir", tmp_path / "out")
    assert "p.jsonl:2: field 'prompt' must be a non-empty string" in err
    assert not (tmp_path / "out").exists()


def test_cli_gold_rm_without_head_is_the_reward_error(tiny_chat_model, tmp_path, monkeypatch,
                                                      capsys):
    err = cli_error(monkeypatch, capsys, "--model", tiny_chat_model,
                    "--prompts", write_prompts(tmp_path / "p.jsonl", 30),
                    "--gold", f"rm:{tiny_chat_model}", "--out-dir", tmp_path / "out")
    assert "no reward head" in err and str(tiny_chat_model) in err
    assert not (tmp_path / "out").exists()


def test_cli_bad_budget_is_a_clear_error(tiny_chat_model, tmp_path, monkeypatch, capsys):
    err = cli_error(monkeypatch, capsys, "--model", tiny_chat_model,
                    "--prompts", write_prompts(tmp_path / "p.jsonl"), "--mode", "oneshot",
                    "--iterations", 3, "--prompts-per-iter", 4, "--k", 4, "--gold-pairs", 4)
    assert "12 labels in one iteration (oneshot)" in err and "only 8 disjoint pairs" in err


class Loaded(Exception):
    """Raised by the recording loader: the request is all these tests need."""


@pytest.mark.parametrize("lm_device, dtype", [("cuda", torch.bfloat16), ("cpu", torch.float32)])
def test_gold_rm_loads_on_the_run_device_bf16_on_cuda(tiny_chat_model, tmp_path, monkeypatch,
                                                      lm_device, dtype):
    """--gold rm:PATH is frozen: on CUDA it is loaded in bf16 (its forwards run under bf16 autocast
    anyway, so only the memory halves), fp32 on the CPU. No GPU here: device() says CUDA and the
    loader records its request."""
    import nanorlhf.reward

    asked = []
    monkeypatch.setattr(rest_loop, "device", lambda: torch.device(lm_device))

    def load_reward_model(path, dtype=torch.float32, device="cpu", template=None):
        asked.append((torch.device(device), dtype))
        raise Loaded

    monkeypatch.setattr(nanorlhf.reward, "load_reward_model", load_reward_model)
    with pytest.raises(Loaded):
        run_main(monkeypatch, "--model", tiny_chat_model,
                 "--prompts", write_prompts(tmp_path / "p.jsonl", 30),
                 "--gold", f"rm:{tiny_chat_model}", "--out-dir", tmp_path / "out")
    assert asked == [(torch.device(lm_device), dtype)]


def test_cli_has_no_fsdp_flag(tmp_path, monkeypatch, capsys):
    """rest_loop samples from the policy between training steps, which needs the whole model on
    every rank, so it has no --fsdp at all (issue 24: no flag exists only to be refused). Asking for
    it is argparse's one-line error, before the model is even found."""
    err = cli_error(monkeypatch, capsys, "--model", "/no/model", "--fsdp", "true",
                    "--out-dir", tmp_path / "out")
    assert err == "error: unrecognized arguments: --fsdp true"
    assert not (tmp_path / "out").exists()


# --- whole runs: outputs, budget, resume ---

TINY = ["--iterations", 3, "--prompts-per-iter", 3, "--k", 4, "--max-new-tokens", 5,
        "--gold-pairs", 2, "--eval-prompts", 2, "--eval-n", 2, "--gen-batch-size", 16,
        "--batch-size", 4, "--lr", 1e-3, "--quantiles", "0.5,0.75"]


def tiny_run(monkeypatch, model, prompts, out, run, *extra):
    gold = ToyGold()
    monkeypatch.setattr(rest_loop, "make_gold_scorer", lambda spec, **kw: gold)
    run_main(monkeypatch, "--model", model, "--prompts", prompts, "--out-dir", out, "--run", run,
             *TINY, *extra)
    metrics = [json.loads(line) for line in (out / run / "metrics.jsonl").read_text().splitlines()]
    return metrics, gold


def test_oneshot_and_iterated_spend_the_same_gold_labels(tiny_chat_model, tmp_path, monkeypatch):
    prompts = write_prompts(tmp_path / "p.jsonl")
    out = tmp_path / "out"
    iterated, gold_it = tiny_run(monkeypatch, tiny_chat_model, prompts, out, "it", "--mode",
                                 "iterated")
    oneshot, gold_os = tiny_run(monkeypatch, tiny_chat_model, prompts, out, "os", "--mode",
                                "oneshot")
    assert [m.get("new_labels", 0) for m in iterated] == [0, 2, 2, 2]
    assert [m.get("new_labels", 0) for m in oneshot] == [0, 6, 0, 0]
    assert iterated[-1]["gold_labels"] == oneshot[-1]["gold_labels"] == 6
    # what the gold scorer actually saw: 2 responses per label, plus 2 prompts x 2 samples at each
    # of 4 evaluations
    assert gold_it.scored == gold_os.scored == 2 * 6 + 4 * 4
    assert oneshot[0] == iterated[0]  # iteration 0: the same π_0, proxy and evaluation seed


def test_run_outputs_and_resume_matches_uninterrupted(tiny_chat_model, tmp_path, monkeypatch,
                                                       capsys):
    prompts, out = write_prompts(tmp_path / "p.jsonl"), tmp_path / "out"
    full, _ = tiny_run(monkeypatch, tiny_chat_model, prompts, out, "full", "--improve", "dpo")
    run = out / "full"
    assert [m["iteration"] for m in full] == [0, 1, 2, 3]
    assert all({"gold", "proxy", "proxy_acc", "kl", "sqrt_kl", "kept", "thresholds"} <= set(m)
               for m in full[1:])
    assert (run / "rest_loop.svg").read_text().startswith("<svg") and not (run / "state").exists()
    transformers.AutoModelForCausalLM.from_pretrained(run / "model")  # HF layout
    assert load_reward_model(run / "proxy_rm").head_name == "score"
    assert "| iter | gold | proxy |" in capsys.readouterr().out

    calls = {"n": 0}
    real_improve = rest_loop.improve

    def crash_in_iteration_2(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated crash")  # a Ctrl-C would save model/ (test_interrupt.py)
        return real_improve(*args, **kwargs)

    monkeypatch.setattr(rest_loop, "improve", crash_in_iteration_2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        tiny_run(monkeypatch, tiny_chat_model, prompts, out, "cut", "--improve", "dpo")
    state = json.loads((out / "cut" / "state" / "state.json").read_text())
    assert state["step"] == 1  # the iteration
    monkeypatch.setattr(rest_loop, "improve", real_improve)
    resumed, _ = tiny_run(monkeypatch, tiny_chat_model, prompts, out, "cut",
                          "--resume", out / "cut", "--lr", 5.0)
    strip = lambda ms: [{k: v for k, v in m.items() if k != "seconds"} for m in ms]
    assert strip(resumed) == strip(full)
    for a, b in zip(load_model(run / "model").parameters(),
                    load_model(out / "cut" / "model").parameters()):
        assert torch.equal(a, b)


def test_stream_sampler_does_not_depend_on_the_batch_size(tiny_chat_model, tmp_path, monkeypatch):
    # --sampler stream draws each sample from its own generator: 3 or 16 rows, the same grow sets,
    # so the same run to the last logged digit. The batch sampler's one generator per batch changes
    # with the size.
    prompts, out = write_prompts(tmp_path / "p.jsonl"), tmp_path / "out"
    strip = lambda ms: [{k: v for k, v in m.items() if k != "seconds"} for m in ms]
    runs = {(sampler, rows): strip(tiny_run(monkeypatch, tiny_chat_model, prompts, out,
                                            f"{sampler}{rows}", "--sampler", sampler,
                                            "--gen-batch-size", rows)[0])
            for sampler in ("stream", "batch") for rows in (3, 16)}
    assert runs["stream", 3] == runs["stream", 16]
    assert runs["batch", 3] != runs["batch", 16]
    assert runs["stream", 16] != runs["batch", 16]
