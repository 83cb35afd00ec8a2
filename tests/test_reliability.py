"""Crash safety and hostile inputs, the core half (issue 25). Each probe breaks something on
purpose (a fault injected at a write point, a SIGKILL inside a save, a second process, a hostile
name, flag or file) and asserts one line, the previous version of every file kept, and nothing
written outside the run dir. The scripts' own probes (Ctrl-C, NaN mid-training, DPO checkpoints)
live beside the scripts' tests."""

import errno
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

from nanorlhf import checkpoint, distributed
from nanorlhf.atomic import FILE_MODE, atomic_dir, atomic_write_text
from nanorlhf.checkpoint import load_model, save_model
from nanorlhf.errors import UserError
from nanorlhf.run import (LOCK, Run, check_finite, flag, load_state, parse_config, resume_run,
                          run_dir, save_state, seed_everything, state_dir)
from nanorlhf.tokenizer import Tokenizer
from conftest import build_tiny_tokenizer, crash_at_step

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def one_line(fragment: str, fn, *args, **kwargs) -> str:
    """fn(*args) raises a UserError whose message is one line holding `fragment`."""
    with pytest.raises(UserError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert fragment in message and "\n" not in message, message
    return message


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under root -> its bytes (None for a directory, "-> target" for a link)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(root))] = ("-> " + os.readlink(p)).encode()
        else:
            out[str(p.relative_to(root))] = None if p.is_dir() else p.read_bytes()
    return out


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def metric_steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped): nothing runs under it now."""
    code = "import os; print(os.getpid())"
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout)


def raising(error: Exception):
    def fail(*args, **kwargs):
        raise error
    return fail


@dataclass
class Cfg:
    out_dir: str = flag("out", "where runs go")
    run: str = flag("", "run name")
    resume: str = flag("", "run dir to resume")
    lr: float = flag(1e-3, "learning rate", gt=0)
    beta: float = flag(0.1, "no bounds")
    steps: int = flag(3, "steps", min=1)


# --- the atomic writers: an injected fault at each write point keeps the previous version ---

class FullFile:
    """A file object whose write fails as on a full disk."""

    def __init__(self, fd, *args):
        os.close(fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    write = staticmethod(raising(ENOSPC))


@pytest.mark.parametrize("fault", ["write", "fsync", "replace"])
def test_atomic_write_fault_keeps_the_old_file(tmp_path, monkeypatch, fault):
    path = tmp_path / "eval.json"
    atomic_write_text(path, "old\n")
    if fault == "write":
        monkeypatch.setattr(os, "fdopen", FullFile)
    else:
        error = ENOSPC if fault == "fsync" else OSError(errno.EIO, "I/O error")
        monkeypatch.setattr(os, fault, raising(error))
    one_line("eval.json: could not write it", atomic_write_text, path, "new\n")
    monkeypatch.undo()
    assert path.read_text() == "old\n" and names(tmp_path) == ["eval.json"]


@pytest.mark.parametrize("fault", ["enospc-in-block", "replace-into-place"])
def test_atomic_dir_fault_keeps_the_old_dir(tmp_path, monkeypatch, fault):
    target = tmp_path / "model"
    with atomic_dir(target) as d:
        (d / "a").write_text("old")
    if fault == "replace-into-place":  # the swap: PATH -> PATH.old done, PATH.tmp -> PATH fails
        real = os.replace
        monkeypatch.setattr(os, "replace", lambda src, dst: real(src, dst)
                            if str(src) == str(target) else raising(ENOSPC)())
    with pytest.raises(UserError) as info:
        with atomic_dir(target) as d:
            (d / "a").write_text("new")
            if fault == "enospc-in-block":
                raise ENOSPC
    message = str(info.value)
    assert "No space left on device" in message and "\n" not in message
    monkeypatch.undo()
    complete = target if target.exists() else tmp_path / "model.old"  # a crash mid-swap: PATH.old
    assert (complete / "a").read_text() == "old"
    assert not list(tmp_path.glob("*.tmp-*"))
    with atomic_dir(target) as d:  # the next save ends with one complete directory
        (d / "a").write_text("next")
    assert names(tmp_path) == ["model"] and (target / "a").read_text() == "next"


def test_a_stale_temp_of_a_dead_process_is_removed_by_the_next_write(tmp_path):
    dead, alive = dead_pid(), os.getppid()
    for pid in (dead, alive):
        (tmp_path / f"eval.json.tmp-{pid}").write_text("half")
        (tmp_path / f"state.tmp-{pid}").mkdir()
    atomic_write_text(tmp_path / "eval.json", "{}\n")
    with atomic_dir(tmp_path / "state") as d:
        (d / "state.json").write_text("{}")
    # a live writer's temporary stays
    assert names(tmp_path) == sorted(["eval.json", f"eval.json.tmp-{alive}", "state",
                                      f"state.tmp-{alive}"])


def test_writes_never_follow_symbolic_links(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("precious")
    run = tmp_path / "run"
    run.mkdir()
    (run / "eval.json").symlink_to(outside)
    (run / f"config.json.tmp-{os.getpid()}").symlink_to(outside)  # planted as the temporary
    atomic_write_text(run / "eval.json", "{}\n")
    atomic_write_text(run / "config.json", "{}\n")
    assert outside.read_text() == "precious"
    assert not (run / "eval.json").is_symlink() and (run / "eval.json").read_text() == "{}\n"
    assert names(run) == ["config.json", "eval.json"]


SAVE_AND_DIE = textwrap.dedent("""
    import os, signal, sys, torch
    import nanorlhf.run
    from nanorlhf.run import save_state
    run, where = sys.argv[1], sys.argv[2]
    save_state(run, 1, {"w": torch.ones(3)})  # a complete state at step 1
    die = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
    real_replace = os.replace
    if where == "swap":  # killed between PATH -> PATH.old and PATH.tmp -> PATH
        tmp = ".tmp-%d" % os.getpid()
        os.replace = lambda src, dst: die() if str(src).endswith(tmp) else real_replace(src, dst)
    else:  # killed while state.safetensors is being written
        nanorlhf.run.save_file = die
    save_state(run, 2, {"w": torch.full((3,), 2.0)})
