"""nanorlhf.seeds: mean ± SE over seeds per step, by hand."""

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
        [{"iteration": 0, "gold": 0.3, "acc": None}, {"iteration": 1, "gold": 0.7, "acc": 0.7}, {"other": 1}],
    ])]
    table = seeds.per_step(runs, "iteration", ["gold", "acc"])
    assert table[0]["gold"] == pytest.approx((0.2, 0.1, 2), rel=1e-12)  # SE of (0.1, 0.3): 0.1414/sqrt2
    assert "acc" not in table[0] and table[1]["acc"][2] == 2
    text = seeds.format_table(table, ["gold", "acc"], "iteration", table)
    assert "| 1 | +0.600 ± 0.100 |" in text and "+0.000 ± 0.141" in text  # Δ of a group with itself


def test_bad_run_dirs_are_one_line(tmp_path):
    with pytest.raises(UserError, match="no metrics.jsonl"):
        seeds.read_metrics(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n')
    with pytest.raises(UserError, match=r"metrics.jsonl:2: not a JSON line"):
        seeds.read_metrics(tmp_path)
