"""train_rm.py: the evaluation helpers by hand, bad flags, and whole tiny runs on fake human
ratings."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

import train_rm
from conftest import crash_at_step
from nanorlhf.tasks import human_ratings as hr, stats
from nanorlhf.checkpoint import load_model
from nanorlhf.run import parse_config
from nanorlhf.errors import UserError
from nanorlhf.reward import load_reward_model, pair_ids, reward_model_from_lm, score_texts
from nanorlhf.tokenizer import Tokenizer

GOOD, BAD = ("lovely", "great", "kind", "happy"), ("awful", "sad", "cruel", "bad")


def fake_ratings(folder, per_source: int = 60):
    """The eight rating files for `per_source` texts per source: means evenly spread over
    [-3.5, 3.5], two ratings ±0.2 around each (se 0.2), positive texts made of GOOD words and
    negative ones of BAD words."""
    folder.mkdir()
    for s in hr.SOURCES:
        truth, ratings = [], []
        for i, m in enumerate(np.linspace(-3.5, 3.5, per_source)):
            words = GOOD if m > 0 else BAD
            truth.append(f"{i}\t{m:.4f}\t{words[i % 4]} {words[(i + 1) % 4]} {s[:5]} {i}")
            ratings.append(f"{i}\t{m:.4f}\t0.28\t[{m - 0.2:.4f}, {m + 0.2:.4f}]")
        (folder / f"{s}_GroundTruth.txt").write_text("\r\n".join(truth) + "\r\n")
        (folder / f"{s}_anonDataRatings.txt").write_text("\r\n".join(ratings) + "\r\n")
    return folder


@pytest.fixture
def ratings(tmp_path, monkeypatch):
    folder = fake_ratings(tmp_path / "ratings")
    monkeypatch.setattr(hr, "ensure_ratings", lambda sdist=None: folder)
    return folder


# --- evaluation helpers, by hand ---

def test_pairwise_accuracy_counts_ties_half():
    acc, se = stats.pairwise_accuracy(np.array([3.0, 1.0, 2.0, 0.0]),
                                      np.array([1.0, 1.0, 5.0, -1.0]))
    assert acc == 2.5 / 4  # right, tie, wrong, right
    assert se == pytest.approx(math.sqrt(0.625 * 0.375 / 4), rel=1e-12)


def test_pearson_by_hand_and_numpy():
    # deviations (-1, 0, 1) and (-1, 1, 0): Σ = 1, norms sqrt(2)·sqrt(2) -> r = 1/2
    r = stats.pearson(np.array([1.0, 2, 3]), np.array([1.0, 3, 2]))
    assert r == pytest.approx(0.5, abs=1e-15)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=50), rng.normal(size=50)
    assert stats.pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)
    # a constant scorer has no correlation
    assert math.isnan(stats.pearson(np.ones(4), np.arange(4.0)))


def test_spearman_with_ties_by_hand():
    assert list(stats.average_ranks(np.array([5.0, 1.0, 5.0]))) == [2.5, 1.0, 2.5]
    assert list(stats.average_ranks(np.array([2.0, 2.0, 2.0, 0.0]))) == [3.0, 3.0, 3.0, 1.0]
    # ranks (1, 2.5, 2.5, 4) vs (1, 2, 3, 4): deviations (-1.5, 0, 0, 1.5), (-1.5, -.5, .5, 1.5)
    # -> 4.5/sqrt(4.5·5) = 3/sqrt(10)
    rho = stats.spearman(np.array([1.0, 2, 2, 3]), np.array([10.0, 20, 30, 40]))
    assert rho == pytest.approx(3 / math.sqrt(10), abs=1e-15)
    x = np.array([0.1, 0.5, 2.0, 3.0, 7.0])
    assert stats.spearman(x, x ** 3) == pytest.approx(1.0, abs=1e-15)  # monotone, not linear
    assert stats.pearson(x, x ** 3) < 0.99
    assert stats.corr_se(0.5, 5) == 0.375  # (1 - 0.25)/sqrt(4)


def test_eval_metrics_on_a_score_map():
    score = {"a": 2.0, "b": 1.0, "c": 0.0}
    pairs = [{"chosen": "a", "rejected": "b"}, {"chosen": "c", "rejected": "b"}]
    texts = [{"text": t, "mean": m} for t, m in (("a", 3.0), ("b", 1.0), ("c", 2.0))]
    m = train_rm.eval_metrics(score, pairs, texts)
    assert (m["accuracy"], m["pairs"], m["texts"]) == (0.5, 2, 3)
    assert m["pearson"] == pytest.approx(0.5, abs=1e-15)  # deviations (1, 0, -1) and (1, -1, 0)
    assert m["spearman"] == pytest.approx(0.5, abs=1e-15)


# --- flags ---

@pytest.mark.parametrize("argv, words", [
    (["--train-pairs", "0"], "--train-pairs 0: must be >= 1"),
    (["--margin-scale", "-1"], "--margin-scale -1.0: must be >= 0"),
    (["--max-len", "8"], "--max-len 8: must be >= 16"),
    (["--eval-texts", "2"], "--eval-texts 2: must be >= 3"),
    (["--fsdp", "true"], "--fsdp")])
def test_bad_flags_one_line_before_any_work(argv, words, tmp_path, monkeypatch):
    monkeypatch.setattr(hr, "load_splits", lambda *a, **k: pytest.fail("work started"))
    monkeypatch.setattr("sys.argv", ["train_rm.py", "--out-dir", str(tmp_path / "out"), *argv])
    with pytest.raises(UserError) as e:
        train_rm.main()
    assert words in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_tokenize_pairs_cuts_text_and_scales_margin(tiny_chat_model):
    tok = Tokenizer(tiny_chat_model)
    long = "lovely " * 40
    rows = [{"chosen": long, "rejected": "sad", "margin": 2.5}]
    [p] = train_rm.tokenize_pairs(rows, tok, 16, 0.4)
    assert p["prompt"] == tok.chat_prompt("") and p["chosen"] == tok.encode(long)[:16]
    assert p["rejected"] == tok.encode("sad") and p["margin"] == pytest.approx(1.0, rel=1e-15)


# --- whole runs ---

def run_tiny(tmp_path, model, monkeypatch, *extra) -> Path:
    monkeypatch.setattr("sys.argv", [
        "train_rm.py", "--model", str(model), "--out-dir", str(tmp_path / "out"), "--run", "r",
        "--train-pairs", "24", "--batch-size", "4", "--epochs", "4", "--eval-pairs", "8",
        "--eval-texts", "10", "--lr", "1e-3", "--head-lr", "1e-2", "--warmup-steps", "2", *extra])
    train_rm.main()
    return tmp_path / "out" / "r"


LORA_MARGIN_CENTER = ("--lora-rank", "4", "--margin-scale", "0.1", "--center-coef", "0.01")


@pytest.mark.parametrize("extra", [(), LORA_MARGIN_CENTER])
def test_tiny_run_end_to_end(extra, ratings, tiny_chat_model, tmp_path, monkeypatch):
    run = run_tiny(tmp_path, tiny_chat_model, monkeypatch, *extra)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 25))  # 24 pairs / 4 per step x 4 epochs
    assert {"loss", "accuracy", "grad_norm", "lr"} <= set(metrics[0])
    assert (run / "training.svg").read_text().startswith("<svg")
    results = json.loads((run / "eval.json").read_text())
    assert set(results) == {"VADER", "RM untrained", "RM trained"}
    assert set(results["VADER"]) == set(train_rm.EVAL_SPLITS)
    # both the fresh head and the backbone (with LoRA: its merged adapters) were trained and saved
    saved = load_reward_model(run / "rm")
    start = reward_model_from_lm(load_model(tiny_chat_model), 0)
    assert not torch.equal(saved.score.weight, start.score.weight)
    q = lambda rm: rm.model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(q(saved), q(start))

    # transformers loads the RM and scores each text (no padding: the last token is the text's) as
    # we do
    tok = Tokenizer(tiny_chat_model)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(run / "rm").eval()
    cfg = parse_config(train_rm.Config, "", ["--eval-pairs", "8", "--eval-texts", "10"])
    sets = train_rm.eval_sets(hr.load_splits(0), cfg)
    texts = train_rm.unique_texts(sets)
    ours = score_texts(load_reward_model(run / "rm"), tok, [""] * len(texts), texts)
    with torch.no_grad():
        theirs = [hf(torch.tensor([sum(pair_ids(tok, "", t), [])])).logits[0, 0].item()
                  for t in texts]
    assert np.allclose(ours, theirs, rtol=0, atol=1e-4)
    # eval.json's trained row is what the saved RM's own scores give on the same pairs and texts
    again = train_rm.evaluate(lambda ts: [dict(zip(texts, theirs))[t] for t in ts], texts, sets)
    for split, m in again.items():
        for key in ("accuracy", "pearson", "spearman"):
            assert results["RM trained"][split][key] == pytest.approx(m[key], abs=1e-4)


def test_training_loss_decreases(ratings, tiny_chat_model, tmp_path, monkeypatch):
    """Four passes over 24 pairs (6 steps each): the last pass's BT loss is under half of the first
    pass's and of log 2, the loss of a scorer that cannot tell the texts apart."""
    run = run_tiny(tmp_path, tiny_chat_model, monkeypatch)
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    first, last = np.mean(losses[:6]), np.mean(losses[-6:])
    assert last < 0.5 * min(first, math.log(2)), (first, last)


