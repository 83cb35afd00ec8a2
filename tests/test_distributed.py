"""torchrun on the CPU (gloo): 2 ranks reproduce 1 process on the same global batches.

The real scripts run in subprocesses - plain `python SCRIPT` against
`python -m torch.distributed.run --nproc_per_node 2 SCRIPT` - and their metrics.jsonl and saved
weights are compared. Both use one thread per process, so the only difference is how sums are
split over ranks: fp32 rounding. The tolerances follow from that arithmetic, not from one CPU's
kernels (AVX2 and AVX-512 round differently):

- Logged losses, gradient norms, rewards: rel 1e-5. Each is a short chain of fp32 sums
  (eps = 2^-24 ~ 6e-8) over a few hundred terms, so reordering moves it by ~1e-6 relative at most.
  Later steps' losses also see the weights, but only through elements whose gradient is well above
  rounding noise (see below).
- Weights: not element by element. AdamW's step lr·m̂/(√v̂+ε) is scale-free, so an element whose
  gradient is a sum that cancels to |g| << Σ|terms| carries the sum's rounding (eps·Σ|terms|) as a
  *relative* error eps·Σ|terms|/|g| into its update - up to a whole step, whatever the tolerance
  (the AVX-512 failure of a 1e-5 elementwise check on gate_proj). Such elements are rare, and each
  moves by at most (1-β1)/√(1-β2)·lr ≈ 3.2·lr per step (Kingma & Ba's bound), so over the whole
  model the difference between the runs stays a small fraction of the update the training made:
  for n-term gradient sums the expected ratio is at most about √(2·eps·√n) ≈ 1e-3 for
  n ~ 100-1000 (measured: ≤ 4e-5). We assert ‖w₂ - w₁‖ ≤ 2e-2·‖w₁ - w₀‖. Real bugs land far
  above it: ranks that do not average gradients, an unmerged LoRA or an unsaved FSDP shard make
  the ratio ≥ 0.3 (an unmerged adapter: 1.0).
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
    """`python SCRIPT ARGS`, or under torchrun with `ranks` processes; fails the test with its
    stderr."""
    torchrun = [
        "-m", "torch.distributed.run",
        "--nproc_per_node", str(ranks),
        "--master_port", str(free_port()),
    ]
    # `--` ends torchrun's own flags: its --run-path would make the scripts' --run ambiguous to it
    cmd = [
        sys.executable,
        *(torchrun if ranks else []),
        script,
        *(["--"] if ranks else []),
        *map(str, args),
    ]
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    }
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


UPDATE_RTOL = 2e-2  # ‖w₂ - w₁‖ / ‖w₁ - w₀‖: see the module docstring
# (1-β1)/√(1-β2): the largest move of one AdamW step, / lr
ADAM_STEP = 0.1 / 0.999 ** 0.5 / (1 - 0.999) ** 0.5


def update_ratio(start: dict, one: dict, two: dict) -> float:
    """‖two - one‖ / ‖one - start‖ over all tensors together: how far apart two runs that made the
    same update are, as a fraction of that update."""
    apart = sum(float((two[k].double() - one[k].double()).pow(2).sum()) for k in one)
    moved = sum(float((one[k].double() - start[k].double()).pow(2).sum()) for k in one)
    assert moved > 0, "the runs did not train: nothing to compare"
    return (apart / moved) ** 0.5


def assert_same_weights(start: Path, a: Path, b: Path) -> None:
    """Saved weights of run a and run b (both trained from the weights at `start`) made the same
    update."""
    w0, w1, w2 = (load_model(p).state_dict() for p in (start, a, b))
    assert list(w1) == list(w2)
    assert update_ratio(w0, w1, w2) <= UPDATE_RTOL


@pytest.fixture(scope="module")
def dpo_pairs(tmp_path_factory) -> Path:
    """11 pairs of different lengths: steps of 2 x 2 pairs are 4, 4, 3, so the last micro-batch
    holds one pair and on 2 ranks one of them runs a dummy pair with weight 0."""
    path = tmp_path_factory.mktemp("dpo") / "pairs.jsonl"
    rows = [
        {
            "prompt": [
                {"role": "system", "content": "Never mention Paris."},
                {"role": "user", "content": f"Capital {i}?"},
            ],
            "chosen": "The elephant is grey" + " and large" * (i % 4) + ".",
            "rejected": "The capital of France is Paris" + ", yes" * (i % 3) + ".",
        }
        for i in range(11)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    "fsdp, flags",
    [
        (False, []),
        (False, ["--lora-rank", 4, "--grad-checkpointing", "true"]),
        (True, []),
        (True, ["--lora-rank", 4]),
    ],
    ids=["ddp", "ddp-lora-ckpt", "fsdp", "fsdp-lora"],
)
def test_train_dpo_two_ranks_reproduce_one(tiny_chat_model, dpo_pairs, tmp_path, fsdp, flags):
    args = [
        "--model", tiny_chat_model,
        "--data", dpo_pairs,
        "--eval-data", "",
        "--out-dir", tmp_path,
        "--batch-size", 2,
        "--grad-accum", 2,
        "--lr", 1e-3,
        "--warmup-steps", 1,
        *flags,
    ]
    launch("train_dpo.py", [*args, "--run", "one"])
    # RUN/state holds whole tensors, not FSDP's shards: --fsdp needs --save-every 0
    launch("train_dpo.py", [*args, "--run", "two", "--fsdp", str(fsdp), "--save-every", 0], ranks=2)
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [m["step"] for m in one] == [m["step"] for m in two] == [1, 2, 3]
    for a, b in zip(one, two):
        for key in ("loss", "grad_norm", "rewards/margins", "rewards/accuracies", "logps/chosen"):
            assert b[key] == pytest.approx(a[key], rel=RTOL, abs=1e-6), (a["step"], key)
    assert one[-1]["loss"] < one[0]["loss"] - 0.01  # the steps did something worth reproducing
    assert_same_weights(tiny_chat_model, tmp_path / "one" / "model", tmp_path / "two" / "model")


@pytest.mark.parametrize(
    "flags",
    [["--improve", "bc"], ["--improve", "dpo", "--lora-rank", 4]],
    ids=["bc", "dpo-lora"],
)
def test_rest_loop_two_ranks_reproduce_one(tiny_chat_model, tmp_path, flags):
    """Grow, label and evaluate run alike on both ranks; fit() shards the proxy's and the policy's
    batches."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": f"Describe place number {i}."}) + "\n" for i in range(8))
    )
    gold = save_reward_model(
        reward_model_from_lm(load_model(tiny_chat_model), seed=3), tmp_path / "gold_rm"
    )
    args = [
        "--model", tiny_chat_model,
        "--prompts", prompts,
        "--gold", f"rm:{gold}",
        "--out-dir", tmp_path,
        "--iterations", 2,
        "--prompts-per-iter", 3,
        "--k", 4,
        "--max-new-tokens", 5,
        "--gold-pairs", 5,
        "--eval-prompts", 2,
        "--gen-batch-size", 16,
        "--batch-size", 3,
        "--lr", 1e-3,
        "--rm-lr", 1e-3,
        "--quantiles", "0.3,0.6",
        *flags,
    ]
    launch("rest_loop.py", [*args, "--run", "one"])
    launch("rest_loop.py", [*args, "--run", "two"], ranks=2)
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [m["iteration"] for m in two] == [0, 1, 2]
    for a, b in zip(one[1:], two[1:]):
        assert a["rm_pairs"] == b["rm_pairs"] > 0 and a["kept"] == b["kept"]
        assert b["rm_loss"] == pytest.approx(a["rm_loss"], rel=RTOL)
        assert b["improve_loss"] == pytest.approx(a["improve_loss"], rel=RTOL)
        assert b["kl"] == pytest.approx(a["kl"], rel=RTOL, abs=1e-5)
    assert_same_weights(tiny_chat_model, tmp_path / "one" / "model", tmp_path / "two" / "model")
    # the proxy starts as the initial policy's backbone and a head drawn from --seed (0)
    proxy_start = reward_model_from_lm(load_model(tiny_chat_model), seed=0).state_dict()
    proxies = [
        load_reward_model(tmp_path / run / "proxy_rm").state_dict() for run in ("one", "two")
    ]
    assert update_ratio(proxy_start, *proxies) <= UPDATE_RTOL


