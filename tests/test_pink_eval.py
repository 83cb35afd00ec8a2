"""python tools/pink_eval.py: the same numbers as evaluate() in memory, one model resident at a time
on the run's device(), and its --help. (A trained ILQL run's decoding: train_ilql.py --evaluate,
tests/test_ilql.py.)"""

import json
import shutil
import weakref

import pytest
import torch

from nanorlhf.tasks import pink as pink_eval
from tools import pink_eval as pink_eval_cli
from nanorlhf.checkpoint import load_model
from nanorlhf.tasks.pink import load_eval_rows
from nanorlhf.tokenizer import Tokenizer
from conftest import make_hf_model


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


FLAGS = ["--n", "2", "--max-new-tokens", "6", "--seed", "3"]


def test_cli_equals_evaluate_in_memory(tiny_chat_model, second_model, eval_rows, tmp_path):
    """What the CLI did before it loaded one model at a time: every model resident, evaluate() on
    each."""
    out = tmp_path / "out.json"
    pink_eval_cli.main(["--model", str(tiny_chat_model), "--model", str(second_model),
                        "--data", str(eval_rows), *FLAGS, "--out", str(out)])
    tok, rows = Tokenizer(tiny_chat_model), load_eval_rows(eval_rows)
    base, other = load_model(tiny_chat_model).eval(), load_model(second_model).eval()
    expected = {str(d): pink_eval.evaluate(m, tok, rows, base, n=2, max_new_tokens=6, seed=3)
                for d, m in ((tiny_chat_model, base), (second_model, other))}
    assert without_seconds(json.loads(out.read_text())) == without_seconds(expected)


def test_one_model_resident_at_a_time_on_the_run_device(tiny_chat_model, second_model, eval_rows,
                                                        tmp_path, monkeypatch):
    marker, loads, live = object(), [], []  # a fake device: load_model must be handed device()

    def counting_load(path, dtype=torch.float32, device="cpu"):
        loads.append((path, device, sum(ref() is not None for ref in live)))
        model = load_model(path, dtype)
        live.append(weakref.ref(model))
        return model

    monkeypatch.setattr("tools.pink_eval.device", lambda: marker)
    monkeypatch.setattr(pink_eval_cli, "load_model", counting_load)
    pink_eval_cli.main(["--model", str(tiny_chat_model), "--model", str(second_model),
                        "--data", str(eval_rows), *FLAGS])
    # each --model, then the base again for the NLL of all samples
    assert [p for p, _, _ in loads] == [tiny_chat_model, second_model, tiny_chat_model]
    assert all(device is marker for _, device, _ in loads)
    assert [resident for _, _, resident in loads] == [0, 0, 0]


def test_help_names_the_tool_and_shows_its_defaults(capsys):
    with pytest.raises(SystemExit) as done:
        pink_eval_cli.main(["--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0 and out.startswith("usage: python tools/pink_eval.py")
    assert "first one is the base for the NLL (default: llama)" in out
    assert "samples per prompt (default: 4)" in out
