"""map.html: a QDAIF archive to click through, one self-contained file (no server, no network, no
other file).

The heatmap has three views (elite fitness, mean fitness of every valid candidate, candidate count).
A click on a cell shows its elite poem, its score, and its lineage: the parent, the parent's parent,
... back to the fresh poem it started from, each with its operation, cell, fitness and text.
`map.html#cell=sonnet/dark` opens a cell (add `&view=count` for a view), so a link can point at a
poem.
 Poems are model output, so nothing from the data becomes markup: the page builds every element with
textContent, and the data sits in a JSON script block with <, > and & written as \\u escapes, so a
poem
holding `</script>` cannot end the block.
"""

import html
import json
from pathlib import Path

from nanorlhf.atomic import atomic_write_text

FIELDS = ("id", "batch", "op", "parent", "target", "judged", "cell", "fitness", "status", "echo",
          "sentiment", "text")


def lineages(elites: dict[str, dict], history: list[dict]) -> dict[str, dict]:
    """Every elite and all its ancestors (parent ids walked through the history), by id, cut to
    FIELDS."""
    by_id, poems = {h["id"]: h for h in history}, {}
    for elite in elites.values():
        poem = elite
        while poem is not None and str(poem["id"]) not in poems:
            poems[str(poem["id"])] = {f: poem.get(f) for f in FIELDS}
            poem = by_id.get(poem.get("parent"))
    return poems