""")


@pytest.mark.parametrize("where", ["writing", "swap"])
def test_sigkill_inside_a_save_keeps_a_complete_state(tmp_path, where):
    done = subprocess.run([sys.executable, "-c", SAVE_AND_DIE, str(tmp_path), where], env=ENV,
                          timeout=120, capture_output=True, text=True)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert state_dir(tmp_path).name == ("state.old" if where == "swap" else "state")
    step, tensors, _ = load_state(tmp_path)
    assert step == 1 and torch.equal(tensors["w"], torch.ones(3))
    assert list(tmp_path.glob("state.tmp-*"))  # the killed writer's temporary is still there...
    save_state(tmp_path, 3, {"w": torch.zeros(3)})
    assert names(tmp_path) == ["state"]  # ...until the next save removes it
    assert load_state(tmp_path)[0] == 3


# --- the run directory ---

@pytest.mark.parametrize("name", ["../x", "a/b", "/abs/run", "..", "."])
def test_a_run_name_is_one_path_component(tmp_path, name):
    out = tmp_path / "out"
    one_line("a run name is one directory name", run_dir, str(out), name)
    one_line("a run name is one directory name", Run, "t", str(out), name, Cfg())
    assert list(tmp_path.iterdir()) == []  # nothing written, inside or outside --out-dir


def test_out_dir_that_is_a_file_or_unwritable(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    one_line("is a file, not a directory", run_dir, str(tmp_path / "file"), "r")
    one_line("is a file, not a directory", Run, "t", str(tmp_path / "file" / "sub"), "r", Cfg())
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # as if read-only (we may be root)
    one_line("is not writable", run_dir, str(tmp_path / "new"), "r")
    monkeypatch.undo()
    monkeypatch.setattr(Path, "mkdir", raising(PermissionError(errno.EACCES, "Permission denied")))
    one_line("cannot create", Run, "t", str(tmp_path / "new"), "r", Cfg())
    monkeypatch.undo()
    assert names(tmp_path) == ["file"]


def test_config_records_the_actual_run_name(tmp_path):
    run = Run("t", str(tmp_path), "", Cfg(out_dir=str(tmp_path)))
    config = json.loads((run.dir / "config.json").read_text())
    assert config["run"] == run.dir.name != "" and config["script"] == "t"
    run.close()


def test_files_are_written_with_the_usual_mode(tmp_path):
    run = Run("t", str(tmp_path), "r", Cfg())
    run.write_json("eval.json", {"a": 1})
    save_state(run.dir, 1, {"w": torch.ones(2)})
    run.close()
    for path in ("config.json", "eval.json", "state/state.safetensors"):
        assert (run.dir / path).stat().st_mode & 0o777 == FILE_MODE, path


@pytest.mark.parametrize("fault", ["replace", "enospc"])
def test_run_files_survive_a_fault_at_each_write_point(tmp_path, monkeypatch, fault):
    run = Run("t", str(tmp_path), "r", Cfg())
    for step in (1, 2, 3):
        run.log(step=step, loss=1.0 / step)
    run.write_json("eval.json", {"steps": {"1": 0.5}})
    before = tree(tmp_path)
    error = ENOSPC if fault == "enospc" else OSError(errno.EIO, "I/O error")
    monkeypatch.setattr(os, "replace" if fault == "replace" else "fsync", raising(error))
    one_line("eval.json: could not write it", run.write_json, "eval.json", {"steps": {"2": 0.7}})
    one_line("metrics.jsonl: could not write it", run.rewrite, [{"step": 1, "loss": 1.0}])
    if fault == "enospc":
        one_line("metrics.jsonl: could not append a line", run.log, step=4, loss=0.25)
    monkeypatch.undo()
    after = tree(tmp_path)
    if fault == "enospc":  # the failed append's line reached the file (only fsync failed) whole
        appended = b'{"step": 4, "loss": 0.25}\n'
        assert after.pop("r/metrics.jsonl") == before.pop("r/metrics.jsonl") + appended
    assert after == before
    run.close()


def test_rewrite_then_log_appends_to_the_new_file(tmp_path):
    run = Run("t", str(tmp_path), "r", Cfg())
    for step in (1, 2, 3):
        run.log(step=step)
    run.rewrite([{"step": 1}])
    run.log(step=2, again=True)
    run.close()
    rows = [json.loads(line) for line in (run.dir / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1}, {"step": 2, "again": True}]


def test_a_torn_last_metrics_line_is_cut_on_resume(tmp_path, capsys):
    run = Run("t", str(tmp_path), "r", Cfg(out_dir=str(tmp_path), run="r"))
    run.log(step=1, loss=0.5)
    save_state(run.dir, 1, {})
    run.log(step=2, loss=0.25)
    run.close()
    metrics = run.dir / "metrics.jsonl"
    with open(metrics, "ab") as f:
        f.write(b'{"step": 3, "lo')  # a kill in the middle of a line
    _, step, history = resume_run(Cfg, str(run.dir), "t")
    assert step == 1 and history == [{"step": 1, "loss": 0.5}]
    capsys.readouterr()
    resumed = Run("t", str(tmp_path), "r", Cfg(), resume=True)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cut a torn last line" in err[0]
    assert metrics.read_text() == '{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.25}\n'
    resumed.log(step=3, loss=0.1)
    resumed.close()
    assert metric_steps(run.dir) == [1, 2, 3]


def test_a_symlinked_run_file_is_never_written_through(tmp_path):
    outside = tmp_path / "outside.json"
    outside.write_text('{"precious": true}\n')
    run = Run("t", str(tmp_path), "r", Cfg())
    run.log(step=1)
    run.close()
    (run.dir / "eval.json").symlink_to(outside)
    resumed = Run("t", str(tmp_path), "r", Cfg(), resume=True)
    resumed.write_json("eval.json", {"steps": {}})  # the link is replaced by the run's own file
    resumed.close()
    assert outside.read_text() == '{"precious": true}\n'
    assert not (run.dir / "eval.json").is_symlink()
    (run.dir / "metrics.jsonl").unlink()
    (run.dir / "metrics.jsonl").symlink_to(outside)
    one_line("metrics.jsonl is a symbolic link", Run, "t", str(tmp_path), "r", Cfg(), resume=True)
    assert outside.read_text() == '{"precious": true}\n'
    assert not (run.dir / LOCK).exists()  # a refused Run leaves no claim behind


def test_a_symlinked_run_dir_is_refused(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "r").symlink_to(tmp_path / "elsewhere")
    one_line("is a symbolic link", Run, "t", str(tmp_path / "out"), "r", Cfg())
    assert list((tmp_path / "elsewhere").iterdir()) == []


# --- strict JSON and non-finite numbers ---

@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_metrics_and_eval_never_hold_nan_or_infinity(tmp_path, value):
    run = Run("t", str(tmp_path), "r", Cfg())
    run.log(step=1, loss=0.5)
    run.write_json("eval.json", {"before": {"reward": 1.0}})
    before = tree(tmp_path)
    one_line(f"step 2: loss is {value}", run.log, step=2, loss=value)
    one_line(f"after.reward is {value}", run.write_json, "eval.json", {"after": {"reward": value}})
    one_line(f"rows[1] is {value}", run.write_json, "eval.json", {"rows": [1.0, value]})
    one_line("step 3: kl is", run.rewrite, [{"step": 3, "kl": value}])
    assert tree(tmp_path) == before
    run.close()


def test_check_finite_names_the_step_the_value_and_the_flag():
    check_finite(3, loss=0.5, grad_norm=torch.tensor(2.0), reward=torch.zeros(4))  # no error
    one_line("step 7: loss is nan — lower --lr", check_finite, 7, loss=torch.tensor(math.nan))
    one_line("step 2: grad_norm is inf — lower --lr or --beta", check_finite, 2,
             "lower --lr or --beta", loss=1.0, grad_norm=math.inf)
    one_line("step 4: reward is -inf", check_finite, 4,
             reward=torch.tensor([0.0, -math.inf, math.nan]))


@pytest.mark.parametrize("argv, shown", [
    (["--lr", "nan"], "--lr nan"), (["--lr", "inf"], "--lr inf"),
    (["--beta=-inf"], "--beta -inf"), (["--beta", "NaN"], "--beta nan"),
])
def test_float_flags_refuse_nan_and_inf(argv, shown):
    one_line(f"{shown}: must be a finite number", parse_config, Cfg, "", argv)


# --- one process per run directory ---

HOLD = textwrap.dedent("""
    import sys, time
    from dataclasses import dataclass
    from nanorlhf.run import Run, flag
    @dataclass
    class Cfg:
        run: str = flag("", "run name")
    run = Run("t", sys.argv[1], "r", Cfg())
    run.log(step=1)
    print("claimed", flush=True)
    if sys.argv[2] == "raise":
        raise RuntimeError("a crash")
    time.sleep(600)