def test_saved_rm_scores_texts_alone_whatever_the_prompt(ratings, tiny_chat_model, tmp_path,
                                                         monkeypatch):
    """The RM learned ("", text): its checkpoint says so, and RMScorer (rest_loop's gold, qdaif's
    fitness) scores a response under that prompt, so two different requests give the same score,
    equal to score_texts with the prompt "" (and not to the score under the request, which the RM
    never saw)."""
    from nanorlhf.reward import RMScorer

    run = run_tiny(tmp_path, tiny_chat_model, monkeypatch, "--epochs", "1")
    assert json.loads((run / "rm" / "config.json").read_text())["nanorlhf_fixed_prompt"] == ""
    # an extra key HF keeps
    transformers.AutoModelForSequenceClassification.from_pretrained(run / "rm")
    scorer, texts = RMScorer(run / "rm"), ["lovely kind day", "awful sad night"]
    a = scorer.score(["Write a dark poem.", "Tell me about the sea."], texts)
    b = scorer.score(["Describe your weekend.", ""], texts)
    assert a == b == score_texts(scorer.rm, scorer.tok, ["", ""], texts)
    under_request = score_texts(scorer.rm, scorer.tok,
                                ["Write a dark poem.", "Tell me about the sea."], texts)
    # the prompt does reach an RM's input: ignoring it is RMScorer's doing
    assert under_request != a


