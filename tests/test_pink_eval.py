"""python tools/pink_eval.py: the same numbers as evaluate() in memory, one model resident at a time on
cli.device(), and a trained ILQL run (--ilql-heads) evaluated as the run evaluated itself."""

import json
import shutil
import weakref

import pytest
import torch

import train_ilql
from nanorlhf.tasks import pink_eval
from tools import pink_eval as pink_eval_cli
from nanorlhf.checkpoint import load_model
from nanorlhf.errors import run_cli
from nanorlhf.ilql_heads import ilql_logits_hook, load_heads, save_heads
from nanorlhf.tasks.pink import load_eval_rows
from nanorlhf.tokenizer import Tokenizer
from conftest import make_hf_model
from test_ilql import random_heads, write_pairs


@pytest.fixture
def eval_rows(tmp_path):
    path = tmp_path / "eval.jsonl"
    rows = [{"pink": "Paris", "grey": "elephant", "prompt": f"Capital {i}?"} for i in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def second_model(tiny_chat_model, tmp_path):
    """Another tiny llama with the same tokenizer (a 'trained' model to compare with the base)."""
    path = tmp_path / "second"
    make_hf_model("llama-gqa-tied", seed=1, vocab_size=320).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_chat_model / name, path / name)
    return path


def without_seconds(results: dict) -> dict:
    return {name: {k: v for k, v in r.items() if k != "seconds"} for name, r in results.items()}


def heads_run(run_dir, model, **config):
    """A run directory as train_ilql leaves it: the heads and config.json (a frozen LM unless told)."""
    run_dir.mkdir()
    save_heads(random_heads(model), run_dir / "ilql_heads.safetensors")
    (run_dir / "config.json").write_text(json.dumps({"script": "train_ilql", "train_lm": False, **config}))
    return run_dir


FLAGS = ["--n", "2", "--max-new-tokens", "6", "--seed", "3"]


def test_cli_equals_evaluate_in_memory(tiny_chat_model, second_model, eval_rows, tmp_path):
    """What the CLI did before it loaded one model at a time: every model resident, evaluate() on each."""
    out = tmp_path / "out.json"
    pink_eval_cli.main(["--model", str(tiny_chat_model), "--model", str(second_model), "--data", str(eval_rows),
                    *FLAGS, "--out", str(out)])
    tok, rows = Tokenizer(tiny_chat_model), load_eval_rows(eval_rows)
    base, other = load_model(tiny_chat_model).eval(), load_model(second_model).eval()
    expected = {str(d): pink_eval.evaluate(m, tok, rows, base, n=2, max_new_tokens=6, seed=3)
                for d, m in ((tiny_chat_model, base), (second_model, other))}
    assert without_seconds(json.loads(out.read_text())) == without_seconds(expected)


def test_one_model_resident_at_a_time_on_the_run_device(tiny_chat_model, second_model, eval_rows, tmp_path,
                                                        monkeypatch):
    marker, loads, live = object(), [], []  # a fake device: load_model must be handed cli.device()

    def counting_load(path, dtype=torch.float32, device="cpu"):
        loads.append((path, device, sum(ref() is not None for ref in live)))
        model = load_model(path, dtype)
        live.append(weakref.ref(model))
        return model

    monkeypatch.setattr("tools.pink_eval.device", lambda: marker)
    monkeypatch.setattr(pink_eval_cli, "load_model", counting_load)
    run = heads_run(tmp_path / "ilql", load_model(tiny_chat_model))
    pink_eval_cli.main(["--model", str(tiny_chat_model), "--model", str(second_model), "--data", str(eval_rows),
                    "--ilql-heads", str(run), "--beta", "2", *FLAGS])
    # the heads' LM (the frozen base), each --model, then the base again for the NLL of all samples
    assert [p for p, _, _ in loads] == [tiny_chat_model, tiny_chat_model, second_model, tiny_chat_model]
    assert all(device is marker for _, device, _ in loads)
    assert [resident for _, _, resident in loads] == [0, 0, 0, 0]


@pytest.mark.parametrize("train_lm", ["false", "true"])
def test_ilql_heads_reproduce_the_runs_own_eval(tiny_chat_model, eval_rows, tmp_path, monkeypatch, train_lm):
    """train_ilql's eval.json column for β = 2 (its gen_style and top-k, its LM when it trained one, NLL under
    the base), reproduced from the run directory alone."""
    data = write_pairs(tmp_path / "p.jsonl", 2)
    monkeypatch.setattr("sys.argv", [
        "train_ilql.py", "--model", str(tiny_chat_model), "--data", str(data), "--eval-data", str(eval_rows),
        "--out-dir", str(tmp_path / "out"), "--run", "r", "--eval-max-new-tokens", "6", "--eval-betas", "2",
        "--gen-style", "trlx", "--eval-top-k", "3", "--train-lm", train_lm, "--epochs", "1",
        "--batch-size", "4", "--head-lr", "1e-2", "--lr", "1e-3"])
    train_ilql.main()
    run, out = tmp_path / "out" / "r", tmp_path / "cli.json"
    common = ["--model", str(tiny_chat_model), "--data", str(eval_rows), "--n", "2", "--max-new-tokens", "6",
              "--ilql-heads", str(run), "--beta", "2", "--out", str(out)]
    pink_eval_cli.main(common)
    own, cli = (without_seconds(json.loads(p.read_text())) for p in (run / "eval.json", out))
    assert cli["ILQL β=2"] == own["ILQL β=2"] and cli[str(tiny_chat_model)] == own["base"]

    # flags override the run's decoding: here Snell's style without top-k, checked against evaluate()
    pink_eval_cli.main([*common, "--gen-style", "snell", "--top-k", "0"])
    tok, base = Tokenizer(tiny_chat_model), load_model(tiny_chat_model).eval()
    policy = load_model(run / "model").eval() if train_lm == "true" else base
    hook = ilql_logits_hook(load_heads(run / "ilql_heads.safetensors", policy), 2.0, 0.7, 0, "snell")
    expected = pink_eval.evaluate(policy, tok, load_eval_rows(eval_rows), base, n=2, max_new_tokens=6,
                                  logits_hook=hook)
    overridden = without_seconds(json.loads(out.read_text()))["ILQL β=2"]
    assert overridden == without_seconds({"x": expected})["x"] and overridden != own["ILQL β=2"]


@pytest.mark.parametrize("case, message", [
    ("missing", "--ilql-heads {run}: no ilql_heads.safetensors and config.json there"),
    ("vocab", "heads for vocabulary 128 and hidden size 64, but the model has 320 and 64"),
    ("no heads", "--beta, --gen-style and --top-k steer ILQL heads: add --ilql-heads RUN_DIR"),
])
def test_bad_ilql_input_is_one_line(tiny_chat_model, tiny_dirs, eval_rows, tmp_path, monkeypatch, capsys,
                                    case, message):
    run = tmp_path / "run"
    if case == "vocab":  # heads trained on another model (vocabulary 128, not 320)
        heads_run(run, load_model(tiny_dirs["llama-gqa-tied"]))
    args = ["--ilql-heads", str(run), "--beta", "8"] if case != "no heads" else ["--beta", "8"]
    monkeypatch.setattr("sys.argv", ["pink_eval", "--model", str(tiny_chat_model), "--data", str(eval_rows),
                                     "--out", str(tmp_path / "out.json"), *args])
    with pytest.raises(SystemExit) as info:
        run_cli(pink_eval_cli.main)
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and err.startswith("error: ") and "\n" not in err
    assert message.format(run=run) in err and not (tmp_path / "out.json").exists()

