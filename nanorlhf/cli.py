"""What every script does around its algorithm: flags from a config dataclass, a run directory,
metrics.jsonl, seeds and the device. No framework: a few small functions and a class."""

import argparse
import dataclasses
import json
import os
import random
import time
from pathlib import Path

import torch

from nanorlhf import distributed
from nanorlhf.errors import UserError


def flag(default, help: str, *, choices=None, min=None, gt=None, max=None, lt=None):
    """A Config field that is also a --flag: its default, its help text and the values it allows
    (`choices`, or bounds: min/max inclusive, gt/lt exclusive). parse_config checks them all before
    a script does any work, so a bad value ends in one line naming the flag."""
    rules = {k: v for k, v in dict(choices=choices, min=min, gt=gt, max=max, lt=lt).items() if v is not None}
    return dataclasses.field(default=default, metadata={"help": help, **rules})


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_flags(cfg) -> None:
    """Every field's allowed values (from flag()), then the Config's own cross-flag rules (`cfg.check()`,
    if it has one): the first violation is a UserError naming the flag and what it allows."""
    for f in dataclasses.fields(cfg):
        value, rule = getattr(cfg, f.name), f.metadata
        name = flag_name(f.name)
        if "choices" in rule and value not in rule["choices"]:
            raise UserError(f"{name} {value!r}: choose one of {', '.join(map(str, rule['choices']))}")
        for key, ok, words in (("min", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
                               ("max", lambda v, b: v <= b, "<="), ("lt", lambda v, b: v < b, "<")):
            if key in rule and not ok(value, rule[key]):
                raise UserError(f"{name} {value}: must be {words} {rule[key]}")
    if hasattr(cfg, "check"):
        cfg.check()


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own errors (unknown flag, not a number) as one line too
        raise UserError(message)


def parse_config(cls, description: str, argv: list[str] | None = None):
    """Every field of the dataclass `cls` becomes a --flag (underscores -> dashes) with its help text;
    booleans take true/false so a default of True can be turned off. The values are checked
    (check_flags), and a fresh run refuses an existing run directory, before anything else happens."""
    parser = _Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    own = set(vars(cls).get("__annotations__", {}))  # the script's own flags first, inherited ones (scale.py) after
    for f in sorted(dataclasses.fields(cls), key=lambda f: f.name not in own):
        parser.add_argument(flag_name(f.name), type=_flag_type(f.type), default=f.default,
                            # argparse %-formats help text: a literal % ("99% of texts") must be doubled
                            help=f"{f.metadata.get('help', '')} (default: {f.default})".replace("%", "%%"))
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: OMP_NUM_THREADS if "
                        "set, else the cores this process may use that are not already busy; see set_threads)")
    values = vars(parser.parse_args(argv))
    threads = values.pop("threads")
    if threads < 0:
        raise UserError(f"--threads {threads}: expected a positive count (0: chosen automatically)")
    cfg = cls(**values)
    check_flags(cfg)
    global _auto_threads
    if threads > 0:
        set_threads(threads)
    elif _auto_threads is None:
        _auto_threads = set_threads()
    else:  # one automatic choice per process: runs in one process (tests, resume) keep the same reduction order
        torch.set_num_threads(_auto_threads)
    if hasattr(cfg, "out_dir") and hasattr(cfg, "run") and not getattr(cfg, "resume", ""):
        run_dir(cfg.out_dir, cfg.run)  # refuse a used --run now, not after the model has loaded
    return cfg


def _parse_bool(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() in ("true", "1", "yes")


def _flag_type(annotation):
    name = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "str")
    return {"bool": _parse_bool, "int": int, "float": float}.get(name, str)


_auto_threads: int | None = None  # set_threads()'s first automatic choice in this process


def set_threads(threads: int = 0) -> int:
    """Set torch's CPU threads: `threads` if > 0, else OMP_NUM_THREADS if set (torch already read it),
    else the cores this process may run on (sched_getaffinity: a container's or taskset's share, not the
    host's count) minus those already busy (the 1-minute load average, rounded), at least 1.

    Why not torch's default (every physical core): its OpenMP threads spin-wait for each other at every
    op, so one thread that shares its core with another job stalls all of them. On a shared 2-core
    machine that made QDAIF ~7x slower than one thread; on an idle machine all cores are used.
    Returns the thread count."""
    if threads <= 0 and os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    if threads <= 0:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        busy = round(os.getloadavg()[0]) if hasattr(os, "getloadavg") else 0
        threads = max(1, cores - busy)
    torch.set_num_threads(threads)
    return threads


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def device() -> torch.device:
    """CUDA (with bf16 autocast at the call sites) when present, else the CPU in fp32. Under torchrun
    "cuda" is this rank's GPU (distributed.init() made it the current device)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(dev: torch.device):
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")


def run_dir(out_dir: str, name: str) -> Path:
    """OUT_DIR/NAME for a fresh run (NAME default: a timestamp, made unique). An existing non-empty one
    is refused: appending to another run's metrics.jsonl would mix two runs; --resume continues one."""
    if not name:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path, n = Path(out_dir) / stamp, 1
        while path.exists():
            path, n = Path(out_dir) / f"{stamp}-{n}", n + 1
        return path
    path = Path(out_dir) / name
    if path.is_dir() and any(path.iterdir()):
        raise UserError(f"{path} already holds a run: choose another --run, or continue it with --resume {path}")
    if path.exists() and not path.is_dir():
        raise UserError(f"{path} exists and is not a directory")
    return path


class Run:
    """out/<script>/<run>/: config.json at the start, metrics.jsonl written (and flushed) line by line,
    so a crash loses nothing that was logged. A fresh run needs a new or empty directory (run_dir);
    `resume=True` continues an existing one, whose metrics it keeps. Under torchrun only rank 0 writes;
    elsewhere these are no-ops."""

    def __init__(self, script: str, out_dir: str, name: str, config, resume: bool = False) -> None:
        self.writes = distributed.is_main()
        # rank 0 picks (or refuses) a fresh directory; a resumed run and the other ranks use the named one
        self.dir = run_dir(out_dir, name) if self.writes and not resume else Path(out_dir) / name
        if self.writes:
            self.dir.mkdir(parents=True, exist_ok=True)
            config_json = json.dumps({"script": script, **dataclasses.asdict(config)}, indent=2)
            (self.dir / "config.json").write_text(config_json + "\n")
            self.metrics = open(self.dir / "metrics.jsonl", "a" if resume else "w")

    def log(self, **values) -> None:
        if self.writes:
            self.metrics.write(json.dumps(values) + "\n")
            self.metrics.flush()

    def rewrite(self, rows: list[dict]) -> None:
        """metrics.jsonl := rows (a resumed run keeps only what its saved state had seen)."""
        if self.writes:
            (self.dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in rows))

    def write_json(self, name: str, obj) -> Path:
        path = self.dir / name
        if self.writes:
            path.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n")
        return path