def test_interrupted_and_resumed_run_equals_uninterrupted(ratings, tiny_chat_model, tmp_path,
                                                          monkeypatch):
    """A crash at step 5 of 12 (state/ written every 2 steps) and a resume give the same metrics,
    the same evaluation and the same RM, bit for bit, as a run that never stopped; flags beside
    --resume are ignored."""
    from safetensors.torch import load_file

    common = ("--epochs", "2", "--save-every", "2")
    straight = run_tiny(tmp_path, tiny_chat_model, monkeypatch, *common)
    straight = straight.rename(tmp_path / "out" / "straight")
    crash_at_step(monkeypatch, 5, lambda: run_tiny(tmp_path, tiny_chat_model, monkeypatch, *common))
    broken = tmp_path / "out" / "r"
    assert json.loads((broken / "state" / "state.json").read_text())["step"] == 4
    assert not (broken / "rm").exists()
    monkeypatch.setattr("sys.argv", ["train_rm.py", "--resume", str(broken), "--lr", "5"])
    train_rm.main()

    lines = [(d / "metrics.jsonl").read_text().splitlines() for d in (straight, broken)]
    assert [json.loads(line)["step"] for line in lines[1]] == list(range(1, 13))
    assert lines[0] == lines[1]
    evals = [json.loads((d / "eval.json").read_text()) for d in (straight, broken)]
    assert evals[0] == evals[1]
    a, b = (load_file(d / "rm" / "model.safetensors") for d in (straight, broken))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_without_a_checkpoint_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["train_rm.py", "--resume", str(tmp_path / "nowhere")])
    with pytest.raises(UserError) as e:
        train_rm.main()
    message = str(e.value)
    assert "--resume" in message and "no config.json there" in message and "\n" not in message
