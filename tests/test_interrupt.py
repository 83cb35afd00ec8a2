"""Ctrl-C in every training script, and the non-finite stops the RL loops were missing.

Ctrl-C is a real SIGINT, sent to this process by a test hook at the start of a chosen step (no
timing race): the script saves what its finished steps learned as its normal end would (nothing at
all before the first step), prints one line and exits 130; RUN/state/ stays, so --resume still
works. The saved weights are compared with RUN/state/, written (--save-every 1) after the very
step the line names."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import qdaif
import rest_loop
import train_dpo
import train_grpo
import train_ilql
import train_ppo
import train_rm
from nanorlhf.errors import NonFiniteLogits, UserError
from nanorlhf.sampling import sample_next
from test_ilql import write_pairs as ilql_pairs
from test_rest import ToyGold, write_prompts
from test_train_dpo import write_pairs as dpo_pairs
from test_train_grpo import even_length, write_problems
from test_train_rm import fake_ratings

ROOT = Path(__file__).resolve().parent.parent


# --- the harness: a script's command line, run in this process; Ctrl-C at a chosen step ---

def run_script(monkeypatch, module, argv: list) -> int:
    """python MODULE.py ARGV as its __main__ runs it (run_cli(main)) -> the exit status."""
    monkeypatch.setattr("sys.argv", [f"{module.__name__}.py", *map(str, argv)])
    try:
        module.run_cli(module.main)
    except SystemExit as e:
        return e.code
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped the script: a traceback, not one line")
    return 0


def ctrl_c_when(monkeypatch, owner, name: str, at) -> None:
    """owner.name sends this process SIGINT, as a terminal's Ctrl-C does, on the call whose
    arguments make at(*args) true; Python raises KeyboardInterrupt right there."""
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    real = getattr(owner, name)

    def hooked(*args, **kwargs):
        if at(*args):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the handler raises KeyboardInterrupt before this ends
            pytest.fail("SIGINT did not interrupt")
        return real(*args, **kwargs)
    monkeypatch.setattr(owner, name, hooked)


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def last_line(err: str) -> str:
    assert "Traceback" not in err, err
    return err.rstrip("\n").splitlines()[-1]


# --- one tiny run per script: its flags and where the hook fires (after n finished steps) ---

def dpo_case(model, tmp, gold, monkeypatch):
    argv = ["--model", model, "--data", dpo_pairs(tmp / "p.jsonl", 6), "--eval-data", "",
            "--batch-size", 2, "--grad-accum", 1, "--lr", 1e-2, "--warmup-steps", 1]
    # lr_at(step, ...) opens every step: step == n means n steps are done
    return argv, (train_dpo, "lr_at", lambda n: lambda step, *a: step == n)


def rm_case(model, tmp, gold, monkeypatch):
    folder = fake_ratings(tmp / "ratings", per_source=20)
    monkeypatch.setattr(train_rm.human_ratings, "ensure_ratings", lambda sdist=None: folder)
    argv = ["--model", model, "--train-pairs", 12, "--batch-size", 4, "--epochs", 1,
            "--eval-pairs", 4, "--eval-texts", 6, "--eval-base", "false", "--lr", 1e-3,
            "--head-lr", 1e-2, "--warmup-steps", 1]
    return argv, (train_rm, "lr_at", lambda n: lambda step, *a: step == n)


def ppo_case(model, tmp, gold, monkeypatch):
    argv = ["--model", model, "--prompts", write_prompts(tmp / "p.jsonl", 10), "--reward",
            f"rm:{gold}", "--batch-size", 4, "--minibatch-size", 4, "--ppo-epochs", 1,
            "--max-new-tokens", 4, "--eval-prompts", 2, "--eval-n", 1, "--steps", 3,
            "--lr", 3e-3, "--warmup-steps", 1]
    return argv, (train_ppo, "step_rows", lambda n: lambda pool, step, *a: step == n)


def grpo_case(model, tmp, gold, monkeypatch):
    monkeypatch.setattr(train_grpo, "check", even_length)  # rewards that differ in a group
    argv = ["--model", model, "--train-problems", write_problems(tmp / "train.jsonl", 8),
            "--heldout-problems", write_problems(tmp / "held.jsonl", 2, offset=40),
            "--prompts-per-step", 2, "--group-size", 2, "--minibatch-size", 4,
            "--micro-batch-size", 4, "--max-new-tokens", 4, "--eval-n", 1, "--eval-k", 1,
            "--steps", 3, "--lr", 3e-3, "--warmup-steps", 1]
    return argv, (train_grpo, "step_rows", lambda n: lambda pool, step, *a: step == n)


def ilql_case(model, tmp, gold, monkeypatch):
    argv = ["--model", model, "--data", ilql_pairs(tmp / "p.jsonl", 3), "--eval-data", "",
            "--batch-size", 2, "--grad-accum", 1, "--epochs", 1, "--lr", 1e-3,
            "--head-lr", 1e-2]
    return argv, (train_ilql, "lr_at", lambda n: lambda step, *a: step == n)


def rest_case(model, tmp, gold, monkeypatch):
    monkeypatch.setattr(rest_loop, "make_gold_scorer", lambda spec, **kw: ToyGold())
    argv = ["--model", model, "--prompts", write_prompts(tmp / "p.jsonl", 6), "--iterations", 2,
            "--prompts-per-iter", 2, "--k", 2, "--max-new-tokens", 4, "--gold-pairs", 2,
            "--eval-prompts", 2, "--eval-n", 2, "--batch-size", 4, "--lr", 1e-3,
            "--quantiles", "0.5"]
    # prompt_chunk(pool, t, n) opens iteration t: t == n + 1 means n iterations are done
    return argv, (rest_loop, "prompt_chunk", lambda n: lambda pool, t, *a: t == n + 1)


def qdaif_case(model, tmp, gold, monkeypatch):
    argv = ["--model", model, "--iterations", 6, "--init-iterations", 2, "--batch-size", 2,
            "--max-new-tokens", 6]
    # PoetryDomain._generate writes each batch's poems: with n lines in metrics.jsonl, n batches
    # are done
    metrics = tmp / "out" / "r" / "metrics.jsonl"
    logged = lambda: len(metrics.read_text().splitlines()) if metrics.exists() else 0
    return argv, (qdaif.PoetryDomain, "_generate", lambda n: lambda *a: logged() == n)


# script -> (its flags and hook, the unit the line counts, what the line says is saved and where
# (in RUN), [(a saved file, the prefix of its tensors' names in RUN/state; None: QDAIF's elites)])
SCRIPTS = {
    "train_dpo": (train_dpo, dpo_case, "step", "model", "model",
                  [("model/model.safetensors", "")]),
    "train_rm": (train_rm, rm_case, "step", "RM", "rm", [("rm/model.safetensors", "")]),
    "train_ppo": (train_ppo, ppo_case, "step", "model", "model",
                  [("model/model.safetensors", "policy.")]),
    "train_grpo": (train_grpo, grpo_case, "step", "model", "model",
                   [("model/model.safetensors", "")]),
    "train_ilql": (train_ilql, ilql_case, "step", "heads", "ilql_heads.safetensors",
                   [("ilql_heads.safetensors", "heads.")]),
    "rest_loop": (rest_loop, rest_case, "iteration",
                  "the current policy (model/) and proxy RM (proxy_rm/)", "",
                  [("model/model.safetensors", "policy."),
                   ("proxy_rm/model.safetensors", "proxy.")]),
    "qdaif": (qdaif, qdaif_case, "batch", "archive, poems and plots", "",
              [("elites.jsonl", None)]),
}


@pytest.fixture(scope="module")
def gold_rm(tiny_chat_model, tmp_path_factory):
    """A random-head RM on the tiny model: PPO's reward."""
    from nanorlhf.checkpoint import load_model
    from nanorlhf.reward import reward_model_from_lm, save_reward_model
    return save_reward_model(reward_model_from_lm(load_model(tiny_chat_model), seed=3),
                             tmp_path_factory.mktemp("gold") / "rm")