""")


def hold(out: Path, mode: str = "sleep") -> subprocess.Popen:
    """Another process that claims OUT/r, logs step 1, then sleeps (or raises)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out), mode], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "claimed", proc.stderr.read()
    return proc


def test_two_processes_never_share_a_run_dir(tmp_path, capsys):
    other = hold(tmp_path)
    try:
        pid = str(other.pid)
        assert (tmp_path / "r" / LOCK).read_text().strip() == pid
        before = tree(tmp_path)
        one_line(f"in use by a running process (pid {pid})", run_dir, str(tmp_path), "r")
        one_line(f"(pid {pid})", Run, "t", str(tmp_path), "r", Cfg())
        one_line(f"(pid {pid})", Run, "t", str(tmp_path), "r", Cfg(), resume=True)  # a live run
        (tmp_path / "r" / "state").mkdir()
        (tmp_path / "r" / "state" / "state.json").write_text('{"step": 1}')
        one_line(f"(pid {pid})", resume_run, Cfg, str(tmp_path / "r"), "t")
        shutil.rmtree(tmp_path / "r" / "state")
        assert tree(tmp_path) == before  # its metrics untouched
    finally:
        other.kill()  # SIGKILL: no atexit, so the lock stays behind, stale
        other.wait()
    assert (tmp_path / "r" / LOCK).read_text().strip() == pid
    capsys.readouterr()
    resumed = Run("t", str(tmp_path), "r", Cfg(), resume=True)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"taking over the lock of pid {pid}, which no longer runs" in err[0]
    assert (tmp_path / "r" / LOCK).read_text().strip() == str(os.getpid())
    resumed.log(step=2)
    resumed.close()
    assert not (tmp_path / "r" / LOCK).exists()
    assert metric_steps(tmp_path / "r") == [1, 2]


