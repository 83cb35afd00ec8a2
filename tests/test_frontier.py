"""experiments/frontier.py: best-of-n's estimator and KL, Gao et al.'s fits, flag errors, the proxy
recipe, and one end-to-end run of every method on the tiny model (slow) whose π₀ points must
coincide across scripts."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from experiments import frontier
from nanorlhf.checkpoint import load_model
from nanorlhf.reward import reward_model_from_lm, save_reward_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("n, kl", [(1, 0.0), (2, 0.1931472), (4, 0.6362944), (16, 1.8350887),
                                   (64, 3.1745081)])
def test_bon_kl_matches_the_hand_table(n, kl):
    """log n - (n-1)/n, the values of the reference notes (computed with plain math there)."""
    assert frontier.bon_kl(n) == pytest.approx(kl, abs=5e-8)


def test_best_of_n_picks_the_proxy_argmax_in_disjoint_groups():
    proxy = np.array([[0.1, 0.9, 0.5, 0.2], [3.0, 1.0, -1.0, 2.0]])
    gold = np.array([[10, 20, 30, 40], [50, 60, 70, 80]], dtype=float)
    # n = 2: groups (0,1), (2,3) of each prompt; picks 1, 2 | 0, 3
    assert frontier.best_of_n(proxy, gold, 2).tolist() == [20, 30, 50, 80]
    assert frontier.best_of_n(proxy, gold, 4).tolist() == [20, 50]
    # n = 1: every sample
    assert frontier.best_of_n(proxy, gold, 1).tolist() == gold.reshape(-1).tolist()


@pytest.mark.parametrize("form", ["bon", "rl"])
def test_gao_fit_recovers_the_coefficients_of_noisy_synthetic_points(form):
    """R = d(α - βd) or d(α - β log d) plus noise; the fit must find α, β and (bon) the peak
    d* = α/(2β)."""
    rng = np.random.default_rng(0)
    d = np.repeat(np.linspace(0.2, 3.0, 15), 4)
    alpha, beta = 1.3, 0.4
    clean = d * (alpha - beta * (d if form == "bon" else np.log(d)))
    noise = rng.normal(0, 0.01, d.shape)
    a, b = frontier.gao_fit(np.concatenate([[0.0], d]), np.concatenate([[0.0], clean + noise]),
                            form)
    # 60 points, noise 0.01: the coefficients' SE is ~1e-3; 0.02 is many SEs, a wrong form misses by
    # far more
    assert a == pytest.approx(alpha, abs=0.02) and b == pytest.approx(beta, abs=0.02)
    if form == "bon":
        assert a / (2 * b) == pytest.approx(alpha / (2 * beta), rel=0.05)
    assert np.allclose(frontier.gao_curve(alpha, beta, form, d), clean, atol=1e-12)
    assert frontier.gao_curve(alpha, beta, form, np.array([0.0])).tolist() == [0.0]
    fit = frontier.gao_fit(np.array([0.0, 1.0]), np.array([0.0, 1.0]), form)
    assert all(math.isnan(v) for v in fit)



def test_the_proxy_is_rest_loops_recipe_to_the_bit(tiny_chat_model):
    """frontier.train_proxy is rest_loop.train_proxy at rest_loop's defaults, in one process
    (frontier imports no script): the same loss and the same RM, bit for bit, on 11 pairs (batches
    of 8 and 3)."""
    import torch

    import rest_loop
    from nanorlhf.reward import pair_ids
    from nanorlhf.tokenizer import Tokenizer

    tok, lm = Tokenizer(tiny_chat_model), load_model(tiny_chat_model)
    pairs = []
    for i in range(11):
        prompt, chosen = pair_ids(tok, f"Describe place {i}.", f"The capital {i} is Paris.")
        rejected = pair_ids(tok, f"Describe place {i}.", "Never mention the pink elephant.")[1]
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    ours, theirs = reward_model_from_lm(lm, seed=5), reward_model_from_lm(lm, seed=5)
    cfg = rest_loop.Config(seed=5)
    assert cfg.rm_epochs == 1
    loss = frontier.train_proxy(ours, pairs, tok.pad_id, torch.device("cpu"), 5)
    expected = rest_loop.train_proxy(cfg, theirs, rest_loop.preparer(cfg), pairs, tok.pad_id,
                                     torch.device("cpu"), "5")
    assert loss == expected
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert all(torch.equal(v, theirs.state_dict()[k]) for k, v in ours.state_dict().items())
    assert not torch.equal(ours.score.weight, reward_model_from_lm(lm, seed=5).score.weight)

@pytest.mark.parametrize("args, message", [
    ([], "--gold '': choose rm:PATH"),
    (["--gold", "gpt4"], "--gold 'gpt4': choose rm:PATH"),
    (["--gold", "vader", "--methods", "bon,sft"], "--methods 'bon,sft': unknown method 'sft'"),
    (["--gold", "vader", "--bon-n", "1,3"],
     "--bon-n 1,3: every n must be >= 1 and divide --bon-samples 16"),
    (["--gold", "vader", "--seeds", "a"], "--seeds 'a': expected comma-separated ints"),
    (["--gold", "vader", "--dpo-betas", "0.1,-1"], "--dpo-betas 0.1,-1: every β must be > 0"),
    (["--gold", "vader", "--gold-pairs", "10"],
     "--gold-pairs 10: must split evenly over --rest-iterations 3"),
    (["--gold", "vader", "--prompts", "missing.jsonl"], "missing.jsonl: no such file"),
    (["--gold", "rm:/no/such/rm"], "/no/such/rm"),
    (["--gold", "vader", "--report-only", "true"], "no finished seed to report"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["frontier.py", "--out-dir", str(tmp_path / "out"), *args])
    with pytest.raises(SystemExit) as info:
        frontier.run_cli(frontier.main)
    err = capsys.readouterr().err.strip()
    assert info.value.code != 0 and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_every_method_end_to_end_on_the_tiny_model(tiny_chat_model, tmp_path):
    """All five methods through their own scripts; then the report. π₀'s evaluation is one
    protocol, so the gold of π₀ in base.json, ReST's iteration 0 and PPO's step 0 is the same
    number."""
    gold = save_reward_model(reward_model_from_lm(load_model(tiny_chat_model), seed=3),
                             tmp_path / "gold")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Describe place number {i}."}) + "\n"
                               for i in range(16)))
    out = tmp_path / "out"
    args = [sys.executable, ROOT / "experiments" / "frontier.py", "--gold", f"rm:{gold}",
            "--model", tiny_chat_model, "--prompts", prompts, "--out-dir", out, "--seeds", "0",
            "--gold-pairs", 6, "--eval-prompts", 4, "--max-new-tokens", 6, "--bon-n", "1,2,4",
            "--bon-samples", 4, "--dpo-betas", "0.1", "--dpo-epochs", 1, "--rl-steps", 2,
            "--eval-every", 1, "--rest-iterations", 2]
    subprocess.run(list(map(str, args)), check=True, cwd=tmp_path)
    result = json.loads((out / "frontier.json").read_text())
    methods = {p["method"] for p in result["points"]}
    assert methods == {"π₀", "bon", "dpo", "rest", "ppo", "grpo"}
    base = json.loads((out / "s0" / "labels" / "base.json").read_text())
    ppo = json.loads((out / "s0" / "ppo" / "eval.json").read_text())
    rest = [json.loads(l)
            for l in (out / "s0" / "rest" / "metrics.jsonl").read_text().splitlines()]
    # the same samples, the same gold
    assert ppo["steps"]["0"]["gold"] == base["gold"] == rest[0]["gold"]
    assert ppo["steps"]["0"]["kl"] == 0.0 and sorted(ppo["steps"], key=int) == ["0", "1", "2"]
    labels = (out / "s0" / "labels" / "pairs.jsonl").read_text().splitlines()
    assert len(labels) + base["ties"] == 6  # the budget: every label bought, ties included
    bon = {p["label"]: p for p in result["points"] if p["method"] == "bon"}
    assert bon["n=1"]["kl"] == 0.0 and bon["n=4"]["kl"] == pytest.approx(math.log(4) - 0.75)
    # the max of more draws
    assert bon["n=4"]["proxy"] >= bon["n=2"]["proxy"] >= bon["n=1"]["proxy"]
    assert (out / "frontier.svg").read_text().startswith("<svg")
    assert "| bon | n=4 |" in (out / "frontier.md").read_text()
    # a second run finds everything done, runs nothing and reports the same table
    table = (out / "frontier.md").read_text()
    rerun = subprocess.run(list(map(str, args)), check=True, cwd=tmp_path, capture_output=True,
                           text=True)
    assert "$ " not in rerun.stdout and (out / "frontier.md").read_text() == table


def test_a_fit_series_is_dashed_in_its_data_colour_without_a_legend_line():
    from nanorlhf.svg import line_plots_svg

    svg = line_plots_svg([("t", {"bon": [(0, 0), (1, 1)], "ppo": [(0, 0), (1, 2)],
                                 "bon fit": [(0, 0), (1, 0.9)]})], markers=True)
    lines = [l for l in svg.splitlines() if l.startswith("<polyline")]
    colour = lambda line: line.split('stroke="')[1].split('"')[0]
    assert len(lines) == 3 and colour(lines[2]) == colour(lines[0]) != colour(lines[1])
    assert "stroke-dasharray" in lines[2] and "stroke-dasharray" not in lines[0]
    assert ">bon<" in svg and ">ppo<" in svg and ">bon fit<" not in svg
    assert svg.count("<circle") == 4  # measured points only, not the fit's
