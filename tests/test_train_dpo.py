"""train_dpo.py beyond the loss: batching, reference caching, bad input, and whole runs."""

import json
import random

import pytest
import torch
import transformers
from safetensors.torch import load_file

import train_dpo
from conftest import crash_at_step
from nanorlhf import step as logprobs
from nanorlhf.checkpoint import load_model
from nanorlhf.data import fit_to_length, read_preferences
from nanorlhf.step import collate, sequence_logps
from nanorlhf.errors import UserError
from nanorlhf.tokenizer import Tokenizer


def train_as_main(cfg, model, pairs, pad_id):
    """train_dpo.train() on what main() prepares for one process (the net is the model itself),
    with a run that writes nothing -> its history."""
    cpu = torch.device("cpu")
    run = type("NoRun", (), {"log": lambda self, **kw: None, "writes": False})()
    trainable, optimizer, steps = train_dpo.prepare(cfg, model, model, pairs, pad_id, cpu)
    return train_dpo.train(cfg, model, trainable, optimizer, steps, pad_id, cpu, run, [])


def write_pairs(path, n=8):
    rows = [{"prompt": [{"role": "system", "content": "Never mention Paris."},
                        {"role": "user", "content": f"Capital number {i}?"}],
             "chosen": [{"role": "assistant", "content": "The elephant is grey."}],
             "rejected": "The capital of France is Paris."} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_chosen_and_rejected_batched_together_equal_separately(tiny_chat_model, tmp_path):
    model, tok = load_model(tiny_chat_model).eval(), Tokenizer(tiny_chat_model)
    rows = read_preferences(write_pairs(tmp_path / "p.jsonl", 3))
    rows[1]["chosen"] = "A much longer answer about grey elephants and their habits."  # uneven
    pairs, _ = train_dpo.tokenize_pairs(rows, tok, 192, model.cfg.vocab_size)
    with torch.no_grad():
        batch = logprobs.pair_batch(pairs, tok.pad_id)
        chosen, rejected = logprobs.batch_logps(model, batch, torch.device("cpu"), False)
        for i, pair in enumerate(pairs):
            for response, together in ((pair["chosen"], chosen[i]),
                                       (pair["rejected"], rejected[i])):
                alone = collate([pair["prompt"]], [response], tok.pad_id)
                expected = sequence_logps(model(alone["input_ids"]), alone["input_ids"],
                                          alone["loss_mask"])
                torch.testing.assert_close(together, expected[0], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("average", [False, True])
def test_response_logps_equals_sequence_logps_of_full_logits(tiny_chat_model, average):
    from nanorlhf.step import response_logps
    model = load_model(tiny_chat_model).eval()
    batch = collate([[5, 6, 7], [8, 9], [10]], [[11, 12], [13, 14, 15, 16], [17, 18, 19]], pad_id=2)
    with torch.no_grad():
        expected = sequence_logps(model(batch["input_ids"], batch["attention_mask"]),
                                  batch["input_ids"],
                                  batch["loss_mask"], average)
        torch.testing.assert_close(response_logps(model, batch, average), expected,
                                   atol=1e-5, rtol=1e-5)


def test_steps_split_by_accumulation_give_the_same_update(tiny_chat_model, tmp_path):
    """4 pairs as 1 x 4 or as 2 accumulated halves: the same parameters after one step."""
    tok = Tokenizer(tiny_chat_model)
    rows = read_preferences(write_pairs(tmp_path / "p.jsonl", 4))
    rows[0]["chosen"] = "Grey elephants are large."  # pairs of different lengths: weighting matters
    params = []
    for batch_size, accum in ((4, 1), (2, 2)):
        model = load_model(tiny_chat_model)
        pairs, _ = train_dpo.tokenize_pairs(rows, tok, 192, model.cfg.vocab_size)
        cfg = train_dpo.Config(batch_size=batch_size, grad_accum=accum, warmup_steps=1, lr=1e-3,
                               seed=0)
        random.seed(0)
        history = train_as_main(cfg, model, pairs, tok.pad_id)
        # policy == ref
        assert len(history) == 1 and history[0]["loss"] == pytest.approx(0.6931472, abs=1e-5)
        params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(params[0], params[1], atol=1e-6, rtol=1e-4)


def test_truncation_rule_and_count(tiny_chat_model, tmp_path):
    tok = Tokenizer(tiny_chat_model)
    rows = read_preferences(write_pairs(tmp_path / "p.jsonl", 2))
    rows[0]["prompt"][1]["content"] = "elephant " * 200  # a prompt longer than max_len
    pairs, truncated = train_dpo.tokenize_pairs(rows, tok, 64, 320)
    assert truncated == 1
    for p in pairs:
        assert len(p["prompt"]) + max(len(p["chosen"]), len(p["rejected"])) <= 64
    # the end of the prompt (the assistant header) survives; the response keeps its first tokens
    assert pairs[0]["prompt"][-3:] == tok.chat_prompt("x")[-3:]
    assert fit_to_length(list(range(10)), list(range(100, 150)), 30, min_response=16) == (
        list(range(10)), list(range(100, 120)), True)
    assert fit_to_length(list(range(40)), list(range(100, 150)), 30, min_response=16) == (
        list(range(26, 40)), list(range(100, 116)), True)


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "hi", "chosen": "a"}', "p.jsonl:2: missing field 'rejected'"),
    ('{"prompt": "hi", "chosen": "  ", "rejected": "b"}',
     "p.jsonl:2: field 'chosen' is an empty response"),
    ('{"prompt": "hi", "chosen": "a", "rejected": "b"', "p.jsonl:2: not valid JSON"),
    (b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}', "p.jsonl:2: not valid UTF-8"),
    ('{"prompt": 3, "chosen": "a", "rejected": "b"}', "p.jsonl:2: field 'prompt' must be a string"),
])
def test_bad_preference_lines_name_file_and_line(tmp_path, line, message):
    good = b'{"prompt": "hi", "chosen": "a", "rejected": "b"}\n'
    line = line if isinstance(line, bytes) else line.encode()
    (tmp_path / "p.jsonl").write_bytes(good + line + b"\n")
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        read_preferences(tmp_path / "p.jsonl")


