"""Line charts as plain SVG text: training curves without a plotting dependency."""

from html import escape
from pathlib import Path

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"]
Series = dict[str, list[tuple[float, float]]]  # legend name -> [(x, y), ...]


def _ticks(lo: float, hi: float, n: int = 4) -> list[float]:
    return [lo + (hi - lo) * i / n for i in range(n + 1)]


def _panel(title: str, series: Series, top: float, width: int, height: int, xlabel: str) -> list[str]:
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
           f'<rect x="{left}" y="{top + pad}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>']
    for y in _ticks(y0, y1):
        out.append(f'<text x="{left - 6}" y="{sy(y) + 4:.1f}" text-anchor="end">{y:.3g}</text>')
        out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" stroke="#eee"/>')
    for x in _ticks(x0, x1):
        out.append(f'<text x="{sx(x):.1f}" y="{top + pad + plot_h + 14}" text-anchor="middle">{x:.3g}</text>')
    out.append(f'<text x="{left + plot_w / 2}" y="{top + height}" text-anchor="middle">{escape(xlabel)}</text>')
    for i, (name, pts) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        out.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="1.5"/>')
        out.append(f'<text x="{left + plot_w - 4}" y="{top + pad + 14 + 14 * i}" text-anchor="end" fill="{color}">{escape(name)}</text>')
    return out


def line_plots(panels: list[tuple[str, Series]], path: str | Path, xlabel: str = "step",
               width: int = 640, panel_height: int = 220) -> Path:
    """Write one SVG with the panels stacked vertically; each panel is (title, {name: [(x, y)]})."""
    body = []
    for i, (title, series) in enumerate(panels):
        body += _panel(title, series, i * (panel_height + 10), width, panel_height, xlabel)
    height = len(panels) * (panel_height + 10) + 10
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="11">\n<rect width="100%" height="100%" fill="white"/>\n'
           + "\n".join(body) + "\n</svg>\n")
    Path(path).write_text(svg)
    return Path(path)
