"""Mean ± standard error over seeds, per step, from runs' metrics.jsonl: one result is a table, not
one run.

    python tools/seeds.py --by iteration --keys gold,proxy_acc,kl out/rest_loop/iter-s{0,1,2}
    python tools/seeds.py --by iteration --keys gold out/rest_loop/iter-s{0,1,2} \\
        --vs out/rest_loop/one-s{0,1,2}

Every run is one independent sample (its own seed), so the SE of a mean over n runs is the sample
standard deviation (n - 1 in the denominator) over sqrt(n). With --vs, the difference of the two
groups' means per step, with the SE of a difference of independent means, sqrt(se_a² + se_b²).
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path

from nanorlhf.errors import UserError, run_cli
from nanorlhf.run import flag, parse_config, positional
from nanorlhf.tasks.stats import mean_se


@dataclass
class Config:
    runs: list[str] = positional("run directories (one per seed)")
    keys: str = flag("", "comma-separated metrics to average (at least one)")
    by: str = flag("step", "the step column of metrics.jsonl (rest_loop: iteration)")
    vs: list[str] = flag((), "a second group of runs (the baseline)")

    def check(self) -> None:
        if not [k for k in self.keys.split(",") if k]:
            raise UserError("--keys: name the metrics to average, e.g. --keys gold,kl")


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{run_dir}: no metrics.jsonl (not a run directory)")
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            raise UserError(f"{path}:{i}: not a JSON line") from None
    return rows


def per_step(runs: list[list[dict]], by: str, keys: list[str]) -> dict:
    """runs' metric rows -> {step: {key: (mean, se, n)}} over the runs that logged that key at that
    step."""
    table: dict = {}
    for rows in runs:
        for row in rows:
            if by not in row:
                continue
            for key in keys:
                if row.get(key) is not None:
                    table.setdefault(row[by], {}).setdefault(key, []).append(float(row[key]))
    return {step: {k: (*mean_se(vs), len(vs)) for k, vs in cols.items()}
            for step, cols in sorted(table.items())}


def format_table(a: dict, keys: list[str], by: str, b: dict | None = None) -> str:
    cell = lambda m, se: f"{m:+.3f} ± {se:.3f}" if not math.isnan(se) else f"{m:+.3f}"
    heads = keys + ([f"{k} (vs)" for k in keys] + [f"Δ{k}" for k in keys] if b is not None else [])
    lines = ["| " + " | ".join([by] + heads) + " |", "|---" * (len(heads) + 1) + "|"]
    for step in sorted(set(a) | set(b or {})):
        cols = [cell(*a[step][k][:2]) if k in a.get(step, {}) else "-" for k in keys]
        if b is not None:
            cols += [cell(*b[step][k][:2]) if k in b.get(step, {}) else "-" for k in keys]
            for k in keys:
                if k in a.get(step, {}) and k in b.get(step, {}):
                    (ma, sa, _), (mb, sb, _) = a[step][k], b[step][k]
                    cols.append(cell(ma - mb, math.sqrt(sa ** 2 + sb ** 2)))
                else:
                    cols.append("-")
        lines.append("| " + " | ".join([str(step)] + cols) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(Config, __doc__, argv, prog="python tools/seeds.py")
    keys = [k for k in cfg.keys.split(",") if k]
    group = lambda dirs: per_step([read_metrics(d) for d in dirs], cfg.by, keys)
    a, b = group(cfg.runs), group(cfg.vs) if cfg.vs else None
    versus = f" vs {len(cfg.vs)} runs" if cfg.vs else ""
    print(f"{len(cfg.runs)} runs{versus}: mean ± SE over seeds")
    print(format_table(a, keys, cfg.by, b))


if __name__ == "__main__":
    run_cli(main)