def test_the_lock_is_released_when_a_run_fails(tmp_path):
    other = hold(tmp_path, "raise")
    assert other.wait(timeout=60) == 1 and "a crash" in other.stderr.read()
    assert not (tmp_path / "r" / LOCK).exists()  # released at exit (atexit): no stale lock


def test_this_process_may_continue_a_run_it_holds(tmp_path):
    """What the in-process crash-then-resume tests do: the first Run raised, never closed."""
    crashed = Run("t", str(tmp_path), "r", Cfg())
    crashed.log(step=1)
    again = Run("t", str(tmp_path), "r", Cfg(), resume=True)  # same pid: not another process
    again.log(step=2)
    again.close()
    assert (tmp_path / "r" / LOCK).exists()  # the first Run still holds it...
    crashed.close()
    assert not (tmp_path / "r" / LOCK).exists()  # ...until it is closed too
    with Run("t", str(tmp_path), "s", Cfg()) as run:  # or used as a context manager
        assert (run.dir / LOCK).exists()
    assert not (run.dir / LOCK).exists()


def test_only_rank_zero_claims_and_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(distributed, "is_main", lambda: False)
    run = Run("t", str(tmp_path), "r", Cfg())
    run.log(step=1)
    run.write_json("eval.json", {})
    run.close()
    assert list(tmp_path.iterdir()) == []


