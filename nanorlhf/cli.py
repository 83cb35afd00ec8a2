"""What every script does around its algorithm: flags from a config dataclass, a run directory,
metrics.jsonl, seeds and the device. No framework: three small functions and a class."""

import argparse
import dataclasses
import json
import random
import time
from pathlib import Path

import torch

from nanorlhf import distributed


def parse_config(cls, description: str, argv: list[str] | None = None):
    """Every field of the dataclass `cls` becomes a --flag (underscores -> dashes) with its help text
    (`field(metadata={"help": ...})`); booleans take true/false so a default of True can be turned off."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    own = set(vars(cls).get("__annotations__", {}))  # the script's own flags first, inherited ones (scale.py) after
    for f in sorted(dataclasses.fields(cls), key=lambda f: f.name not in own):
        parser.add_argument("--" + f.name.replace("_", "-"), type=_flag_type(f.type), default=f.default,
                            help=f"{f.metadata.get('help', '')} (default: {f.default})")
    return cls(**vars(parser.parse_args(argv)))


def _parse_bool(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() in ("true", "1", "yes")


def _flag_type(annotation):
    name = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "str")
    return {"bool": _parse_bool, "int": int, "float": float}.get(name, str)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def device() -> torch.device:
    """CUDA (with bf16 autocast at the call sites) when present, else the CPU in fp32. Under torchrun
    "cuda" is this rank's GPU (distributed.init() made it the current device)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(dev: torch.device):
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")


class Run:
    """out/<script>/<run>/: config.json at the start, metrics.jsonl appended (and flushed) line by line,
    so a crash loses nothing that was logged. Under torchrun only rank 0 writes; elsewhere these are no-ops."""

    def __init__(self, script: str, out_dir: str, name: str, config) -> None:
        self.dir = Path(out_dir) / (name or time.strftime("%Y%m%d-%H%M%S"))
        self.writes = distributed.is_main()
        if self.writes:
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / "config.json").write_text(json.dumps({"script": script, **dataclasses.asdict(config)}, indent=2) + "\n")
            self.metrics = open(self.dir / "metrics.jsonl", "a")

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
