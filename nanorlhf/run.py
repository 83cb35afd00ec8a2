"""A run's flags, directory and state: a Config dataclass whose fields are the --flags, OUT_DIR/RUN
with config.json and metrics.jsonl, and RUN/state/, the one layout every script resumes from.
No framework: a few small functions and a class.

    cfg = parse_config(Config, __doc__)             # every flag checked, one line per error
    run = Run("train_dpo", cfg.out_dir, cfg.run, cfg)
    run.log(step=1, loss=0.69)                      # metrics.jsonl, a line per call
    save_state(run.dir, step, tensors, optimizer)   # RUN/state/, swapped in whole
    cfg, step, history = resume_run(Config, "out/train_dpo/RUN")   # --resume RUN_DIR
"""

import argparse
import dataclasses
import json
import random
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from nanorlhf import distributed
from nanorlhf.atomic import atomic_dir
from nanorlhf.errors import UserError


def flag(default, help: str, *, choices=None, min=None, gt=None, max=None, lt=None):
    """A Config field that is also a --flag: its default, its help text and the values it allows
    (`choices`, or bounds: min/max inclusive, gt/lt exclusive). parse_config checks them all before
    a script does any work, so a bad value ends in one line naming the flag."""
    rules = {k: v for k, v in dict(choices=choices, min=min, gt=gt, max=max, lt=lt).items() if v is not None}
    return dataclasses.field(default=default, metadata={"help": help, **rules})


def positional(help: str):
    """A Config field given by position, not as a --flag (a tool's paths): required, so it comes first
    in the dataclass. Annotated list[str] it takes one or more values, as a list[str] flag does."""
    return dataclasses.field(metadata={"help": help, "positional": True})


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


def parse_config(cls, description: str, argv: list[str] | None = None, prog: str | None = None,
                 defaults: dict | None = None):
    """Every field of the dataclass `cls` becomes a --flag (underscores -> dashes) with its help text
    and its default, or a positional argument (positional()); booleans take true|false, so a default
    of true can be turned off; a field typed list[str] or tuple[str, ...] takes one or more values
    (--model a b, or --model a --model b). `defaults` (field name -> value) replace the fields' own:
    e.g. a finished run's config, which the flags given override. Every value is checked
    (check_flags) before the script does any work. `prog`: the command --help shows."""
    parser = _Parser(prog=prog, description=description,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    fields = {f.name: (f, _flag_type(f.type), (defaults or {}).get(f.name, f.default))
              for f in dataclasses.fields(cls)}
    for f, kind, default in fields.values():
        many = _many(f)
        if f.metadata.get("positional"):
            parser.add_argument(f.name, type=kind, nargs="+" if many else None,
                                metavar=f.name.upper(), help=f.metadata["help"].replace("%", "%%"))
            continue
        shown = " ".join(default) if many else str(default).lower() if kind is _parse_bool else default
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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


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


# --- resuming: RUN/state/ holds what a run needs to continue exactly (never pickle) ---

STATE = "state"


def state_dir(run: str | Path) -> Path | None:
    """RUN/state, or RUN/state.old after a crash mid-swap, if it is complete (state.json is written last)."""
    for name in (STATE, STATE + ".old"):
        if (Path(run) / name / "state.json").is_file():
            return Path(run) / name
    return None


def save_state(run: str | Path, step: int, tensors: dict[str, torch.Tensor],
               optimizer: torch.optim.Optimizer | None = None, **meta) -> None:
    """RUN/state/: state.safetensors (the given tensors, the optimizer's moments, the RNG) and state.json
    (step, the optimizer's param groups, Python's RNG, `meta`), swapped in whole (atomic_dir); state.json
    is written last, so its presence means the state is complete."""
    state = optimizer.state_dict() if optimizer is not None else {"state": {}, "param_groups": None}
    tensors = {**tensors, **{f"optim.{i}.{k}": v for i, s in state["state"].items() for k, v in s.items()},
               "rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    info = {"step": step, "param_groups": state["param_groups"],
            "python_random": list(random.getstate()), **meta}
    with atomic_dir(Path(run) / STATE) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp / "state.safetensors")
        (tmp / "state.json").write_text(json.dumps(info) + "\n")


def load_state(run: str | Path, optimizer: torch.optim.Optimizer | None = None
               ) -> tuple[int, dict[str, torch.Tensor], dict]:
    """Restore the optimizer and the RNGs from RUN/state -> (step, every stored tensor, state.json)."""
    path = state_dir(run)
    if path is None:
        raise UserError(f"--resume {run}: no resumable state ({STATE}/state.json) in that directory")
    info, tensors = json.loads((path / "state.json").read_text()), load_file(path / "state.safetensors")
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
    return info["step"], tensors, info


def resume_run(cls, run: str, script: str, step_key: str = "step"):
    """--resume RUN_DIR -> (the interrupted run's own Config from RUN/config.json, the step its state
    holds, its metrics.jsonl lines up to that step: those whose `step_key` is at most it). Flags given
    beside --resume are ignored."""
    path = Path(run)
    if (state := state_dir(path)) is None:
        raise UserError(f"--resume {run}: no resumable state ({STATE}/state.json) in that directory")
    if not (path / "config.json").is_file():
        raise UserError(f"--resume {run}: no config.json there (not a {script} run directory)")
    step = json.loads((state / "state.json").read_text())["step"]
    saved = json.loads((path / "config.json").read_text())
    cfg = cls(**{k: v for k, v in saved.items() if k in {f.name for f in dataclasses.fields(cls)}})
    cfg = dataclasses.replace(cfg, out_dir=str(path.parent), run=path.name, resume=str(path))
    check_flags(cfg)
    metrics = path / "metrics.jsonl"
    history = [m for m in map(json.loads, metrics.read_text().splitlines()) if m[step_key] <= step] \
        if metrics.is_file() else []
    return cfg, step, history