def tiny_run(name, tiny_chat_model, tmp_path, gold_rm, monkeypatch):
    """-> the script's module, its command line (into tmp_path/out/r) and hook(n) -> the
    (owner, name, at) of a Ctrl-C after n finished steps."""
    module, make = SCRIPTS[name][:2]
    argv, (owner, attr, at) = make(tiny_chat_model, tmp_path, gold_rm, monkeypatch)
    argv += ["--out-dir", tmp_path / "out", "--run", "r", "--threads", 1]
    argv += ["--save-every", 1] if name != "rest_loop" else []  # ReST saves every iteration
    return module, argv, lambda n: (owner, attr, at(n))


@pytest.mark.parametrize("name", SCRIPTS)
def test_ctrl_c_after_a_step_saves_what_it_learned_in_one_line_and_resumes(
        name, tiny_chat_model, tmp_path, gold_rm, monkeypatch, capsys):
    module, argv, hook = tiny_run(name, tiny_chat_model, tmp_path, gold_rm, monkeypatch)
    unit, what, where, saved = SCRIPTS[name][2:]
    inputs = files(tmp_path)
    with monkeypatch.context() as patch:
        ctrl_c_when(patch, *hook(1))
        assert run_script(monkeypatch, module, argv) == 130
    run = tmp_path / "out" / "r"
    line = (f"interrupted after {unit} 1: {what} in {run / where if where else run}; "
            f"--resume {run} continues after {unit} 1")
    assert last_line(capsys.readouterr().err) == line
    # nothing outside the run dir: the inputs as they were, every new file inside RUN
    after = files(tmp_path)
    assert {k: v for k, v in after.items() if k in inputs} == inputs
    assert all(k.startswith(f"out{os.sep}r{os.sep}") for k in after.keys() - inputs.keys())
    # what was saved is what step 1 learned: RUN/state/ holds what training had after step 1
    state = load_file(run / "state" / "state.safetensors")
    base = load_file(Path(tiny_chat_model) / "model.safetensors")
    for path, prefix in saved:
        if prefix is None:  # QDAIF: the archive after batch 1, as its state has it
            elites = json.loads((run / "state" / "state.json").read_text())["elites"]
            rows = [json.loads(line) for line in (run / path).read_text().splitlines()]
            assert rows and sorted(r["id"] for r in rows) == sorted(e["id"] for e in elites)
            continue
        tensors = load_file(run / path)
        assert all(torch.equal(value, state[prefix + key]) for key, value in tensors.items())
        shared = [k for k in tensors if k in base]  # a trained backbone, not the base
        assert not shared or any(not torch.equal(tensors[k], base[k]) for k in shared)
    # resumed, the run counts the steps before its resume: a Ctrl-C at once says the same
    with monkeypatch.context() as patch:
        ctrl_c_when(patch, *hook(1))
        assert run_script(monkeypatch, module, ["--resume", run]) == 130
    assert last_line(capsys.readouterr().err) == line
    # and resumed again, it continues from its state to its end
    assert run_script(monkeypatch, module, ["--resume", run]) == 0