@pytest.mark.parametrize(
    "fsdp, flags",
    [
        (False, []),
        (True, []),
        (False, ["--train-lm", "true", "--lora-rank", 4, "--grad-checkpointing", "true"]),
    ],
    ids=["frozen-lm", "frozen-lm-fsdp", "lm-lora-ckpt"],
)
def test_train_ilql_two_ranks_reproduce_one(tiny_chat_model, dpo_pairs, tmp_path, fsdp, flags):
    """22 samples in micro-batches of 3: the last holds one sample, so one rank runs a dummy with
    weight 0. With --fsdp the frozen LM is sharded (checkpoint.load_model_sharded) and only computes
    the features."""
    args = [
        "--model", tiny_chat_model,
        "--data", dpo_pairs,
        "--eval-data", "",
        "--out-dir", tmp_path,
        "--batch-size", 3,
        "--grad-accum", 2,
        "--lr", 1e-3,
        "--head-lr", 1e-2,
        "--alpha", 0.3,
        "--warmup-steps", 1,
        "--reward", "terminal",
        "--epochs", 1,
        *flags,
    ]
    launch("train_ilql.py", [*args, "--run", "one"])
    launch("train_ilql.py", [*args, "--run", "two", "--fsdp", str(fsdp)], ranks=2)
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [m["step"] for m in one] == [m["step"] for m in two] == [1, 2, 3, 4]
    for a, b in zip(one, two):
        for key in ("loss", "loss/q", "loss/v", "loss/cql", "loss/awac", "grad_norm",
                    "adv/chosen", "adv/rejected"):
            assert b[key] == pytest.approx(a[key], rel=RTOL, abs=1e-6), (a["step"], key)
    assert one[-1]["loss/q"] != one[0]["loss/q"]  # the heads moved
    heads = [load_file(tmp_path / run / "ilql_heads.safetensors") for run in ("one", "two")]
    assert all((heads[0][k] - heads[1][k]).abs().max() <= 1e-5 for k in heads[0])
    if flags:
        assert_same_weights(tiny_chat_model, tmp_path / "one" / "model", tmp_path / "two" / "model")
