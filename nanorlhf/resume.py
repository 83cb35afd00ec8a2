"""Crash-safe run state, shared by the scripts that can be resumed: a directory written whole or not at
all, the interrupted run's own config, and the optimizer / RNG state as plain tensors (never pickle)."""

import dataclasses
import json
import random
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from nanorlhf.atomic import atomic_dir
from nanorlhf.errors import UserError


def latest(run_dir: Path, name: str, marker: str) -> Path | None:
    """RUN/NAME, or RUN/NAME.old after a crash mid-swap, if it holds `marker` (a file written last)."""
    for candidate in (name, name + ".old"):
        if (Path(run_dir) / candidate / marker).is_file():
            return Path(run_dir) / candidate
    return None


def resumed_config(cls, run_dir: str, script: str):
    """The interrupted run's own config from RUN/config.json (flags given alongside --resume are ignored)."""
    path = Path(run_dir)
    if not (path / "config.json").is_file():
        raise UserError(f"--resume {run_dir}: no config.json there (not a {script} run directory)")
    saved = json.loads((path / "config.json").read_text())
    cfg = cls(**{k: v for k, v in saved.items() if k in {f.name for f in dataclasses.fields(cls)}})
    return dataclasses.replace(cfg, out_dir=str(path.parent), run=path.name, resume=str(path))


def save_train_state(path: Path, step: int, tensors: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer) -> None:
    """PATH/state.safetensors (the given tensors, the optimizer's moments, the RNG) and PATH/state.json
    (step, param groups, Python's RNG), written atomically; state.json last, so its presence means complete."""
    state = optimizer.state_dict()
    tensors = {**tensors, **{f"optim.{i}.{k}": v for i, s in state["state"].items() for k, v in s.items()},
               "rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    meta = {"step": step, "param_groups": state["param_groups"], "python_random": list(random.getstate())}
    with atomic_dir(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp / "state.safetensors")
        (tmp / "state.json").write_text(json.dumps(meta) + "\n")


def load_train_state(path: Path, optimizer: torch.optim.Optimizer) -> tuple[int, dict[str, torch.Tensor]]:
    """Restore the optimizer and the RNGs from save_train_state's files -> (step, all stored tensors)."""
    meta, tensors = json.loads((Path(path) / "state.json").read_text()), load_file(Path(path) / "state.safetensors")
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            i, name = key[len("optim."):].split(".", 1)
            state.setdefault(int(i), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    version, ints, gauss = meta["python_random"]
    random.setstate((version, tuple(ints), gauss))
    return meta["step"], tensors


def metrics_upto(run_dir: Path, step: int) -> list[dict]:
    """The lines of RUN/metrics.jsonl logged at or before `step` (a checkpoint); cli.Run.rewrite puts them back."""
    path = Path(run_dir) / "metrics.jsonl"
    return [m for m in map(json.loads, path.read_text().splitlines()) if m["step"] <= step] if path.is_file() else []