@pytest.mark.parametrize("name", SCRIPTS)
def test_ctrl_c_before_the_first_step_saves_nothing(name, tiny_chat_model, tmp_path, gold_rm,
                                                    monkeypatch, capsys):
    module, argv, hook = tiny_run(name, tiny_chat_model, tmp_path, gold_rm, monkeypatch)
    unit, saved = SCRIPTS[name][2], SCRIPTS[name][5]
    ctrl_c_when(monkeypatch, *hook(0))
    assert run_script(monkeypatch, module, argv) == 130
    assert last_line(capsys.readouterr().err) == \
        f"interrupted before the first {unit}: nothing saved"
    run = tmp_path / "out" / "r"
    assert not any((run / path).parent.exists() if "/" in path else (run / path).exists()
                   for path, _ in saved)  # never the untouched model labelled as trained


# --- non-finite numbers: one line naming the step and the flag, exit 2, no model saved ---

def test_non_finite_logits_are_one_user_error_not_torch_s():
    logits = torch.zeros(2, 5)
    logits[1, 3] = float("inf")  # what weights that overflow give
    with pytest.raises(NonFiniteLogits, match="logits overflow") as info:
        sample_next(logits, 1.0, 0, 1.0, torch.Generator().manual_seed(0))
    assert isinstance(info.value, UserError)  # run_cli: one line, exit 2
    masked = torch.zeros(2, 5)
    masked[:, :2] = float("-inf")  # tokens a filter or a logits hook ruled out: still sampled
    assert sample_next(masked, 1.0, 0, 1.0, torch.Generator().manual_seed(0)).min() >= 2


def huge_after_the_first_step(monkeypatch):
    """The first optimizer step leaves every weight it trains finite but huge (1e15), as an lr
    far too high does: the next forward's logits are NaN."""
    real = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    p.fill_(1e15)
        monkeypatch.setattr(torch.optim.AdamW, "step", real)
        return out
    monkeypatch.setattr(torch.optim.AdamW, "step", step)


