"""cli: flags from a config dataclass, their allowed values, and run directories."""

import json
from dataclasses import dataclass

import pytest
import torch

from nanorlhf.run import Run, flag, parse_config, run_dir, save_state
from nanorlhf.errors import UserError


@dataclass
class Toy:
    lr: float = flag(1e-4, "learning rate", gt=0)
    steps: int = flag(3, "steps", min=1, max=10)
    name: str = flag("x", "a name", choices=("x", "y"))
    precompute: bool = True
    margin: float = flag(0.0, "a margin", min=0, lt=0.5)

    def check(self) -> None:
        if self.name == "y" and self.margin:
            raise UserError(f"--margin {self.margin}: not with --name y")


def test_every_field_is_a_flag_with_its_type():
    assert parse_config(Toy, "", []) == Toy()
    argv = ["--lr", "0.5", "--steps", "7", "--name", "y", "--precompute", "false"]
    cfg = parse_config(Toy, "", argv)
    assert cfg == Toy(lr=0.5, steps=7, name="y", precompute=False)


@pytest.mark.parametrize("argv, message", [
    (["--steps", "2.5"], "argument --steps: invalid int value: '2.5'"),
    (["--precompute", "maybe"], "expected true or false, got 'maybe'"),
    (["--unknown", "1"], "unrecognized arguments: --unknown 1"),
    (["--lr", "0"], "--lr 0.0: must be > 0"),
    (["--steps", "0"], "--steps 0: must be >= 1"),
    (["--steps", "11"], "--steps 11: must be <= 10"),
    (["--margin", "0.5"], "--margin 0.5: must be < 0.5"),
    (["--margin", "-1"], "--margin -1.0: must be >= 0"),
    (["--name", "z"], "--name 'z': choose one of x, y"),
    # the Config's own rule
    (["--name", "y", "--margin", "0.25"], "--margin 0.25: not with --name y"),
])
def test_bad_flags_are_one_user_error(argv, message):
    with pytest.raises(UserError) as info:
        parse_config(Toy, "", argv)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_boundaries_are_allowed():
    assert parse_config(Toy, "", ["--steps", "1", "--margin", "0"]).steps == 1
    assert parse_config(Toy, "", ["--steps", "10", "--margin", "0.49"]).steps == 10


@dataclass
class RunConfig:
    out_dir: str = flag("out", "where runs go")
    run: str = flag("", "run name")
    resume: str = flag("", "run dir to resume")


def test_a_fresh_run_refuses_a_used_run_dir(tmp_path):
    Run("t", tmp_path, "r", RunConfig(str(tmp_path), "r")).log(step=1, loss=1.0)
    # no save point yet (killed before its first, or finished): nothing to offer --resume for
    with pytest.raises(UserError, match="already holds a run: choose another --run$"):
        run_dir(str(tmp_path), "r")  # what a script's main() asks before any work
    save_state(tmp_path / "r", 1, {"w": torch.zeros(1)})
    with pytest.raises(UserError, match="already holds a run: choose another --run, or continue it with --resume"):
        run_dir(str(tmp_path), "r")
    with pytest.raises(UserError, match="already holds a run"):
        Run("t", tmp_path, "r", RunConfig(str(tmp_path), "r"))
    assert (tmp_path / "r" / "metrics.jsonl").read_text() == json.dumps({"step": 1, "loss": 1.0}) + "\n"
    (tmp_path / "empty").mkdir()  # an empty directory is fine (e.g. made by hand)
    assert run_dir(str(tmp_path), "empty") == tmp_path / "empty"


def test_resume_continues_the_same_run_dir(tmp_path):
    Run("t", tmp_path, "r", RunConfig()).log(step=1)
    run = Run("t", tmp_path, "r", RunConfig(), resume=True)
    run.log(step=2)
    assert [json.loads(l)["step"] for l in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_default_run_names_never_collide(tmp_path):
    first = Run("t", tmp_path, "", RunConfig())
    first.log(step=1)
    second = run_dir(str(tmp_path), "")
    assert second != first.dir and not second.exists()


@dataclass
class Percent:
    max_len: int = flag(64, "tokens kept (99% of texts are shorter)")


def test_help_prints_a_literal_percent(capsys):
    with pytest.raises(SystemExit) as done:
        parse_config(Percent, "", ["--help"])
    assert done.value.code == 0
    assert "99% of texts" in capsys.readouterr().out


@pytest.mark.parametrize("script", ["train_dpo.py", "train_ilql.py", "train_rm.py", "rest_loop.py",
                                    "qdaif.py"])
def test_every_script_prints_its_help(script):
    import subprocess, sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(root / script), "--help"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--seed" in done.stdout
