"""Line charts and heatmaps as plain SVG text: training curves and archives without a plotting
dependency."""

from html import escape
from pathlib import Path

from nanorlhf.atomic import atomic_write_text

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"]
Series = dict[str, list[tuple[float, float]]]  # legend name -> [(x, y), ...]
FIT = " fit"  # a series named "X fit" is a fitted curve of series X: drawn dashed in X's colour


def _ticks(lo: float, hi: float, n: int = 4) -> list[float]:
    return [lo + (hi - lo) * i / n for i in range(n + 1)]


def _panel(title: str, series: Series, top: float, width: int, height: int, xlabel: str,
           markers: bool = False) -> list[str]:
    left, right, pad = 60, 20, 28
    points = [p for pts in series.values() for p in pts]
    if not points:
        return [f'<text x="{left}" y="{top + 20}">{escape(title)}: no data</text>']
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1
    plot_w, plot_h = width - left - right, height - 2 * pad

    def sx(x):
        return left + (x - x0) / (x1 - x0) * plot_w

    def sy(y):
        return top + pad + (1 - (y - y0) / (y1 - y0)) * plot_h

    out = [f'<text x="{left}" y="{top + 16}" font-weight="bold">{escape(title)}</text>',
           f'<rect x="{left}" y="{top + pad}" width="{plot_w}" height="{plot_h}" fill="none" '
           'stroke="#999"/>']
    for y in _ticks(y0, y1):
        out.append(f'<text x="{left - 6}" y="{sy(y) + 4:.1f}" text-anchor="end">{y:.3g}</text>')
        out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" '
                   'stroke="#eee"/>')
    for x in _ticks(x0, x1):
        out.append(f'<text x="{sx(x):.1f}" y="{top + pad + plot_h + 14}" '
                   f'text-anchor="middle">{x:.3g}</text>')
    out.append(f'<text x="{left + plot_w / 2}" y="{top + height}" '
               f'text-anchor="middle">{escape(xlabel)}</text>')
    named = [n for n in series if not (n.endswith(FIT) and n[:-len(FIT)] in series)]
    for name, pts in series.items():
        fit = name not in named  # "X fit": dashed, in X's colour, no legend line of its own
        i = named.index(name[:-len(FIT)] if fit else name)
        color = COLORS[i % len(COLORS)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        dash = ' stroke-dasharray="5 3"' if fit else ""
        out.append(f'<polyline points="{path}" fill="none" stroke="{color}" '
                   f'stroke-width="1.5"{dash}/>')
        if markers and not fit:
            out += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{color}"/>'
                    for x, y in pts]
        if not fit:
            out.append(f'<text x="{left + plot_w - 4}" y="{top + pad + 14 + 14 * i}" '
                       f'text-anchor="end" fill="{color}">{escape(name)}</text>')
    return out


def line_plots_svg(panels: list[tuple[str, Series]], xlabel: str = "step", width: int = 640,
                   panel_height: int = 220, markers: bool = False) -> str:
    """One SVG document with the panels stacked vertically; each panel is (title, {name: [(x, y)]});
    `markers`: a dot on every measured point."""
    body = []
    for i, (title, series) in enumerate(panels):
        body += _panel(title, series, i * (panel_height + 10), width, panel_height, xlabel, markers)
    height = len(panels) * (panel_height + 10) + 10
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            'font-family="sans-serif" font-size="11">\n'
            '<rect width="100%" height="100%" fill="white"/>\n'
            + "\n".join(body) + "\n</svg>\n")


def line_plots(panels: list[tuple[str, Series]], path: str | Path, xlabel: str = "step",
               width: int = 640, panel_height: int = 220, markers: bool = False) -> Path:
    """Write line_plots_svg(...) to `path` (atomically: a crash never leaves half a plot)."""
    atomic_write_text(path, line_plots_svg(panels, xlabel, width, panel_height, markers))
    return Path(path)