# --- damaged resume directories: one line naming the file ---

def resumable(tmp_path) -> Path:
    run = Run("t", str(tmp_path), "r", Cfg(out_dir=str(tmp_path), run="r"))
    run.log(step=1)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))])
    save_state(run.dir, 1, {"w": torch.ones(2)}, optimizer)
    run.close()
    return run.dir


def put(name: str, content: str | bytes):
    """A damage: write `content` to RUN/name."""
    def damage(folder: Path) -> None:
        path = folder / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    return damage


@pytest.mark.parametrize("damage, fragment", [
    (put("config.json", '{"lr": 0.1'), "config.json: not valid JSON"),
    (put("config.json", '[1, 2]'), "config.json: expected a JSON object"),
    (put("config.json", '{"lr": "fast"}'), "config.json: lr is 'fast', expected a float"),
    (put("config.json", '{"steps": true}'), "config.json: steps is True, expected an int"),
    (put("config.json", '{"lr": NaN}'), "--lr nan: must be a finite number"),
    (put("config.json", '{"lr": -1}'), "--lr -1: must be > 0"),
    (put("state/state.json", '{"ste'), "state.json: not valid JSON"),
    (put("state/state.json", '{"step": "1"}'), "integer 'step'"),
    (put("metrics.jsonl", '{"step": 1}\nnot json\n{"step": 1}\n'), "metrics.jsonl:2: not a JSON"),
    (put("metrics.jsonl", '{"loss": 1}\n'), "metrics.jsonl:1: expected a JSON object"),
])
def test_a_damaged_resume_dir_is_one_line(tmp_path, damage, fragment):
    damage(resumable(tmp_path))
    one_line(fragment, resume_run, Cfg, str(tmp_path / "r"), "t")


@pytest.mark.parametrize("damage, fragment", [
    (lambda d: put("state.safetensors", (d / "state.safetensors").read_bytes()[:100])(d),
     "state.safetensors: not readable as safetensors"),
    (put("state.safetensors", b"\x00" * 64), "state.safetensors: not readable as safetensors"),
    (put("state.json", '{"step": 1, "param_groups": 5}'), "damaged or not from this script"),
])
def test_a_damaged_state_is_one_line(tmp_path, damage, fragment):
    damage(resumable(tmp_path) / "state")
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))])
    one_line(fragment, load_state, tmp_path / "r", optimizer)


# --- hostile checkpoints and tokenizers ---

@pytest.fixture
def ckpt(tiny_dirs, tmp_path) -> Path:
    path = shutil.copytree(tiny_dirs["llama-gqa-tied"], tmp_path / "ckpt")
    build_tiny_tokenizer(path)
    return path


def edit_config(**changes):
    """A damage: config.json with these keys changed (None: deleted)."""
    def damage(path: Path) -> None:
        config = json.loads((path / "config.json").read_text())
        for key, value in changes.items():
            config.pop(key) if value is None else config.update({key: value})
        (path / "config.json").write_text(json.dumps(config))
    return damage


