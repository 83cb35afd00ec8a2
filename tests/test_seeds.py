"""tools/seeds.py: mean ± SE over seeds per step, by hand; the tools' flags."""

import json
import math

import pytest

from nanorlhf.tasks import stats
from tools import seeds
from nanorlhf.errors import UserError


def write_run(path, rows):
    path.mkdir()
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_mean_se_by_hand():
    # (1, 2, 6): mean 3, deviations (-2, -1, 3), Σ² = 14, var 7, SE sqrt(7/3)
    m, se = stats.mean_se([1.0, 2.0, 6.0])
    assert m == 3.0 and se == pytest.approx(math.sqrt(7 / 3), rel=1e-15)
    assert stats.mean_se([4.0])[0] == 4.0 and math.isnan(stats.mean_se([4.0])[1])


def test_per_step_groups_runs_and_skips_missing(tmp_path):
    runs = [seeds.read_metrics(write_run(tmp_path / f"s{i}", rows)) for i, rows in enumerate([
        [{"iteration": 0, "gold": 0.1, "acc": None}, {"iteration": 1, "gold": 0.5, "acc": 0.5}],
        [{"iteration": 0, "gold": 0.3, "acc": None}, {"iteration": 1, "gold": 0.7, "acc": 0.7},
         {"other": 1}],
    ])]
    table = seeds.per_step(runs, "iteration", ["gold", "acc"])
    # SE of (0.1, 0.3): 0.1414/sqrt2
    assert table[0]["gold"] == pytest.approx((0.2, 0.1, 2), rel=1e-12)
    assert "acc" not in table[0] and table[1]["acc"][2] == 2
    text = seeds.format_table(table, ["gold", "acc"], "iteration", table)
    assert "| 1 | +0.600 ± 0.100 |" in text and "+0.000 ± 0.141" in text  # Δ of a group with itself


def test_bad_run_dirs_are_one_line(tmp_path):
    with pytest.raises(UserError, match="no metrics.jsonl"):
        seeds.read_metrics(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n')
    with pytest.raises(UserError, match=r"metrics.jsonl:2: not a JSON line"):
        seeds.read_metrics(tmp_path)


def test_main_averages_two_groups_of_runs(tmp_path, capsys):
    """tools/seeds.py RUN RUN --vs RUN RUN: gold 0.1, 0.3 (mean 0.2, SE 0.1) vs 0.5, 0.5 (SE 0):
    Δ -0.3 ± 0.1."""
    runs = [str(write_run(tmp_path / name, [{"step": 1, "gold": g}]))
            for name, g in (("a0", 0.1), ("a1", 0.3), ("b0", 0.5), ("b1", 0.5))]
    seeds.main(["--keys", "gold", *runs[:2], "--vs", *runs[2:]])
    out = capsys.readouterr().out
    assert out.startswith("2 runs vs 2 runs: mean ± SE over seeds")
    assert "| 1 | +0.200 ± 0.100 | +0.500 ± 0.000 | -0.300 ± 0.100 |" in out
    with pytest.raises(UserError, match="--keys: name the metrics"):
        seeds.main(runs[:2])


@pytest.mark.parametrize("tool, default", [("chat", "(default: 128)"), ("seeds", "(default: step)"),
                                           ("qdaif_seeds", "RUNS [RUNS ...]"),
                                           ("convert", "[--force true|false] SRC DST")])
def test_each_tool_names_itself_and_shows_its_defaults(tool, default, capsys):
    """`python tools/chat.py --help` says `python tools/chat.py`, not chat.py, and every flag's
    default."""
    import importlib

    with pytest.raises(SystemExit) as done:
        importlib.import_module(f"tools.{tool}").main(["--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0 and out.startswith(f"usage: python tools/{tool}.py ")
    assert default in out