def embed_json(data) -> str:
    """JSON safe inside <script>: '<', '>' and '&' only occur in strings, where \\u003c etc. mean
    the same."""
    text = json.dumps(data, ensure_ascii=False, allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def write_map(path: str | Path, title: str, row_axis: str, col_axis: str, rows: list[str],
              cols: list[str], cells: dict[str, dict], elites: dict[str, dict], history: list[dict],
              summary: dict, scale: tuple[float, float], curve_svg: str) -> Path:
    """cells: 'row/col' -> {elite, mean, count} (qdaif_report.cell_stats); elites: 'row/col' ->
    candidate; scale: the fitness colour range; curve_svg: the QD curve, our own SVG markup, inlined
    as it is."""
    data = {"title": title, "row_axis": row_axis, "col_axis": col_axis, "rows": rows, "cols": cols,
            "scale": list(scale), "cells": {k: {**c, "id": elites[k]["id"] if k in elites else None}
                                            for k, c in cells.items()},
            "poems": lineages(elites, history), "summary": summary}
    page = (PAGE.replace("{{title}}", html.escape(title)).replace("{{curve}}", curve_svg)
            .replace("{{data}}", embed_json(data)))
    atomic_write_text(Path(path), page)
    return Path(path)


PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{{title}}</title>
<style>
body { font-family: sans-serif; font-size: 14px; margin: 16px 24px; color: #222; background: #fff; }
h1 { font-size: 20px; } h2 { font-size: 16px; margin: 8px 0; }
h3 { font-size: 14px; margin: 12px 0 4px; }
.meta { color: #555; }
#views label { margin-right: 14px; cursor: pointer; }
#layout { display: flex; gap: 28px; align-items: flex-start; flex-wrap: wrap; }
table.map { border-collapse: collapse; margin-top: 8px; }
table.map th { font-weight: normal; padding: 4px 6px; }
table.map th.axis { font-style: italic; color: #555; }
td.cell { width: 84px; height: 44px; text-align: center; cursor: pointer; border: 2px solid #fff; }
td.cell.empty { background: #d0d0d0; color: #555; }
td.cell.selected { outline: 3px solid #e6194b; outline-offset: -3px; }
td.cell .flag { display: block; font-size: 10px; }
#detail { flex: 1 1 24em; max-width: 46em; }
pre.poem { white-space: pre-wrap; background: #f5f5f5; padding: 8px 10px;
           border-left: 3px solid #999; margin: 4px 0; }
ol#lineage li { margin-bottom: 10px; }
</style>
</head>
<body>
<h1>{{title}}</h1>
<p id="stats" class="meta"></p>
<div id="views">view:
<label><input type="radio" name="view" value="elite" checked> elite fitness</label>
<label><input type="radio" name="view" value="mean"> mean fitness of all candidates</label>
<label><input type="radio" name="view" value="count"> candidate count</label>
</div>
<div id="layout">
<div><table class="map" id="map"></table><p id="legend" class="meta"></p></div>
<div id="detail"><p class="meta">Click a cell to read its elite poem and its lineage.</p></div>
</div>
<h2>QD score</h2>
<div id="curve">{{curve}}</div>
<script type="application/json" id="data">{{data}}</script>
<script>
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
// as svg.py
const VIRIDIS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
let view = "elite", selected = null;

// text children become text nodes: nothing is parsed as HTML
function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  e.append(...children);
  return e;
}
const num = (x, d = 2) => x === null || x === undefined ? "n/a" : x.toFixed(d);
const signed = x => x === null || x === undefined ? "n/a" : (x >= 0 ? "+" : "") + x.toFixed(2);
const pm = (s, sign = true) => !s || s.mean === null ? "n/a" :
  (sign ? signed(s.mean) : num(s.mean)) + (s.se === null ? "" : " ± " + s.se.toFixed(2));
const labels = c => c ? Object.values(c).join("/") : "none";

function colour(t) {  // t in [0, 1] -> [css colour, ink]
  t = Math.min(Math.max(t, 0), 1) * (VIRIDIS.length - 1);
  const i = Math.min(Math.floor(t), VIRIDIS.length - 2), f = t - i;
  const rgb = VIRIDIS[i].map((a, k) => Math.round(a + (VIRIDIS[i + 1][k] - a) * f));
  return ["rgb(" + rgb.join(",") + ")", t / (VIRIDIS.length - 1) < 0.6 ? "white" : "black"];
}

function scale() {
  if (view !== "count") return D.scale;
  return [0, Math.max(1, ...Object.values(D.cells).map(c => c.count))];
}

function render() {
  const table = document.getElementById("map"), [lo, hi] = scale();
  table.replaceChildren(el("tr", {}, el("th", {class: "axis"}, D.row_axis + " \\\\ " + D.col_axis),
                           ...D.cols.map(c => el("th", {}, c))));
  for (const r of D.rows) {
    const tr = el("tr", {}, el("th", {}, r));
    for (const c of D.cols) {
      const key = r + "/" + c, cell = D.cells[key], v = cell[view];
      const td = el("td", {class: "cell", "data-cell": key});
      if (v === null || (view === "count" && v === 0)) {
        td.classList.add("empty");
        td.append(view === "count" ? "0" : "·");
      } else {
        const [bg, ink] = colour((v - lo) / ((hi - lo) || 1));
        td.style.background = bg; td.style.color = ink;
        td.append(el("span", {class: "value"}, view === "count" ? String(v) : v.toFixed(2)));
        if (view === "elite" && D.poems[cell.id] && D.poems[cell.id].echo)
          td.append(el("span", {class: "flag"}, "echo"));
      }
      if (key === selected) td.classList.add("selected");
      td.addEventListener("click", () => select(key));
      tr.append(td);
    }
    table.append(tr);
  }
  const what = {elite: "elite fitness", mean: "mean fitness of every valid candidate",
                count: "valid candidates"}[view];
  const digits = view === "count" ? 0 : 2;
  document.getElementById("legend").textContent =
    `colour: ${what}, ${num(lo, digits)} (dark) to ${num(hi, digits)} (yellow); grey: empty` +
    (view === "elite" ? "; echo: the elite repeats its instruction" : "");
}

function describe(p) {
  const how = p.op === "init" ? "fresh poem" : "rewrite of #" + p.parent;
  return `#${p.id} ${how}, asked for ${labels(p.target)}, judged ${labels(p.judged)}, ` +
    `cell ${labels(p.cell)}, fitness ${num(p.fitness, 3)}, sentiment ${signed(p.sentiment)}, ` +
    `${p.status}` +
    (p.echo ? ", echoes its instruction" : "");
}

function select(key) {
  selected = key;
  for (const td of document.querySelectorAll("td.cell"))
    td.classList.toggle("selected", td.dataset.cell === key);
  try {
    history.replaceState(null, "", "#cell=" + encodeURIComponent(key) + "&view=" + view);
  } catch (e) {}
  const cell = D.cells[key], box = document.getElementById("detail");
  const landed = `${cell.count} valid candidate${cell.count === 1 ? "" : "s"} landed here` +
    (cell.count ? `, mean fitness ${num(cell.mean, 3)}` : "");
  box.replaceChildren(el("h2", {id: "detail-cell"}, key), el("p", {class: "meta"}, landed));
  const elite = D.poems[cell.id];
  if (!elite) {
    box.append(el("p", {id: "no-elite"}, "No elite: no valid, eligible poem landed in this cell."));
    return;
  }
  box.append(el("h3", {}, `elite: fitness ${num(elite.fitness, 3)}`),
             el("p", {id: "elite-meta", class: "meta"}, describe(elite)),
             el("pre", {id: "poem", class: "poem"}, elite.text));
  // the parent, its parent, ... back to the fresh poem (parent ids through the history)
  const chain = [];
  for (let p = D.poems[elite.parent]; p; p = D.poems[p.parent]) chain.push(p);
  box.append(el("h3", {}, chain.length ? `lineage: ${chain.length} ancestor(s), the parent first`
                                       : "lineage: a fresh poem, no parent"));
  const ol = el("ol", {id: "lineage"});
  for (const p of chain)
    ol.append(el("li", {class: "ancestor"}, el("div", {class: "meta"}, describe(p)),
                 el("pre", {class: "poem"}, p.text)));
  box.append(ol);
}

// #cell=ROW/COL[&view=elite|mean|count]: a real click on the cell, as a reader would
function openFromHash() {
  const params = new URLSearchParams(location.hash.slice(1));
  if (["elite", "mean", "count"].includes(params.get("view"))) {
    view = params.get("view");
    document.querySelector(`input[name=view][value=${view}]`).checked = true;
    render();
  }
  const key = params.get("cell");
  const td = [...document.querySelectorAll("td.cell")].find(t => t.dataset.cell === key);
  if (td)
    td.dispatchEvent(new MouseEvent("click", {bubbles: true, cancelable: true, view: window}));
}

function showStats() {
  const s = D.summary, n = Object.keys(D.cells).length, e = s.echo, g = s.by_tone && s.by_tone.gap;
  let text = `coverage ${s.num_elites}/${n}, QD score ${num(s.qd_score, 3)} ` +
    `(offset ${s.offset}), best ${num(s.best, 3)}, ${s.candidates} candidates ` +
    `(${s.invalid} invalid)`;
  if (e) text += `; instruction echoes: ${e.elites} of ${s.num_elites} elites, ` +
    `${e.candidates} of ${s.candidates} candidates, mean fitness ` +
    `${pm(e.fitness_echo, false)} against ${pm(e.fitness_other, false)} for the rest`;
  if (g) text += `; happy − dark sentiment: fresh poems ${pm(g.init)}, rewrites ${pm(g.mutate)}`;
  document.getElementById("stats").textContent = text;
}

for (const input of document.querySelectorAll("input[name=view]"))
  input.addEventListener("change", () => {
    view = input.value;
    render();
    if (selected) select(selected);
  });
window.addEventListener("hashchange", openFromHash);
showStats();
render();
openFromHash();
</script>
</body>
</html>
"""
