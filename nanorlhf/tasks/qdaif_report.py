"""QDAIF's outputs, read from a finished search (qdaif.py): summary.json, the printed tables, the
heatmaps (elite fitness, mean fitness, candidate count), the QD curve and map.html
(nanorlhf/tasks/qdaif_map.py).

Beside coverage and QD score the summary holds the evidence for reading the map: how many elites and
candidates echo their instruction and what the judge gives them, VADER sentiment per requested tone
for fresh poems and for rewrites (does a rewrite move a poem toward the tone it was asked for?), and
per cell the elite, the mean over every valid candidate and their count. An elite is a maximum, so a
cell that many poems land in gets a high one: read it next to the mean and the count.
"""

import itertools
import json
import math

from nanorlhf.tasks import stats
from nanorlhf.atomic import atomic_write_text
from nanorlhf.tasks.qdaif_map import write_map
from nanorlhf.svg import heatmap, line_plots_svg

TONE_AXIS, HIGH, LOW = "tone", "happy", "dark"  # the sentiment gap: HIGH minus LOW requested tone


def mean_se(xs: list[float]) -> dict:
    """{n, mean, se} (stats.mean_se) as JSON can hold it: None where undefined (no value, or
    one)."""
    if not xs:
        return {"n": 0, "mean": None, "se": None}
    mean, se = stats.mean_se(xs)
    return {"n": len(xs), "mean": mean, "se": None if math.isnan(se) else se}


def difference(a: dict, b: dict) -> dict:
    """{mean, se} of mean(a) - mean(b) for independent samples: se = sqrt(se_a² + se_b²)."""
    if a["mean"] is None or b["mean"] is None:
        return {"mean": None, "se": None}
    se = math.hypot(a["se"], b["se"]) if a["se"] is not None and b["se"] is not None else None
    return {"mean": a["mean"] - b["mean"], "se": se}


def cell_name(key: tuple) -> str:
    return "/".join(key)


def grid_matrix(grid, values: dict) -> tuple[list[str], list[str], list[list]]:
    """{cell key: value} -> (rows = first axis, columns = the other axes joined by '/',
    values[r][c])."""
    cols = list(itertools.product(*(grid.axes[n] for n in grid.names[1:])))
    rows = grid.axes[grid.names[0]]
    return rows, ["/".join(c) for c in cols], [[values.get((r, *c)) for c in cols] for r in rows]


def format_table(grid, values: dict, fmt: str = ".3g") -> str:
    rows, cols, matrix = grid_matrix(grid, values)
    w, first = max([9] + [len(c) + 2 for c in cols]), max(len(r) for r in rows) + 2
    cell = lambda v: "." if v is None else f"{v:{fmt}}"
    lines = [" " * first + "".join(f"{c:>{w}}" for c in cols)]
    lines += [f"{r:<{first}}" + "".join(f"{cell(v):>{w}}" for v in vals)
              for r, vals in zip(rows, matrix)]
    return "\n".join(lines)


def disagreement(grid, history: list[dict]) -> dict:
    """How often the judged labels differ from the requested ones, overall and per axis."""
    rows = [h for h in history if grid.key(h["judged"]) is not None]
    out = {"n": len(rows), "any": sum(h["judged"] != h["target"] for h in rows) / max(len(rows), 1)}
    rate = lambda a: sum(h["judged"][a] != h["target"][a] for h in rows) / max(len(rows), 1)
    return out | {a: rate(a) for a in grid.names}


def echo_stats(history: list[dict], elites: list[dict]) -> dict:
    """Instruction echoes (qdaif.echoes_instruction): among the elites, among all candidates, and
    the fitness of valid echoing candidates against the rest (the judge's taste for its own
    instructions)."""
    valid = [h for h in history if h["status"] != "invalid"]
    return {"elites": sum(bool(e.get("echo")) for e in elites),
            "candidates": sum(bool(h.get("echo")) for h in history),
            "fitness_echo": mean_se([h["fitness"] for h in valid if h.get("echo")]),
            "fitness_other": mean_se([h["fitness"] for h in valid if not h.get("echo")])}