def nan_loss(monkeypatch, owner, name: str) -> None:
    """owner.name's loss (or a (loss, count) pair's) times NaN: a loss gone non-finite."""
    real = getattr(owner, name)

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        if isinstance(out, tuple):
            return (out[0] * float("nan"), *out[1:])
        return out * float("nan")
    monkeypatch.setattr(owner, name, poisoned)


OVERFLOW = "the policy's logits overflow (next-token probabilities are nan) — lower --lr"


@pytest.mark.parametrize("name, flags, poison, line", [
    # the sampler meets NaN logits (the weights of step 1 overflow) at step 2's rollout
    ("train_ppo", [], huge_after_the_first_step, f"step 2: {OVERFLOW}"),
    ("train_grpo", ["--sampler", "batch"], huge_after_the_first_step, f"step 2: {OVERFLOW}"),
    # GRPO's default sampler (fast/decode.py) draws from NaN without a word: step 2's update stops
    ("train_grpo", [], huge_after_the_first_step, "step 2: grad_norm is nan — lower --lr"),
    # ReST with a proxy that never trains: Improve makes the first step; π_1's evaluation samples
    ("rest_loop", ["--rm-epochs", 0], huge_after_the_first_step, f"iteration 1: {OVERFLOW}"),
    # the gradient norms now checked before every optimizer step
    ("train_grpo", [], lambda mp: nan_loss(mp, train_grpo, "reduce_loss"),
     "step 1: grad_norm is nan — lower --lr"),
    ("rest_loop", [], lambda mp: nan_loss(mp, rest_loop, "bc_loss"),
     "step 1 of Improve 1: grad_norm is nan — lower --lr"),
    ("rest_loop", [], lambda mp: nan_loss(mp, rest_loop, "bradley_terry_sum"),
     "step 1 of the proxy RM's epoch 1: grad_norm is nan — lower --rm-lr or --rm-head-lr"),
], ids=["ppo-logits", "grpo-logits", "grpo-stream-logits", "rest-logits", "grpo-grad",
        "rest-policy-grad", "rest-proxy-grad"])
def test_a_non_finite_step_stops_in_one_line_and_saves_no_model(name, flags, poison, line,
                                                                 tiny_chat_model, tmp_path,
                                                                 gold_rm, monkeypatch, capsys):
    module, argv, _ = tiny_run(name, tiny_chat_model, tmp_path, gold_rm, monkeypatch)
    argv += flags
    poison(monkeypatch)
    assert run_script(monkeypatch, module, argv) == 2
    assert last_line(capsys.readouterr().err) == f"error: {line}"
    run = tmp_path / "out" / "r"
    assert not (run / "model").exists() and not (run / "proxy_rm").exists()


# --- a real process: Ctrl-C anywhere ends in one line and status 130, never a traceback ---

# python train_ppo.py ARGS, with SIGINT sent to itself when train_ppo.NAME(*args) is called with
# args[1] == AT (step_rows(pool, step, ...)), or on its first call if AT is "first"
SIGINT_AT = """
import os, signal, sys
import train_ppo
name, at = sys.argv[1], sys.argv[2]
real = getattr(train_ppo, name)
def hooked(*args, **kwargs):
    if at == "first" or args[1] == int(at):
        os.kill(os.getpid(), signal.SIGINT)
    return real(*args, **kwargs)
setattr(train_ppo, name, hooked)
sys.argv = ["train_ppo.py", *sys.argv[3:]]
train_ppo.run_cli(train_ppo.main)
"""


@pytest.mark.parametrize("hook, line", [
    (["step_rows", "1"], "interrupted after step 1: model in {run}/model"),
    (["load_model", "first"], "interrupted"),  # before training: run_cli's line
], ids=["after-step-1", "loading"])
def test_ctrl_c_in_a_real_process_is_one_line_and_status_130(hook, line, tiny_chat_model,
                                                            tmp_path, gold_rm):
    argv, _ = ppo_case(tiny_chat_model, tmp_path, gold_rm, None)
    run = tmp_path / "out" / "r"
    done = subprocess.run(
        [sys.executable, "-c", SIGINT_AT, *hook, *map(str, argv), "--out-dir", tmp_path / "out",
         "--run", "r", "--threads", "1"], cwd=tmp_path, capture_output=True, text=True,
        timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 130, done.stderr
    assert last_line(done.stderr.replace("\r", "\n")) == line.format(run=run)
    assert (run / "model").exists() == (hook == ["step_rows", "1"])
