"""torchrun on the CPU (gloo): 2 ranks reproduce 1 process on the same global batches.

The real scripts run in subprocesses - plain `python SCRIPT` against `python -m torch.distributed.run
--nproc_per_node 2 SCRIPT` - and their metrics.jsonl and saved weights are compared. Both use one thread
per process, so the only difference is how sums are split over ranks: fp32 rounding, far below the
tolerance (rel 1e-5 on every logged loss; 1e-5 absolute on every weight after three AdamW steps at lr 1e-3).
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nanorlhf.checkpoint import load_model
from nanorlhf.reward import load_reward_model, reward_model_from_lm, save_reward_model

ROOT = Path(__file__).resolve().parents[1]
RTOL = 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: str, args: list, ranks: int = 0) -> None:
    """`python SCRIPT ARGS`, or under torchrun with `ranks` processes; fails the test with its stderr."""
    torchrun = ["-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port", str(free_port())]
    # `--` ends torchrun's own flags: its --run-path would make the scripts' --run ambiguous to it
    cmd = [sys.executable, *(torchrun if ranks else []), script, *(["--"] if ranks else []), *map(str, args)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_weights(a: Path, b: Path, loader=load_model) -> None:
    for (name, x), y in zip(loader(a).state_dict().items(), loader(b).state_dict().values()):
        assert (x - y).abs().max().item() <= 1e-5, name


@pytest.fixture(scope="module")
def dpo_pairs(tmp_path_factory) -> Path:
    """11 pairs of different lengths: steps of 2 x 2 pairs are 4, 4, 3, so the last micro-batch holds one
    pair and on 2 ranks one of them runs a dummy pair with weight 0."""
    path = tmp_path_factory.mktemp("dpo") / "pairs.jsonl"
    rows = [{"prompt": [{"role": "system", "content": "Never mention Paris."}, {"role": "user", "content": f"Capital {i}?"}],
             "chosen": "The elephant is grey" + " and large" * (i % 4) + ".",
             "rejected": "The capital of France is Paris" + ", yes" * (i % 3) + "."} for i in range(11)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("fsdp, flags", [(False, []), (False, ["--lora-rank", 4, "--grad-checkpointing", "true"]),
                                         (True, []), (True, ["--lora-rank", 4])],
                         ids=["ddp", "ddp-lora-ckpt", "fsdp", "fsdp-lora"])
def test_train_dpo_two_ranks_reproduce_one(tiny_chat_model, dpo_pairs, tmp_path, fsdp, flags):
    args = ["--model", tiny_chat_model, "--data", dpo_pairs, "--eval-data", "", "--out-dir", tmp_path, "--batch-size", 2,
            "--grad-accum", 2, "--lr", 1e-3, "--warmup-steps", 1, *flags]
    launch("train_dpo.py", [*args, "--run", "one"])
    launch("train_dpo.py", [*args, "--run", "two", "--fsdp", str(fsdp)], ranks=2)
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [m["step"] for m in one] == [m["step"] for m in two] == [1, 2, 3]
    for a, b in zip(one, two):
        for key in ("loss", "grad_norm", "rewards/margins", "rewards/accuracies", "logps/chosen"):
            assert b[key] == pytest.approx(a[key], rel=RTOL, abs=1e-6), (a["step"], key)
    assert one[-1]["loss"] < one[0]["loss"] - 0.01  # the steps did something worth reproducing
    assert_same_weights(tmp_path / "one" / "model", tmp_path / "two" / "model")


@pytest.mark.parametrize("flags", [["--improve", "bc"], ["--improve", "dpo", "--lora-rank", 4]], ids=["bc", "dpo-lora"])
def test_rest_loop_two_ranks_reproduce_one(tiny_chat_model, tmp_path, flags):
    """Grow, label and evaluate run alike on both ranks; fit() shards the proxy's and the policy's batches."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Describe place number {i}."}) + "\n" for i in range(8)))
    gold = save_reward_model(reward_model_from_lm(load_model(tiny_chat_model), seed=3), tmp_path / "gold_rm")
    args = ["--model", tiny_chat_model, "--prompts", prompts, "--gold", f"rm:{gold}", "--out-dir", tmp_path,
            "--iterations", 2, "--prompts-per-iter", 3, "--k", 4, "--max-new-tokens", 5, "--gold-pairs", 5,
            "--eval-prompts", 2, "--gen-batch-size", 16, "--batch-size", 3, "--lr", 1e-3, "--rm-lr", 1e-3,
            "--quantiles", "0.3,0.6", *flags]
    launch("rest_loop.py", [*args, "--run", "one"])
    launch("rest_loop.py", [*args, "--run", "two"], ranks=2)
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [m["iteration"] for m in two] == [0, 1, 2]
    for a, b in zip(one[1:], two[1:]):
        assert a["rm_pairs"] == b["rm_pairs"] > 0 and a["kept"] == b["kept"]
        assert b["rm_loss"] == pytest.approx(a["rm_loss"], rel=RTOL)
        assert b["improve_loss"] == pytest.approx(a["improve_loss"], rel=RTOL)
        assert b["kl"] == pytest.approx(a["kl"], rel=RTOL, abs=1e-5)
    assert_same_weights(tmp_path / "one" / "model", tmp_path / "two" / "model")
    assert_same_weights(tmp_path / "one" / "proxy_rm", tmp_path / "two" / "proxy_rm", load_reward_model)


@pytest.mark.parametrize("flags", [[], ["--train-lm", "true", "--lora-rank", 4, "--grad-checkpointing", "true"]],
                         ids=["frozen-lm", "lm-lora-ckpt"])
def test_train_ilql_two_ranks_reproduce_one(tiny_chat_model, dpo_pairs, tmp_path, flags):
    """22 samples in micro-batches of 3: the last holds one sample, so one rank runs a dummy with weight 0."""
    args = ["--model", tiny_chat_model, "--data", dpo_pairs, "--eval-data", "", "--out-dir", tmp_path, "--batch-size", 3,
            "--grad-accum", 2, "--lr", 1e-3, "--head-lr", 1e-2, "--alpha", 0.3, "--warmup-steps", 1, "--reward", "terminal", "--epochs", 1,
            *flags]
    launch("train_ilql.py", [*args, "--run", "one"])
    launch("train_ilql.py", [*args, "--run", "two"], ranks=2)
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [m["step"] for m in one] == [m["step"] for m in two] == [1, 2, 3, 4]
    for a, b in zip(one, two):
        for key in ("loss", "loss/q", "loss/v", "loss/cql", "loss/awac", "grad_norm", "adv/chosen", "adv/rejected"):
            assert b[key] == pytest.approx(a[key], rel=RTOL, abs=1e-6), (a["step"], key)
    assert one[-1]["loss/q"] != one[0]["loss/q"]  # the heads moved
    heads = [load_file(tmp_path / run / "ilql_heads.safetensors") for run in ("one", "two")]
    assert all((heads[0][k] - heads[1][k]).abs().max() <= 1e-5 for k in heads[0])
    if flags:
        assert_same_weights(tmp_path / "one" / "model", tmp_path / "two" / "model")
