"""QDAIF over several seeds: mean ± standard error across runs of the figures in each run's
summary.json.

    python tools/qdaif_seeds.py out/qdaif/seed0 out/qdaif/seed1 out/qdaif/seed2 [--json FILE]

Each run counts as one sample: se = s / sqrt(k) over the k runs that have the figure, s the sample
standard deviation between them. So the spread is between seeds, not between the poems of one run
(those SEs are in each summary). A figure missing from a run (a summary written before it existed)
is left out for that run; the table shows how many runs each mean is over.
"""

import json
from dataclasses import dataclass
from pathlib import Path

from nanorlhf.atomic import atomic_write_text
from nanorlhf.errors import UserError, run_cli
from nanorlhf.run import flag, parse_config, positional
from nanorlhf.tasks.qdaif_report import HIGH, LOW, mean_se


@dataclass
class Config:
    runs: list[str] = positional("qdaif run directories (each with a summary.json)")
    json: str = flag("", "also write the table as JSON to this file")


def _get(summary: dict, *path):
    for key in path:
        if not isinstance(summary, dict) or summary.get(key) is None:
            return None
        summary = summary[key]
    return summary


def figures(summary: dict) -> dict[str, float | None]:
    """One run's figures, by name: coverage, QD score, echo elites and the fitness of echoes against
    the rest, the happy - dark sentiment gaps, and per requested tone the fresh poems' mean
    sentiment and fitness (what the fitness rewards, on poems that carry the tone), the rewrites'
    sentiment and child - parent shift."""
    out = {"coverage": summary.get("coverage"), "qd_score": summary.get("qd_score"),
           "echo elites": _get(summary, "echo", "elites"),
           "echo candidates": _get(summary, "echo", "candidates"),
           f"fresh {HIGH}-{LOW} gap": _get(summary, "by_tone", "gap", "init", "mean"),
           f"rewrite {HIGH}-{LOW} gap": _get(summary, "by_tone", "gap", "mutate", "mean"),
           "echo fitness": _get(summary, "echo", "fitness_echo", "mean"),
           "non-echo fitness": _get(summary, "echo", "fitness_other", "mean")}
    for op, name, stat in (("init", "fresh", "sentiment"), ("init", "fresh", "fitness"),
                           ("mutate", "rewrite", "sentiment"), ("mutate", "rewrite", "shift")):
        for tone in _get(summary, "by_tone", op) or {}:
            out[f"{name} {tone} {stat}"] = _get(summary, "by_tone", op, tone, stat, "mean")
    return out


def aggregate(summaries: list[dict]) -> dict[str, dict]:
    """name -> {n, mean, se} across the runs that have the figure, in the order figures() first
    names them."""
    per_run = [figures(s) for s in summaries]
    names = list(dict.fromkeys(name for f in per_run for name in f))
    return {name: mean_se([f[name] for f in per_run if f.get(name) is not None]) for name in names}


def read_summary(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "summary.json"
    try:
        summary = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: no summary.json (is {run_dir} a finished qdaif run?)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(summary, dict) or "coverage" not in summary:
        raise UserError(f"{path}: not a qdaif summary (no 'coverage')")
    return summary


def format_aggregate(stats: dict[str, dict], runs: int) -> str:
    lines = [f"{'across ' + str(runs) + ' runs':<28}{'mean':>10}{'± SE':>10}{'runs':>6}"]
    for name, s in stats.items():
        if s["n"]:
            se = "" if s["se"] is None else f"{s['se']:.3f}"
            lines.append(f"{name:<28}{s['mean']:>10.3f}{se:>10}{s['n']:>6}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, dict]:
    cfg = parse_config(Config, __doc__, argv, prog="python tools/qdaif_seeds.py")
    stats = aggregate([read_summary(r) for r in cfg.runs])
    print(format_aggregate(stats, len(cfg.runs)))
    if cfg.json:
        table = {"runs": cfg.runs, "figures": stats}
        atomic_write_text(Path(cfg.json), json.dumps(table, indent=1) + "\n")
    return stats


if __name__ == "__main__":
    run_cli(main)