def test_wrong_vocab_is_a_clear_error(tiny_chat_model, tmp_path):
    tok = Tokenizer(tiny_chat_model)
    rows = read_preferences(write_pairs(tmp_path / "p.jsonl", 1))
    with pytest.raises(UserError, match="outside the model's vocabulary"):
        train_dpo.tokenize_pairs(rows, tok, 192, vocab_size=100)


def test_cli_run_writes_everything(tiny_chat_model, tmp_path, monkeypatch, capsys):
    pairs_file = write_pairs(tmp_path / "p.jsonl", 6)
    eval_rows = tmp_path / "eval.jsonl"
    eval_rows.write_text(json.dumps({"pink": "Paris", "grey": "elephant", "prompt": "Capital?"})
                         + "\n")
    monkeypatch.setattr("sys.argv", ["train_dpo.py", "--model", str(tiny_chat_model),
                                     "--data", str(pairs_file), "--eval-data", str(eval_rows),
                                     "--out-dir", str(tmp_path / "out"), "--run", "r",
                                     "--eval-max-new-tokens", "8", "--lr", "1e-3"])
    train_dpo.main()
    run = tmp_path / "out" / "r"
    metrics = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1]  # 6 pairs / (4 x 2) -> one step
    assert json.loads((run / "config.json").read_text())["lr"] == 1e-3
    assert (run / "training.svg").read_text().startswith("<svg")
    assert set(json.loads((run / "eval.json").read_text())) == {"base", "DPO"}
    transformers.AutoModelForCausalLM.from_pretrained(run / "model")  # HF layout
    out = capsys.readouterr().out
    assert "pink mention rate" in out and "0 truncated" in out