def by_tone(grid, history: list[dict]) -> dict | None:
    """Per requested tone (the target, not the judged label), for valid fresh poems (op init) and
    rewrites (op mutate): mean VADER sentiment and fitness, and for rewrites the shift, child minus
    parent sentiment. gap: happy minus dark sentiment, fresh and rewritten: how much of the
    requested tone reaches the poem. None when the grid has no tone axis."""
    if TONE_AXIS not in grid.axes:
        return None
    tones, by_id = grid.axes[TONE_AXIS], {h["id"]: h for h in history}
    valid = [h for h in history if h["status"] != "invalid" and h.get("sentiment") is not None]
    out = {"axis": TONE_AXIS}
    for op in ("init", "mutate"):
        out[op] = {}
        for tone in tones:
            rows = [h for h in valid if h["op"] == op and h["target"][TONE_AXIS] == tone]
            entry = {"sentiment": mean_se([h["sentiment"] for h in rows]),
                     "fitness": mean_se([h["fitness"] for h in rows])}
            if op == "mutate":
                parents = [(h, by_id.get(h["parent"], {}).get("sentiment")) for h in rows]
                entry["shift"] = mean_se([h["sentiment"] - p for h, p in parents if p is not None])
            out[op][tone] = entry
    if HIGH in tones and LOW in tones:
        out["gap"] = {op: difference(out[op][HIGH]["sentiment"], out[op][LOW]["sentiment"])
                      for op in ("init", "mutate")}
    return out


def cell_stats(grid, valid: list[dict], elites: dict) -> dict:
    """'genre/tone' -> {elite: its fitness, mean: over every valid candidate in the cell, count: how
    many}."""
    by_cell = {}
    for h in valid:
        by_cell.setdefault(grid.key(h["cell"]), []).append(h["fitness"])
    return {cell_name(k): {"elite": elites[k]["fitness"] if k in elites else None,
                           "mean": sum(by_cell[k]) / len(by_cell[k]) if k in by_cell else None,
                           "count": len(by_cell.get(k, []))} for k in grid.keys}


def _pm(s: dict, signed: bool = False) -> str:
    if s["mean"] is None:
        return "n/a"
    se = "" if s["se"] is None else f" ± {s['se']:.2f}"
    return f"{s['mean']:{'+' if signed else ''}.2f}" + se


def format_by_tone(bt: dict) -> str:
    """The sentiment table: one row per requested tone, fresh poems then rewrites (mean ± SE)."""
    head = f"{'requested ' + bt['axis']:<16}{'fresh n':>8}{'sentiment':>14}{'fitness':>14}" \
           f"{'rewrites n':>12}{'sentiment':>14}{'fitness':>14}{'child-parent':>16}"
    lines = [head]
    for tone, fresh in bt["init"].items():
        rew = bt["mutate"][tone]
        lines.append(f"{tone:<16}{fresh['sentiment']['n']:>8}{_pm(fresh['sentiment']):>14}"
                     f"{_pm(fresh['fitness']):>14}{rew['sentiment']['n']:>12}"
                     f"{_pm(rew['sentiment']):>14}{_pm(rew['fitness']):>14}"
                     f"{_pm(rew['shift'], True):>16}")
    if "gap" in bt:
        lines.append(f"{HIGH} - {LOW} sentiment gap: fresh {_pm(bt['gap']['init'], True)}, "
                     f"rewrites {_pm(bt['gap']['mutate'], True)}")
    return "\n".join(lines)