@pytest.mark.parametrize("hostile, fragment", [
    (lambda p: put("model.safetensors", (p / "model.safetensors").read_bytes()[:5000])(p),
     "model.safetensors: not a readable safetensors file"),
    (put("model.safetensors", os.urandom(4096)), "model.safetensors: not a readable"),
    (put("model.safetensors", b""), "model.safetensors: not a readable"),
    (put("config.json", "[1, 2, 3]"), "config.json: expected a JSON object"),
    (edit_config(hidden_size=None), "config.json: missing key 'hidden_size'"),
    (edit_config(hidden_size="64"), "config.json: hidden_size is '64'; expected an integer"),
    (edit_config(num_hidden_layers=1e9), "num_hidden_layers is 1000000000.0; expected an int"),
    (edit_config(num_hidden_layers=10**9), "num_hidden_layers is 1000000000; expected an int"),
    (edit_config(num_hidden_layers=3), "num_hidden_layers is 3, but the checkpoint's tensors hold"),
    (edit_config(vocab_size=2**40), "vocab_size is 1099511627776"),
    (edit_config(head_dim=-4), "head_dim is -4"),
    (edit_config(num_key_value_heads=3), "not a multiple of num_key_value_heads 3"),
    (edit_config(rms_norm_eps="tiny"), "rms_norm_eps is 'tiny'"),
    (edit_config(tie_word_embeddings="yes"), "tie_word_embeddings is 'yes'"),
    (edit_config(rope_scaling=[1]), "rope_scaling is [1]"),
    (edit_config(rope_scaling={"rope_type": "llama3"}), "rope scaling"),
    (edit_config(vocab_size=64), "has shape [128, 64], config.json implies [64, 64]"),
])
def test_a_hostile_checkpoint_is_one_line(ckpt, hostile, fragment):
    hostile(ckpt)
    one_line(fragment, load_model, ckpt)


@pytest.mark.parametrize("hostile, fragment", [
    (put("tokenizer.json", '{"model": '), "tokenizer.json: not a readable tokenizer"),
    (put("tokenizer.json", '{"version": "1.0", "model": {"type": "BPE"}}'),
     "tokenizer.json: not a readable tokenizer"),
    (put("tokenizer.json", b"\xff\xfe\x00garbage"), "tokenizer.json: not a readable tokenizer"),
    (put("tokenizer_config.json", "[]"), "tokenizer_config.json: expected a JSON object"),
    (put("tokenizer_config.json", '{"eos_token": 5}'), "eos_token is 5"),
    (put("tokenizer_config.json", '{"chat_template": [{"name": "x"}]}'), "chat_template"),
    (put("chat_template.jinja", b"\xff\xfe"), "chat_template.jinja: not UTF-8"),
    (put("generation_config.json", '{"eos_token_id": "2"}'), "eos_token_id is '2'"),
])
def test_a_hostile_tokenizer_is_one_line(ckpt, hostile, fragment):
    hostile(ckpt)
    one_line(fragment, Tokenizer, ckpt)


def test_tokenizer_files_linked_from_outside_are_not_copied(ckpt, tmp_path, capsys):
    secret = tmp_path / "secret.txt"
    secret.write_text("SECRET")
    (ckpt / "special_tokens_map.json").symlink_to(secret)
    (ckpt / "chat_template.jinja").symlink_to(secret)
    capsys.readouterr()
    out = save_model(load_model(ckpt), tmp_path / "saved")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("is not a regular file inside" in line for line in err)
    assert names(out) == ["config.json", "generation_config.json", "model.safetensors",
                          "tokenizer.json", "tokenizer_config.json"]
    assert all(b"SECRET" not in p.read_bytes() for p in out.iterdir())


def test_a_hugging_face_cache_snapshot_copies_its_blob_links(ckpt, tmp_path, capsys):
    """In the HF cache a snapshot's files are links into the repository's blobs/: inside."""
    repo = tmp_path / "hub" / "models--acme--tiny"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    for i, f in enumerate(sorted(ckpt.iterdir())):
        shutil.copy(f, repo / "blobs" / f"blob{i}")
        (snapshot / f.name).symlink_to(Path("../../blobs") / f"blob{i}")
    capsys.readouterr()
    out = save_model(load_model(snapshot), tmp_path / "saved")
    assert capsys.readouterr().err == ""
    assert (out / "tokenizer.json").read_bytes() == (ckpt / "tokenizer.json").read_bytes()


def test_a_full_disk_during_a_model_save_keeps_the_old_model(ckpt, tmp_path, monkeypatch):
    model = load_model(ckpt)
    out = save_model(model, tmp_path / "saved")
    before = tree(out)
    full = "Error while serializing: I/O error: No space left on device (os error 28)"
    monkeypatch.setattr(checkpoint, "save_file", raising(SafetensorError(full)))
    one_line(f"saved: could not write it ({full})", save_model, model, out)
    assert tree(out) == before and names(tmp_path) == ["ckpt", "saved"]
    assert (out / "model.safetensors").stat().st_mode & 0o777 == FILE_MODE  # not 0600