# matplotlib's viridis at 0, 1/4, 1/2, 3/4, 1, interpolated linearly in between
VIRIDIS = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]
EMPTY = "#d0d0d0"


def _color(t: float) -> str:
    t = min(max(t, 0.0), 1.0) * (len(VIRIDIS) - 1)
    i = min(int(t), len(VIRIDIS) - 2)
    rgb = (round(a + (b - a) * (t - i)) for a, b in zip(VIRIDIS[i], VIRIDIS[i + 1]))
    return "#" + "".join(f"{c:02x}" for c in rgb)


def heatmap(rows: list[str], cols: list[str], values: list[list[float | None]], path: str | Path,
            title: str, vmin: float, vmax: float, row_label: str = "", col_label: str = "",
            cell_w: int = 84, cell_h: int = 40, fmt: str = ".2f") -> Path:
    """Write a heatmap: values[r][c] coloured on the fixed scale [vmin, vmax] (so maps of different
    runs compare), None drawn as an empty grey cell, each value printed in its cell as
    format(v, fmt)."""
    left, top = 20 + max([len(r) for r in rows] + [4]) * 7, 64
    width, height = left + cell_w * len(cols) + 110, top + cell_h * len(rows) + 20
    span = (vmax - vmin) or 1.0
    out = [f'<text x="{left}" y="18" font-weight="bold">{escape(title)}</text>',
           f'<text x="{left + cell_w * len(cols) / 2}" y="36" text-anchor="middle" '
           f'font-style="italic">{escape(col_label)}</text>',
           f'<text x="8" y="{top - 8}" font-style="italic">{escape(row_label)}</text>']
    for c, name in enumerate(cols):
        out.append(f'<text x="{left + (c + 0.5) * cell_w}" y="{top - 8}" '
                   f'text-anchor="middle">{escape(name)}</text>')
    for r, name in enumerate(rows):
        y = top + r * cell_h
        out.append(f'<text x="{left - 6}" y="{y + cell_h / 2 + 4}" '
                   f'text-anchor="end">{escape(name)}</text>')
        for c, v in enumerate(values[r]):
            x, t = left + c * cell_w, None if v is None else (v - vmin) / span
            out.append(f'<rect x="{x}" y="{y}" width="{cell_w}" height="{cell_h}" stroke="white" '
                       f'fill="{EMPTY if t is None else _color(t)}"/>')
            if v is not None:
                ink = "white" if t < 0.6 else "black"
                out.append(f'<text class="value" data-row="{escape(rows[r])}" '
                           f'data-col="{escape(cols[c])}" x="{x + cell_w / 2}" '
                           f'y="{y + cell_h / 2 + 4}" text-anchor="middle" '
                           f'fill="{ink}">{v:{fmt}}</text>')
    bar_x, bar_h = left + cell_w * len(cols) + 20, cell_h * len(rows)
    for i in range(20):  # the colour bar, vmax at the top
        out.append(f'<rect x="{bar_x}" y="{top + bar_h * i / 20:.1f}" width="14" '
                   f'height="{bar_h / 20 + 0.5:.1f}" fill="{_color(1 - (i + 0.5) / 20)}"/>')
    for t in (0.0, 0.5, 1.0):
        out.append(f'<text x="{bar_x + 18}" y="{top + bar_h * (1 - t) + 4:.1f}">'
                   f'{vmin + t * span:.3g}</text>')
    out.append(f'<rect x="{bar_x}" y="{top + bar_h + 6}" width="14" height="8" fill="{EMPTY}"/>'
               f'<text x="{bar_x + 18}" y="{top + bar_h + 14}">empty</text>')
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 10}" '
           'font-family="sans-serif" font-size="11">\n'
           '<rect width="100%" height="100%" fill="white"/>\n'
           + "\n".join(out) + "\n</svg>\n")
    atomic_write_text(path, svg)
    return Path(path)