def report(out, grid, archive, curve: list[dict], fitness_range) -> dict:
    """elites.jsonl, three heatmaps (elite and mean on one fixed colour scale, counts), the QD
    curve, map.html, the printed tables and summary.json. -> the summary."""
    # lines end at "\n" only: str.splitlines would also split a poem holding U+2028 (json.dumps
    # leaves it as it is)
    lines = (out.dir / "history.jsonl").read_text().split("\n")
    history = [json.loads(line) for line in lines if line]
    valid = [h for h in history if h["status"] != "invalid"]
    elites = {k: e["fitness"] for k, e in archive.elites.items()}
    cells = cell_stats(grid, valid, archive.elites)
    by_key = lambda field: {k: cells[cell_name(k)][field] for k in grid.keys
                            if cells[cell_name(k)][field] is not None}
    means, counts = by_key("mean"), by_key("count")
    atomic_write_text(out.dir / "elites.jsonl", "".join(
        json.dumps(archive.elites[k], ensure_ascii=False) + "\n"
        for k in grid.keys if k in archive.elites))
    seen = [h["fitness"] for h in valid]
    lo, hi = fitness_range or (min(seen, default=0.0), max(seen, default=1.0))
    rows, cols, _ = grid_matrix(grid, {})
    row_axis, col_axis = grid.names[0], "/".join(grid.names[1:])
    for name, values, title in (("elites.svg", elites, "elite fitness per cell"),
                                ("mean_fitness.svg", means,
                                 f"mean fitness of all {len(valid)} valid candidates per cell")):
        heatmap(rows, cols, grid_matrix(grid, values)[2], out.dir / name, title, lo, hi, row_axis,
                col_axis)
    heatmap(rows, cols, grid_matrix(grid, counts)[2], out.dir / "counts.svg",
            f"valid candidates per cell ({len(valid)} in all)", 0, max(counts.values(), default=1),
            row_axis, col_axis, fmt="d")
    series = lambda key: [(p["candidates"], p[key]) for p in curve if p[key] is not None]
    panels = [(f"QD score (offset {archive.offset:g})", {"QD": series("qd_score")}),
              ("coverage", {"coverage": series("coverage")}),
              ("elite fitness", {"best": series("best"), "mean": series("mean")})]
    curve_svg = line_plots_svg(panels, xlabel="candidates (LM generations)")
    atomic_write_text(out.dir / "qd_score.svg", curve_svg)
    stats, disagree = archive.stats(), disagreement(grid, history)
    echo, tones = echo_stats(history, list(archive.elites.values())), by_tone(grid, history)
    print("\nelite fitness per cell\n" + format_table(grid, elites))
    top = f" of {(hi - archive.offset) * len(grid.keys):.3g}" if fitness_range else ""
    best = "n/a" if stats["best"] is None else f"{stats['best']:.3g}"
    print(f"coverage {stats['num_elites']}/{len(grid.keys)} ({stats['coverage']:.0%}), QD score "
          f"{stats['qd_score']:.3g}{top} (offset {archive.offset:g}), best {best}, "
          f"{len(history)} candidates, {len(history) - len(valid)} invalid")
    print(f"judged labels differ from the requested ones for {disagree['any']:.0%} of "
          f"{disagree['n']} judged poems ("
          + ", ".join(f"{a} {disagree[a]:.0%}" for a in grid.names) + ")")
    print(f"instruction echoes: {echo['elites']} of {stats['num_elites']} elites, "
          f"{echo['candidates']} of {len(history)} candidates; mean fitness "
          f"{_pm(echo['fitness_echo'])} (echo, n {echo['fitness_echo']['n']}) vs "
          f"{_pm(echo['fitness_other'])} (the rest, n {echo['fitness_other']['n']})")
    print("\nvalid candidates per cell\n" + format_table(grid, counts, "d"))
    if tones is not None:
        print("\nVADER sentiment (± SE) by requested tone\n" + format_by_tone(tones))
    summary = {**stats, "offset": archive.offset, "candidates": len(history),
               "invalid": len(history) - len(valid), "disagreement": disagree, "echo": echo,
               "by_tone": tones, "cells": cells}
    out.write_json("summary.json", summary)
    title = f"QDAIF map: {out.dir.name}"
    elites_by_cell = {cell_name(k): e for k, e in archive.elites.items()}
    write_map(out.dir / "map.html", title, row_axis, col_axis, rows, cols, cells, elites_by_cell,
              history, summary, (lo, hi), curve_svg)
    return summary