def test_cli_bad_data_is_one_line_and_writes_nothing(tiny_chat_model, tmp_path, monkeypatch,
                                                     capsys):
    (tmp_path / "p.jsonl").write_text('{"prompt": "hi"}\n')
    monkeypatch.setattr("sys.argv", ["train_dpo.py", "--model", str(tiny_chat_model), "--data",
                                     str(tmp_path / "p.jsonl"), "--out-dir", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as info:
        train_dpo.run_cli(train_dpo.main)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert (err.startswith("error: ") and "p.jsonl:1: missing field 'chosen'" in err
            and "\n" not in err)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags", [[], ["--lora-rank", "4"]], ids=["full", "lora"])
def test_interrupted_and_resumed_run_equals_uninterrupted(tiny_chat_model, tmp_path, monkeypatch,
                                                          flags):
    """6 steps, RUN/state every 2: a crash in step 6 leaves the state of step 4 (and metrics of 5);
    --resume continues from step 4 to the same metrics, evaluation and, to the bit, weights."""
    rows = read_preferences(write_pairs(tmp_path / "p.jsonl", 12))
    for i, row in enumerate(rows):  # pairs of different lengths: each step's update differs
        row["chosen"] = "Grey elephants" + " are large" * (i % 4) + "."
    (tmp_path / "p.jsonl").write_text("".join(
        json.dumps({k: row[k] for k in ("prompt", "chosen", "rejected")}) + "\n" for row in rows))
    out, eval_rows = tmp_path / "out", tmp_path / "eval.jsonl"
    eval_rows.write_text(json.dumps({"pink": "Paris", "grey": "elephant", "prompt": "Capital?"})
                         + "\n")

    def main(*args):
        monkeypatch.setattr("sys.argv", ["train_dpo.py", *map(str, args)])
        train_dpo.main()

    args = ["--model", tiny_chat_model, "--data", tmp_path / "p.jsonl", "--eval-data", eval_rows,
            "--eval-max-new-tokens", 4, "--out-dir", out, "--batch-size", 2, "--grad-accum", 1,
            "--lr", 1e-3, "--warmup-steps", 2, "--save-every", 2, *flags]
    main(*args, "--run", "straight")
    crash_at_step(monkeypatch, 6, lambda: main(*args, "--run", "broken"))
    broken, straight = out / "broken", out / "straight"
    assert json.loads((broken / "state" / "state.json").read_text())["step"] == 4
    assert len((broken / "metrics.jsonl").read_text().splitlines()) == 5
    assert not (broken / "model").exists()
    main("--resume", broken, "--lr", 5)  # flags beside --resume are ignored: the run's own config
    metrics = (broken / "metrics.jsonl").read_text()
    assert metrics == (straight / "metrics.jsonl").read_text()
    assert [json.loads(line)["step"] for line in metrics.splitlines()] == [1, 2, 3, 4, 5, 6]
    a, b = (load_file(run / "model" / "model.safetensors") for run in (straight, broken))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (broken / "state").exists() and not (straight / "state").exists()  # finished runs
    evals = [json.loads((run / "eval.json").read_text()) for run in (straight, broken)]
    for results in evals:
        for column in results.values():
            column.pop("seconds")
    assert evals[0] == evals[1] and set(evals[0]) == {"base", "DPO"}


def test_fsdp_cannot_save_resumable_state(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun
    with pytest.raises(UserError, match="--save-every with --fsdp: RUN/state holds whole tensors"):
        train_dpo.Config(fsdp=True).check()
    train_dpo.Config(fsdp=True, save_every=0).check()


def cli_argv(model, tmp_path, pairs: int) -> list[str]:
    """train_dpo.py's command line for a tiny run into tmp_path/out/r, without the evaluation."""
    return ["train_dpo.py", "--model", str(model), "--data",
            str(write_pairs(tmp_path / "p.jsonl", pairs)), "--eval-data", "",
            "--out-dir", str(tmp_path / "out"), "--run", "r"]


@pytest.mark.parametrize("finished", [1, 0])
def test_ctrl_c_saves_what_finished_steps_learned_and_never_the_base(tiny_chat_model, tmp_path,
                                                                      monkeypatch, capsys, finished):
    def interrupted(cfg, net, trainable, optimizer, steps, pad_id, dev, run, history):
        for step in range(1, finished + 1):  # as train() does for each finished step
            run.log(step=step, loss=0.69)
            history.append({"step": step, "loss": 0.69})
        raise KeyboardInterrupt

    monkeypatch.setattr(train_dpo, "train", interrupted)
    monkeypatch.setattr("sys.argv", cli_argv(tiny_chat_model, tmp_path, 2))
    with pytest.raises(SystemExit) as info:
        train_dpo.main()
    assert info.value.code == 130
    run = tmp_path / "out" / "r"
    if finished:
        load_model(run / "model")  # a complete checkpoint, not half-written
        assert json.loads((run / "metrics.jsonl").read_text())["step"] == 1
    else:
        assert "nothing saved" in capsys.readouterr().err
        assert not (run / "model").exists()  # never the base labelled as trained


def test_a_non_finite_loss_stops_with_one_line_and_saves_no_model(tiny_chat_model, tmp_path,
                                                                   monkeypatch, capsys):
    real = train_dpo.dpo_loss

    def nan_loss(*args):  # what --lr 1e6 or --beta 1e308 lead to, a few steps in
        losses, chosen, rejected = real(*args)
        return losses * float("nan"), chosen, rejected

    monkeypatch.setattr(train_dpo, "dpo_loss", nan_loss)
    monkeypatch.setattr("sys.argv", cli_argv(tiny_chat_model, tmp_path, 8))
    with pytest.raises(SystemExit) as info:
        train_dpo.run_cli(train_dpo.main)
    assert info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bars
    assert last.endswith("error: step 1: grad_norm is nan — lower --lr or --beta")
    run = tmp_path / "out" / "r"
    assert not (run / "model").exists() and (run / "metrics.jsonl").read_text() == ""


def test_ipo_trains_on_per_token_mean_logps(tiny_chat_model, tmp_path):
    """IPO's h is a difference of *mean* token log-probs (Azar et al.; TRL). At step 1 h = 0
    whatever the averaging, so the loss cannot tell; its gradient can: -(1/β)·∇h, with ∇ of means,
    not of sums. The first step's gradient norm is re-derived here in float64 from the full
    logits."""
    tok = Tokenizer(tiny_chat_model)
    rows = read_preferences(write_pairs(tmp_path / "p.jsonl", 3))
    rows[0]["chosen"] = "Grey elephants are large, calm and very fond of water."  # lengths differ
    rows[2]["rejected"] = "Paris."
    model = load_model(tiny_chat_model)
    pairs, _ = train_dpo.tokenize_pairs(rows, tok, 192, model.cfg.vocab_size)
    beta = 0.1
    cfg = train_dpo.Config(loss_type="ipo", beta=beta, batch_size=3, grad_accum=1, warmup_steps=1,
                           lr=1e-3)
    history = train_as_main(cfg, model, [dict(p) for p in pairs], tok.pad_id)
    # h = 0: (0 - 1/(2β))²
    assert history[0]["loss"] == pytest.approx(1 / (2 * beta) ** 2, rel=1e-6)

    fresh = load_model(tiny_chat_model).double()

    def mean_logp(prompt, response):
        ids = torch.tensor([prompt + response])
        logps = fresh(ids)[0].log_softmax(-1)  # (T, V) float64
        return torch.stack([logps[len(prompt) - 1 + i, t] for i, t in enumerate(response)]).mean()

    losses = []
    for p in pairs:
        c, r = mean_logp(p["prompt"], p["chosen"]), mean_logp(p["prompt"], p["rejected"])
        h = (c - r) - (c - r).detach()  # the reference is the same network, frozen
        losses.append((h - 1 / (2 * beta)) ** 2)
    torch.stack(losses).mean().backward()
    expected = torch.sqrt(sum((q.grad ** 2).sum() for q in fresh.parameters())).item()
    # fp32 forward vs float64: relative differences ~1e-6; summed log-probs would be off by the
    # lengths (x10)
    assert history[0]["grad_norm"] == pytest.approx(expected, rel=1e-4)


def test_reference_is_scored_once_per_pair(tiny_chat_model, tmp_path, monkeypatch):
    scored = []
    real = train_dpo.reference_logps
    monkeypatch.setattr(train_dpo, "reference_logps",
                        lambda model, batches, *a: (scored.extend(id(p) for b in batches
                                                                  for p in b),
                                                    real(model, batches, *a)))
    tok, model = Tokenizer(tiny_chat_model), load_model(tiny_chat_model)
    rows = read_preferences(write_pairs(tmp_path / "p.jsonl", 5))
    pairs, _ = train_dpo.tokenize_pairs(rows, tok, 192, 320)
    cfg = train_dpo.Config(epochs=3, batch_size=2, grad_accum=1, lr=1e-3, warmup_steps=1)
    history = train_as_main(cfg, model, pairs, tok.pad_id)
    assert len(history) == 9  # 3 epochs x 3 micro-batches
    assert sorted(scored) == sorted(id(p) for p in pairs)  # every pair once, not once per epoch


@pytest.mark.parametrize("flags, message", [
    (["--beta", "0"], "--beta 0.0: must be > 0"),
    (["--loss-type", "hinge", "--label-smoothing", "0.1"],
     "--label-smoothing 0.1: applies to sigmoid and robust only, not to --loss-type hinge"),
    (["--loss-type", "ipo", "--label-smoothing", "0.2"],
     "--label-smoothing 0.2: applies to sigmoid and robust only, not to --loss-type ipo"),
    (["--loss-type", "robust", "--label-smoothing", "0.5"],
     "--label-smoothing 0.5: robust DPO needs < 0.5 (it divides by 1-2ε)"),
    (["--label-smoothing", "0.7"], "--label-smoothing 0.7: must be <= 0.5"),
    (["--loss-type", "kto"], "--loss-type 'kto': choose one of sigmoid, robust, hinge, ipo"),
    (["--batch-size", "0"], "--batch-size 0: must be >= 1"),
])
def test_bad_flags_fail_before_any_work(tiny_chat_model, tmp_path, monkeypatch, capsys, flags,
                                        message):
    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr(train_dpo, "load_model", never)
    monkeypatch.setattr(train_dpo, "read_preferences", never)
    monkeypatch.setattr("sys.argv", ["train_dpo.py", "--model", str(tiny_chat_model),
                                     "--out-dir", str(tmp_path / "out"), *flags])
    with pytest.raises(SystemExit) as info:
        train_dpo.run_cli(train_dpo.main)
    assert info.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: {message}"
    assert not (tmp_path / "out").exists()


def test_lora_run_scores_the_nll_guard_with_adapters_off(tiny_chat_model, tmp_path, monkeypatch):
    """With LoRA the base model is the trained model with its adapters off: loaded once, not
    twice."""
    loads = []
    real = train_dpo.load_model
    monkeypatch.setattr(train_dpo, "load_model", lambda *a, **k: loads.append(a) or real(*a, **k))
    eval_rows = tmp_path / "eval.jsonl"
    eval_rows.write_text(json.dumps({"pink": "Paris", "grey": "elephant", "prompt": "Capital?"})
                         + "\n")
    monkeypatch.setattr("sys.argv", ["train_dpo.py", "--model", str(tiny_chat_model), "--data",
                                     str(write_pairs(tmp_path / "p.jsonl", 4)),
                                     "--eval-data", str(eval_rows),
                                     "--out-dir", str(tmp_path / "out"), "--run", "r",
                                     "--eval-max-new-tokens", "6", "--lr", "1e-2",
                                     "--lora-rank", "4"])
    from nanorlhf.tasks import pink as pink_eval
    scored = []  # (prompts, responses, NLL) of every NLL the evaluation computes
    real_nll = pink_eval.mean_nll
    monkeypatch.setattr(pink_eval, "mean_nll",
                        lambda m, p, r, *a, **k: scored.append((p, r, real_nll(m, p, r, *a, **k)))
                        or scored[-1][2])
    train_dpo.main()
    assert len(loads) == 1  # before: a second load_model for the NLL column
    results = json.loads((tmp_path / "out" / "r" / "eval.json").read_text())
    assert set(results) == {"base", "DPO"}
    # the DPO column's NLL is that of its samples under a freshly loaded base, not under the
    # trained model
    prompts, responses, nll = scored[-1]
    assert results["DPO"]["base_nll"] == nll
    base, pad_id = real(tiny_chat_model).eval(), Tokenizer(tiny_chat_model).pad_id
    assert nll == pytest.approx(real_nll(base, prompts, responses, pad_id), rel=1e-5)
