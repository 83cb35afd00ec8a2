"""A run's flags, directory and state: a Config dataclass whose fields are the --flags, OUT_DIR/RUN
with config.json and metrics.jsonl, and RUN/state/, the one layout every script resumes from.
No framework: a few small functions and a class.

    cfg = parse_config(Config, __doc__)             # every flag checked, one line per error
    run = Run("train_dpo", cfg.out_dir, cfg.run, cfg)
    check_finite(step, "lower --lr", loss=loss)     # a NaN or inf stops the run in one line
    exit_interrupted(run, step, "model", save)      # Ctrl-C: save, one line, exit 130
    run.log(step=1, loss=0.69)                      # metrics.jsonl, a line per call
    save_state(run.dir, step, tensors, optimizer)   # RUN/state/, swapped in whole
    cfg, step, history = resume_run(Config, "out/train_dpo/RUN")   # --resume RUN_DIR

Crash safety: every file of a run is written atomically (atomic.py), except metrics.jsonl, which
is appended line by line (flushed and fsynced; a resume cuts a torn last line). No file holds NaN
or Infinity (strict JSON). RUN/.lock holds the pid of the one process writing RUN.
"""

import argparse
import atexit
import contextlib
import dataclasses
import errno
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from nanorlhf import distributed
from nanorlhf.atomic import (atomic_dir, atomic_write_bytes, atomic_write_text, fault_point,
                             pid_alive, remove_stale_temps)
from nanorlhf.errors import UserError, close_bars


def flag(default, help: str, *, choices=None, min=None, gt=None, max=None, lt=None):
    """A Config field that is also a --flag: its default, its help text and the values it allows
    (`choices`, or bounds: min/max inclusive, gt/lt exclusive). parse_config checks them all before
    a script does any work, so a bad value ends in one line naming the flag."""
    rules = dict(choices=choices, min=min, gt=gt, max=max, lt=lt)
    rules = {k: v for k, v in rules.items() if v is not None}
    return dataclasses.field(default=default, metadata={"help": help, **rules})