# --- a command line built from the core API: exit status 2, one line, nothing written ---

CLI = textwrap.dedent("""
    import sys
    from dataclasses import dataclass
    from nanorlhf.errors import run_cli
    from nanorlhf.run import Run, flag, parse_config, run_dir
    @dataclass
    class Config:
        out_dir: str = flag("out", "where runs go")
        run: str = flag("", "run name")
        lr: float = flag(1e-3, "learning rate", gt=0)
    def main():
        cfg = parse_config(Config, "", sys.argv[1:])
        run_dir(cfg.out_dir, cfg.run)
        Run("cli", cfg.out_dir, cfg.run, cfg).log(step=1, lr=cfg.lr)
    run_cli(main)
""")


@pytest.mark.parametrize("argv, fragment", [
    (["--run", "../escaped"], "a run name is one directory name"),
    (["--run", "{tmp}/escaped"], "a run name is one directory name"),  # absolute
    (["--lr", "inf"], "--lr inf: must be a finite number"),
    (["--out-dir", "a-file"], "is a file, not a directory"),
])
def test_cli_hostile_flags_exit_2_with_one_line(tmp_path, argv, fragment):
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "out").mkdir()
    before = tree(tmp_path)
    argv = ["--out-dir", "out"] + [a.format(tmp=tmp_path) for a in argv]
    done = subprocess.run([sys.executable, "-c", CLI, *argv], cwd=tmp_path, env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert fragment in done.stderr
    assert tree(tmp_path) == before  # nothing written, inside --out-dir or out of it


# --- the whole core resume API in one tiny "script", crashed and resumed in this process ---

@dataclass
class MiniConfig:
    out_dir: str = flag("out", "where runs go")
    run: str = flag("", "run name")
    resume: str = flag("", "run dir to resume")
    steps: int = flag(6, "steps", min=1)
    save_every: int = flag(2, "save every N steps", min=1)
    lr: float = flag(0.1, "learning rate", gt=0)


def mini_main(argv: list[str]) -> Path:
    """A script's skeleton: fit w to random targets (so the RNG must resume too), log, save."""
    cfg = parse_config(MiniConfig, "", argv)
    if cfg.resume:
        cfg, start, history = resume_run(MiniConfig, cfg.resume, "mini")
    else:
        run_dir(cfg.out_dir, cfg.run)
        start, history = 0, []
    seed_everything(0)
    w = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.AdamW([w], lr=cfg.lr)
    run = Run("mini", cfg.out_dir, cfg.run, cfg, resume=bool(cfg.resume))
    if cfg.resume:
        _, tensors, _ = load_state(run.dir, optimizer)
        with torch.no_grad():
            w.copy_(tensors["w"])
        run.rewrite(history)
    for step in range(start + 1, cfg.steps + 1):
        loss = ((w - torch.randn(3)) ** 2).sum()
        check_finite(step, "lower --lr", loss=loss)  # before the step: the last state stays good
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        run.log(step=step, loss=loss.item())
        if step % cfg.save_every == 0:
            save_state(run.dir, step, {"w": w}, optimizer)
    run.write_json("eval.json", {"w": w.tolist()})
    return run.dir


def test_crash_then_resume_in_one_process_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    full = mini_main(["--out-dir", str(tmp_path), "--run", "full"])
    crash_at_step(monkeypatch, 5, lambda: mini_main(["--out-dir", str(tmp_path), "--run", "part"]))
    assert not (tmp_path / "part" / "eval.json").exists()
    part = mini_main(["--resume", str(tmp_path / "part")])  # this process still holds its lock
    for name in ("metrics.jsonl", "eval.json"):
        assert (full / name).read_bytes() == (part / name).read_bytes(), name
    assert json.loads((part / "config.json").read_text())["run"] == "part"


def test_a_diverging_run_stops_at_the_first_non_finite_loss(tmp_path):
    argv = ["--out-dir", str(tmp_path), "--run", "r", "--lr", "1e30"]
    one_line("loss is inf — lower --lr", mini_main, argv)
    lines = (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
    assert lines and all(math.isfinite(json.loads(line)["loss"]) for line in lines)