def positional(help: str):
    """A Config field given by position, not as a --flag (a tool's paths): required, so it comes
    first in the dataclass. Annotated list[str] it takes one or more values, as a list[str] flag
    does."""
    return dataclasses.field(metadata={"help": help, "positional": True})


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_flags(cfg) -> None:
    """Every field's allowed values (from flag()), then the Config's own cross-flag rules
    (`cfg.check()`, if it has one): the first violation is a UserError naming the flag and what it
    allows. A float flag is never NaN or infinite."""
    for f in dataclasses.fields(cfg):
        value, rule = getattr(cfg, f.name), f.metadata
        name = flag_name(f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{name} {value}: must be a finite number")
        if "choices" in rule and value not in rule["choices"]:
            choices = ", ".join(map(str, rule["choices"]))
            raise UserError(f"{name} {value!r}: choose one of {choices}")
        for key, ok, words in (("min", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
                               ("max", lambda v, b: v <= b, "<="), ("lt", lambda v, b: v < b, "<")):
            if key in rule and not ok(value, rule[key]):
                raise UserError(f"{name} {value}: must be {words} {rule[key]}")
    if hasattr(cfg, "check"):
        cfg.check()


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own errors (unknown flag, not a number): one line
        raise UserError(message)


def parse_config(cls, description: str, argv: list[str] | None = None, prog: str | None = None,
                 defaults: dict | None = None):
    """Every field of the dataclass `cls` becomes a --flag (underscores -> dashes) with its help
    text and its default, or a positional argument (positional()); booleans take true|false, so a
    default of true can be turned off; a field typed list[str] or tuple[str, ...] takes one or more
    values (--model a b, or --model a --model b). `defaults` (field name -> value) replace the
    fields' own: e.g. a finished run's config, which the flags given override. Every value is
    checked (check_flags) before the script does any work. `prog`: the command --help shows."""
    parser = _Parser(prog=prog, description=description,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    fields = {f.name: (f, _flag_type(f.type), (defaults or {}).get(f.name, f.default))
              for f in dataclasses.fields(cls)}
    for f, kind, default in fields.values():
        many = _many(f)
        if f.metadata.get("positional"):
            parser.add_argument(f.name, type=kind, nargs="+" if many else None,
                                metavar=f.name.upper(),
                                help=f.metadata["help"].replace("%", "%%"))
            continue
        shown = (" ".join(default) if many else str(default).lower() if kind is _parse_bool
                 else default)
        # argparse %-formats help text: a literal % ("99% of texts") must be doubled
        text = f"{f.metadata.get('help', '')} (default: {shown})".replace("%", "%%")
        if many:  # extended onto None, never onto the default (see below)
            parser.add_argument(flag_name(f.name), action="extend", nargs="+", help=text)
        else:
            parser.add_argument(flag_name(f.name), type=kind, default=default, help=text,
                                metavar="true|false" if kind is _parse_bool else None)
    values = vars(parser.parse_args(argv))
    for name, (f, _, default) in fields.items():
        if _many(f):  # the values given, in order (none given: the default), as the field's type
            given = default if values[name] is None else values[name]
            values[name] = tuple(given) if str(f.type).startswith("tuple") else list(given)
    cfg = cls(**values)
    check_flags(cfg)
    return cfg


def _parse_bool(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() in ("true", "1", "yes")


def _many(f: dataclasses.Field) -> bool:
    """A list[str] or tuple[str, ...] field: one or more values."""
    return str(f.type).startswith(("list", "tuple"))


def _flag_type(annotation):
    name = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "str")
    return {"bool": _parse_bool, "int": int, "float": float}.get(name, str)


# --- how many CPU threads torch uses: chosen once per process, before any work ---

THREADS_HELP = ("torch CPU threads (0: OMP_NUM_THREADS if set, else the cores this process may use "
                "that are not already busy)")

_auto_threads: int | None = None  # set_threads()'s first automatic choice in this process


def set_threads(threads: int = 0) -> int:
    """Set torch's CPU threads: `threads` if > 0, else OMP_NUM_THREADS if set (torch already read
    it), else the cores this process may run on (sched_getaffinity: a container's or taskset's
    share, not the host's count) minus those already busy (the 1-minute load average, rounded),
    at least 1.

    Why not torch's default (every physical core): its OpenMP threads spin-wait for each other at
    every op, so one thread that shares its core with another job stalls all of them. On a shared
    2-core machine that made QDAIF ~7x slower than one thread; on an idle machine all cores are
    used.
    Returns the thread count."""
    if threads <= 0 and os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    if threads <= 0:
        has_affinity = hasattr(os, "sched_getaffinity")
        cores = len(os.sched_getaffinity(0)) if has_affinity else os.cpu_count() or 1
        busy = round(os.getloadavg()[0]) if hasattr(os, "getloadavg") else 0
        threads = max(1, cores - busy)
    torch.set_num_threads(threads)
    return threads


def choose_threads(threads: int = 0) -> int:
    """A script's --threads: set_threads(threads), except that an automatic choice is made once per
    process (runs in one process, tests and resumes, keep the same reduction order).
    -> the count."""
    global _auto_threads
    if threads > 0:
        return set_threads(threads)
    if _auto_threads is None:
        _auto_threads = set_threads()
    torch.set_num_threads(_auto_threads)
    return _auto_threads


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


# --- numbers: what a run logs, saves or steps on is finite ---

def check_finite(step: int | str, hint: str = "lower --lr", **values) -> None:
    """Stop with one line if a value (a number or a tensor) is NaN or infinite, before it is
    logged, saved or stepped on: `check_finite(step, "lower --lr or --beta", loss=l, grad_norm=g)`
    -> UserError("step 12: loss is nan — lower --lr or --beta"). The last good state stays.
    A `step` that is not a number names the place itself: "iteration 2", "step 3 of Improve 1"."""
    where = f"step {step}" if isinstance(step, int) else step
    for name, value in values.items():
        x = value.detach().float() if torch.is_tensor(value) else torch.tensor(float(value))
        bad = x[~torch.isfinite(x)]
        if bad.numel():
            raise UserError(f"{where}: {name} is {bad.flatten()[0].item()} — {hint}")


def _non_finite(obj, key: str = "") -> tuple[str, float] | None:
    """The first NaN/inf inside a JSON-like object, as (its key path, the value), else None."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return key, obj
    if isinstance(obj, dict):
        items = obj.items()
    else:
        items = enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for k, v in items:
        path = f"{key}[{k}]" if isinstance(k, int) else f"{key}.{k}" if key else k
        if found := _non_finite(v, path):
            return found
    return None


def strict_json(obj, where: str, **dumps_kw) -> str:
    """json.dumps that never writes NaN or Infinity (they are not JSON): a non-finite value is one
    UserError naming `where` and the key."""
    if found := _non_finite(obj):
        key, value = found
        raise UserError(f"{where}: {key} is {value}, not a finite number; nothing was written")
    return json.dumps(obj, allow_nan=False, **dumps_kw)


def read_json(path: str | Path):
    """A JSON file of a run (config.json, eval.json, state.json...); a damaged one is one line."""
    try:
        return json.loads(Path(path).read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e}); the file is damaged") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror or e})") from None


def read_results(run: str | Path) -> dict:
    """RUN/eval.json, the evaluations a resumed run already made ({} if none); a damaged one is
    one line."""
    path = Path(run) / "eval.json"
    if not path.is_file():
        return {}
    results = read_json(path)
    if not isinstance(results, dict):
        raise UserError(f"{path}: expected a JSON object of evaluations; the file is damaged")
    return results


# --- the run directory OUT_DIR/RUN: one path component, claimed by one process ---

LOCK = ".lock"  # RUN/.lock holds the pid of the process writing RUN
_held: dict[str, int] = {}  # the run dirs this process has claimed -> how many open Runs use each


def check_name(name: str) -> str:
    """--run names one directory inside --out-dir: no '/', not '.' or '..' (so never absolute)."""
    if name in (".", "..") or "/" in name or os.sep in name or "\0" in name:
        raise UserError(f"--run {name!r}: a run name is one directory name inside --out-dir "
                        "(no '/', not '.' or '..')")
    return name


def check_out_dir(out_dir: str | Path) -> None:
    """--out-dir is a directory we can write in, or can be made inside one."""
    existing = Path(out_dir)
    while not existing.exists() and existing != existing.parent:  # its nearest existing part
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"--out-dir {out_dir}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--out-dir {out_dir}: {existing} is not writable")


def _lock_pid(lock: Path) -> int:
    """The pid written in a lock file; 0 if there is none (or no readable one)."""
    try:
        text = lock.read_text()
    except (OSError, UnicodeDecodeError):
        return 0
    return int(text) if text.strip().isdigit() else 0


def lock_holder(run: str | Path) -> int | None:
    """The pid of another running process that holds RUN/.lock, else None."""
    pid = _lock_pid(Path(run) / LOCK)
    return pid if pid != os.getpid() and pid_alive(pid) else None


def _in_use(run: Path, pid: int) -> UserError:
    return UserError(f"{run} is in use by a running process (pid {pid}): wait for it to finish "
                     "or stop it; two processes writing one run would mix or lose its files")


def claim(run: str | Path) -> None:
    """Make RUN/.lock ours, or stop with one line naming the live process that holds it. A lock
    whose pid no longer runs (a killed run) is taken over with one line. This process may claim a
    run it holds already (a script run twice in one process, as tests do after a simulated crash):
    a lock guards against other processes; one process runs its scripts one after the other."""
    run = Path(run)
    lock, stale = run / LOCK, run / f"{LOCK}.stale.tmp-{os.getpid()}"
    remove_stale_temps(lock)
    remove_stale_temps(run / f"{LOCK}.stale")
    while True:
        pid = _lock_pid(lock)
        if pid == os.getpid():
            break
        if pid_alive(pid):
            raise _in_use(run, pid)
        if lock.exists() or lock.is_symlink():
            # a dead pid's lock: move it aside (atomic: of two processes taking it over, one gets
            # it), then make sure what we moved was that dead lock, not one just made by another
            try:
                os.replace(lock, stale)
            except FileNotFoundError:
                continue
            if _lock_pid(stale) != pid:  # a live lock: put it back (link fails if one is there)
                with contextlib.suppress(FileExistsError):
                    os.link(stale, lock)
                stale.unlink()
                continue
            stale.unlink()
            print(f"{run}: taking over the lock of pid {pid or '?'}, which no longer runs",
                  file=sys.stderr)
        # the pid goes into a temporary file first; link() then names it RUN/.lock only if no such
        # file exists (atomic, as O_CREAT | O_EXCL), so a lock is never seen without its pid
        tmp = run / f"{LOCK}.tmp-{os.getpid()}"
        tmp.unlink(missing_ok=True)
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644),
                       "w") as f:
            f.write(f"{os.getpid()}\n")
        try:
            os.link(tmp, lock)
        except FileExistsError:
            continue  # another process claimed it between our look and our link: look again
        finally:
            tmp.unlink()
        break
    key = os.path.abspath(run)
    _held[key] = _held.get(key, 0) + 1


def release(run: str | Path) -> None:
    """Undo one claim(); the lock file goes with this process's last claim on RUN."""
    key = os.path.abspath(run)
    if _held.get(key, 0) > 1:
        _held[key] -= 1
        return
    _held.pop(key, None)
    if _lock_pid(Path(key) / LOCK) == os.getpid():  # never another process's (a forked child's)
        (Path(key) / LOCK).unlink(missing_ok=True)


@atexit.register
def _release_all() -> None:  # a script that ends (done, failed, Ctrl-C) frees its run dirs
    for key in list(_held):
        _held[key] = 1
        release(key)


def run_dir(out_dir: str, name: str, resumable: bool = True) -> Path:
    """OUT_DIR/NAME for a fresh run (NAME default: a timestamp, made unique). An existing non-empty
    one is refused: appending to another run's metrics.jsonl would mix two runs; --resume continues
    one (offered only where the script can resume: `resumable`); so is a run another process
    holds."""
    check_out_dir(out_dir)
    if not name:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path, n = Path(out_dir) / stamp, 1
        while path.exists() or path.is_symlink():
            path, n = Path(out_dir) / f"{stamp}-{n}", n + 1
        return path
    path = Path(out_dir) / check_name(name)
    if path.is_symlink():
        raise UserError(f"{path} is a symbolic link: a run directory must be a real directory")
    if path.exists() and not path.is_dir():
        raise UserError(f"{path} exists and is not a directory")
    if (pid := lock_holder(path)) is not None:
        raise _in_use(path, pid)
    if path.is_dir() and any(not p.name.startswith(LOCK) for p in path.iterdir()):
        # --resume only where a save point exists: a finished run, or one killed before its
        # first save, has nothing to continue
        offer = f", or continue it with --resume {path}" if resumable and state_dir(path) else ""
        raise UserError(f"{path} already holds a run: choose another --run{offer}")
    return path


def _cut_torn_tail(path: Path) -> None:
    """A run killed while appending leaves a last line without its newline: cut it, atomically."""
    data = path.read_bytes() if path.is_file() else b""
    if data and not data.endswith(b"\n"):
        atomic_write_bytes(path, data[:data.rfind(b"\n") + 1])
        print(f"{path}: cut a torn last line (the run was stopped while writing it)",
              file=sys.stderr)


def _open_metrics(path: Path, append: bool):
    """metrics.jsonl for appending; never through a symbolic link (O_NOFOLLOW)."""
    if path.is_symlink():
        raise UserError(f"{path} is a symbolic link: refusing to write through it (a run's files "
                        "are regular files inside its directory)")
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_APPEND if append else os.O_TRUNC)
    try:
        return os.fdopen(os.open(path, flags, 0o666), "a", encoding="utf-8")
    except OSError as e:
        raise UserError(f"{path}: cannot open it for writing ({e.strerror or e})") from None


class Run:
    """out/<script>/<run>/: config.json at the start, metrics.jsonl appended line by line (flushed
    and fsynced: a crash loses nothing logged), other files (eval.json) written atomically. A fresh
    run needs a new or empty directory (run_dir); `resume=True` continues an existing one, keeping
    its metrics. RUN is claimed (RUN/.lock) until close(), the end of a `with Run(...) as run:`
    block, or the process's exit. Under torchrun only rank 0 claims and writes; elsewhere these
    are no-ops."""

    def __init__(self, script: str, out_dir: str, name: str, config, resume: bool = False,
                 resumable: bool = True) -> None:
        self.writes = distributed.is_main()
        self.metrics, self.claimed = None, False
        # rank 0 picks (or refuses) a fresh directory; a resumed run and the other ranks use NAME
        fresh = self.writes and not resume
        self.dir = run_dir(out_dir, name, resumable) if fresh else Path(out_dir) / check_name(name)
        if not self.writes:
            return
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            reason = e.strerror or e
            raise UserError(f"--out-dir {out_dir}: cannot create {self.dir} ({reason})") from None
        claim(self.dir)
        self.claimed = True
        try:
            if fresh:  # again, now that RUN is ours: another run may have started there meanwhile
                run_dir(out_dir, self.dir.name, resumable)
            metrics = self.dir / "metrics.jsonl"
            if not metrics.is_symlink():
                _cut_torn_tail(metrics)
            saved = {"script": script, **dataclasses.asdict(config)}
            if "run" in saved:
                saved["run"] = self.dir.name  # the actual name: a timestamp if --run was not given
            config_json = strict_json(saved, str(self.dir / "config.json"), indent=2)
            self.metrics = _open_metrics(metrics, append=resume)
            atomic_write_text(self.dir / "config.json", config_json + "\n")
        except BaseException:
            self.close()
            raise

    def log(self, **values) -> None:
        """Append one line to metrics.jsonl (strict JSON: a NaN is one UserError naming the key)."""
        if self.writes:
            line = strict_json(values, f"step {values.get('step', '?')}") + "\n"
            try:
                half = len(line) // 2  # the test hook (atomic.fault_point) strikes in between
                self.metrics.write(line[:half])
                fault_point(self.dir / "metrics.jsonl", self.metrics)
                self.metrics.write(line[half:])
                self.metrics.flush()
                os.fsync(self.metrics.fileno())
            except OSError as e:
                raise UserError(f"{self.dir / 'metrics.jsonl'}: could not append a line "
                                f"({e.strerror or e}); --resume cuts a torn last line") from None

    def rewrite(self, rows: list[dict]) -> None:
        """metrics.jsonl := rows, atomically (a resumed run keeps what its saved state had seen)."""
        if self.writes:
            text = "".join(strict_json(m, f"step {m.get('step', '?')}") + "\n" for m in rows)
            atomic_write_text(self.dir / "metrics.jsonl", text)
            # the rename made a new file: append to it from now on, not to the replaced one
            self.metrics.close()
            self.metrics = _open_metrics(self.dir / "metrics.jsonl", append=True)

    def write_json(self, name: str, obj) -> Path:
        """RUN/name := obj as strict JSON, atomically (a symbolic link there is replaced; what it
        pointed to is untouched)."""
        path = self.dir / name
        if self.writes:
            text = strict_json(obj, str(path), indent=1, ensure_ascii=False) + "\n"
            atomic_write_text(path, text)
        return path

    def close(self) -> None:
        """Close metrics.jsonl and release RUN (also done when the process exits)."""
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        if self.claimed:
            release(self.dir)
            self.claimed = False

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- resuming: RUN/state/ holds what a run needs to continue exactly (never pickle) ---

STATE = "state"


def state_dir(run: str | Path) -> Path | None:
    """RUN/state, or RUN/state.old after a crash mid-swap, if it is complete (state.json is
    written last)."""
    for name in (STATE, STATE + ".old"):
        if (Path(run) / name / "state.json").is_file():
            return Path(run) / name
    return None


def save_state(run: str | Path, step: int, tensors: dict[str, torch.Tensor],
               optimizer: torch.optim.Optimizer | None = None, **meta) -> None:
    """RUN/state/: state.safetensors (the given tensors, the optimizer's moments, the RNG) and
    state.json (step, the optimizer's param groups, Python's RNG, `meta`), swapped in whole
    (atomic_dir); state.json is written last, so its presence means the state is complete."""
    state = optimizer.state_dict() if optimizer is not None else {"state": {}, "param_groups": None}
    moments = {f"optim.{i}.{k}": v for i, s in state["state"].items() for k, v in s.items()}
    tensors = {**tensors, **moments, "rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    info = {"step": step, "param_groups": state["param_groups"],
            "python_random": list(random.getstate()), **meta}
    info_json = strict_json(info, str(Path(run) / STATE / "state.json"))
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_dir(Path(run) / STATE) as tmp:
        try:
            save_file(tensors, tmp / "state.safetensors")
        except SafetensorError as e:  # a full disk: atomic_dir makes it one line, old state kept
            raise OSError(errno.EIO, str(e)) from None
        (tmp / "state.json").write_text(info_json + "\n")


def _damaged(path: Path, what: str) -> UserError:
    return UserError(f"{path}: {what}; this resume state is damaged or not from this script")


def _state_info(state: Path) -> dict:
    info = read_json(state / "state.json")
    if not isinstance(info, dict) or not isinstance(info.get("step"), int):
        raise _damaged(state / "state.json", "expected an object with an integer 'step'")
    return info


def load_state(run: str | Path, optimizer: torch.optim.Optimizer | None = None
               ) -> tuple[int, dict[str, torch.Tensor], dict]:
    """Restore the optimizer and the RNGs from RUN/state -> (step, every stored tensor,
    state.json). A damaged state is one line naming the file."""
    path = state_dir(run)
    if path is None:
        raise UserError(f"--resume {run}: no resumable state ({STATE}/state.json) "
                        "in that directory")
    info = _state_info(path)
    try:
        tensors = load_file(path / "state.safetensors")
    except (SafetensorError, OSError) as e:
        raise _damaged(path / "state.safetensors", f"not readable as safetensors ({e})") from None
    try:
        if optimizer is not None:
            state: dict[int, dict] = {}
            for key, value in tensors.items():
                if key.startswith("optim."):
                    i, name = key[len("optim."):].split(".", 1)
                    state.setdefault(int(i), {})[name] = value
            optimizer.load_state_dict({"state": state, "param_groups": info["param_groups"]})
        torch.set_rng_state(tensors["rng.torch"])
        if "rng.cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors["rng.cuda"])
        version, ints, gauss = info["python_random"]
        random.setstate((version, tuple(ints), gauss))
    except (KeyError, ValueError, TypeError, RuntimeError) as e:  # a missing key, a wrong shape
        raise _damaged(path, f"{type(e).__name__}: {e}".splitlines()[0]) from None
    return info["step"], tensors, info


def read_metrics(path: Path, step_key: str = "step") -> list[dict]:
    """metrics.jsonl's rows. A last line without its newline (torn by a kill) is left out (Run
    cuts it on resume); any other line that is not a JSON object with an integer `step_key` is
    one error."""
    rows, lines = [], path.read_bytes().split(b"\n")[:-1]  # [:-1]: what follows the last newline
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"{path}:{number}: not a JSON line") from None
        if not isinstance(row, dict) or not isinstance(row.get(step_key), int):
            raise UserError(f"{path}:{number}: expected a JSON object with an integer '{step_key}'")
        rows.append(row)
    return rows


def check_types(cls, saved: dict, where: str) -> None:
    """A saved config's values have their flags' types (a tampered config.json: one line)."""
    kinds = {"bool": (bool,), "int": (int,), "float": (int, float), "str": (str,)}
    for f in dataclasses.fields(cls):
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
        if f.name in saved and kind in kinds:
            value = saved[f.name]
            if not isinstance(value, kinds[kind]) or (isinstance(value, bool) and kind != "bool"):
                article = "an" if kind == "int" else "a"
                raise UserError(f"{where}: {f.name} is {value!r}, expected {article} {kind}")


def resume_run(cls, run: str, script: str, step_key: str = "step"):
    """--resume RUN_DIR -> (the interrupted run's own Config from RUN/config.json, the step its
    state holds, its metrics.jsonl lines up to that step: those whose `step_key` is at most it).
    Flags given beside --resume are ignored. A run still going (RUN/.lock held by a live process)
    is refused; so are a damaged one and one whose files are symbolic links."""
    path = Path(run)
    if not (path / "config.json").is_file():
        raise UserError(f"--resume {run}: no config.json there (not a {script} run directory)")
    links = [p for p in (path, *sorted(path.iterdir())) if p.is_symlink()]
    if links:  # read or continued through a link, a run would take in or overwrite another's files
        raise UserError(f"--resume {run}: {links[0]} is a symbolic link; a run's files are "
                        "regular files inside its directory")
    if (pid := lock_holder(path)) is not None:
        raise _in_use(path, pid)
    if (state := state_dir(path)) is None:
        raise UserError(f"--resume {run}: no resumable state ({STATE}/state.json) "
                        "in that directory")
    step = _state_info(state)["step"]
    saved = read_json(path / "config.json")
    if not isinstance(saved, dict):
        raise UserError(f"{path / 'config.json'}: expected a JSON object of flags")
    check_types(cls, saved, str(path / "config.json"))
    names = {f.name for f in dataclasses.fields(cls)}
    cfg = cls(**{k: v for k, v in saved.items() if k in names})
    cfg = dataclasses.replace(cfg, out_dir=str(path.parent), run=path.name, resume=str(path))
    check_flags(cfg)
    metrics = path / "metrics.jsonl"
    history = [m for m in read_metrics(metrics, step_key) if m[step_key] <= step] \
        if metrics.is_file() else []
    return cfg, step, history


# --- Ctrl-C: what the finished steps learned is saved, in one line ---

def exit_interrupted(run: Run, finished: int, what: str, save: Callable[[], Path],
                     unit: str = "step") -> NoReturn:
    """A script's `except KeyboardInterrupt:` around its training: one line on stderr, exit
    status 130. After `finished` steps (a resumed run counts those before its resume) save()
    writes what the run's normal end writes, the weights as they stand, and returns where: the line
    says "interrupted after step 3: model in RUN/model". Under torchrun every rank calls save() and
    rank 0 writes. Before the first step nothing is saved: the model is the untouched base, never
    to be labelled as trained. RUN/state/, the last save point, is kept for --resume."""
    path = save() if finished else None
    if run.writes:
        line = (f"interrupted after {unit} {finished}: {what} in {path}" if finished
                else f"interrupted before the first {unit}: nothing saved")
        if (state := state_dir(run.dir)) is not None:
            line += f"; --resume {run.dir} continues after {unit} {_state_info(state)['step']}"
        close_bars()  # first: the line stays the last on the terminal
        print(line, file=sys.stderr)
    sys.exit(130)
