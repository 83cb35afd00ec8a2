"""map.html (nanorlhf/tasks/qdaif_map.py) from a small mock run: the file is self-contained and safe
against poems that hold markup, and, in a real headless browser (Debian's chromium), it renders the
grid, its views and, on a click, the elite poem with its lineage. The browser tests skip when no
chromium binary is installed (CI has one)."""

import json
import random
import re
import shutil
import struct
import subprocess
import zlib
from decimal import ROUND_HALF_UP, Decimal

import pytest

import qdaif

GENRES = ["haiku", "sonnet", "ballad", "limerick", "hymn"]
NASTY = "</script><b>x</b> & <!-- 'single' \"double\" \u2028"  # model output is text, never markup


class MockMarkup(qdaif.Domain):
    """A poem is 'genre|tone|quality' then a line of markup. A rewrite keeps the parent's quality,
    raises it by 1 (cap 10) half the time and reaches the requested genre 80% of the time: lineages
    grow over the run. No poem is a reflective hymn."""
    fitness_range = None  # the colour scale is then the range seen: the best elite at its top

    def _write(self, target, quality, rng):
        genre = (target["genre"] if rng.random() < 0.8
                 else GENRES[(GENRES.index(target["genre"]) + 1) % 5])
        # never written: the page must show an empty cell
        if (genre, target["tone"]) == ("hymn", "reflective"):
            genre = "haiku"
        return f"{genre}|{target['tone']}|{quality}\n{NASTY} {rng.randrange(1000)}"

    def init_batch(self, targets, seed):
        rng = random.Random(seed)
        return [self._write(t, 1, rng) for t in targets]

    def mutate_batch(self, parents, targets, seed):
        rng = random.Random(seed)
        quality = lambda p: int(p["text"].split("|")[2].split("\n")[0])
        return [self._write(t, min(quality(p) + (rng.random() < 0.5), 10), rng)
                for p, t in zip(parents, targets)]

    def labels_batch(self, texts):
        return [dict(zip(("genre", "tone"), t.split("|")[:2])) for t in texts]

    def fitness_batch(self, texts, cells):
        return [float(t.split("|")[2].split("\n")[0]) for t in texts]


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory):
    """A short run with one cell left empty, so the page shows both kinds."""
    out = tmp_path_factory.mktemp("qdaif_html")
    cfg = qdaif.Config(out_dir=str(out), run="fake", iterations=160, init_iterations=16,
                       batch_size=8)
    archive, summary, run_dir = qdaif.run(cfg, MockMarkup())
    lines = (run_dir / "history.jsonl").read_text().split("\n")[:-1]
    history = {r["id"]: r for r in map(json.loads, lines)}
    return archive, summary, run_dir, history


def lineage(history, elite) -> list[dict]:
    chain, p = [], history.get(elite["parent"])
    while p is not None:
        chain.append(p)
        p = history.get(p["parent"])
    return chain


def dom_text(s: str) -> str:
    """How a DOM serialiser writes a text node: &, <, > (and U+00A0) escaped, quotes as they are."""
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


# --- the file itself, no browser ---

def test_markup_in_poems_is_escaped_and_the_embedded_json_parses_back(fake_run):
    archive, summary, run_dir, history = fake_run
    page = (run_dir / "map.html").read_text()
    assert "</script><b>x" not in page and "<b>" not in page and "<!--" not in page
    assert page.count("</script>") == 2  # the data block's end and the code's: a poem ended neither
    # nothing fetched: no CDN, no server
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    block = re.search(r'<script type="application/json" id="data">(.*?)</script>', page, re.S)
    block = block.group(1)
    data = json.loads(block)
    assert len(data["cells"]) == 25 and data["rows"] == GENRES
    for key, elite in archive.elites.items():
        cell = data["cells"]["/".join(key)]
        assert cell["id"] == elite["id"] and cell["elite"] == elite["fitness"]
        # every elite and each of its ancestors, text intact
        for p in [elite, *lineage(history, elite)]:
            assert data["poems"][str(p["id"])]["text"] == p["text"] and NASTY in p["text"]
    assert data["summary"]["cells"] == summary["cells"]


def test_embed_json_round_trips_anything():
    from nanorlhf.tasks.qdaif_map import embed_json
    value = {"a</script>": ["<!--", "&amp;", "\u2028\u2029", "]]>", 1.5, None]}
    text = embed_json(value)
    assert "<" not in text and ">" not in text and "&" not in text
    assert json.loads(text) == value


# --- in a real browser ---

def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if path := shutil.which(name):
            return path
    pytest.skip("no chromium binary on PATH (Debian: apt-get install chromium); CI installs it")


def browse(tmp_path, url: str, *args: str) -> subprocess.CompletedProcess:
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-extensions",
           f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1100,900",
           "--virtual-time-budget=5000",
           *args, url]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def cells(dom: str) -> dict[str, tuple[str, str]]:
    """data-cell -> (class, inner HTML) for every rendered heatmap cell."""
    found = re.findall(r'<td class="([^"]*)" data-cell="([^"]*)"[^>]*>(.*?)</td>', dom, re.S)
    return {key: (cls, inner) for cls, key, inner in found}


def to_fixed(x: float | None) -> str | None:
    """JavaScript's x.toFixed(2): the double's exact value rounded half up (Python's format rounds
    half to even)."""
    return None if x is None else str(Decimal(x).quantize(Decimal("0.01"), ROUND_HALF_UP))


def png_pixels(path) -> tuple[int, int, list[bytes]]:
    """Decode an 8-bit RGB or RGBA, non-interlaced PNG (what chromium writes) -> (width, height,
    rows of RGB)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body, pos = data[pos + 8:pos + 8 + n], pos + 12 + n
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
    width, height, depth, colour, _, _, interlace = header
    assert depth == 8 and colour in (2, 6) and interlace == 0, header
    bpp, raw = 3 if colour == 2 else 4, zlib.decompress(idat)
    stride, prev, rows = width * bpp, bytearray(width * bpp), []
    for y in range(height):
        start = y * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1:start + 1 + stride])
        for i in range(stride):  # undo the PNG filter of this scanline (spec section 9)
            a, b = line[i - bpp] if i >= bpp else 0, prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            if kind == 1:
                line[i] = (line[i] + a) & 255
            elif kind == 2:
                line[i] = (line[i] + b) & 255
            elif kind == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line) if bpp == 3 else bytes(v for i, v in enumerate(line) if i % 4 != 3))
        prev = line
    return width, height, rows


def test_screenshot_shows_the_heatmap(fake_run, tmp_path):
    _, summary, run_dir, _ = fake_run
    shot = tmp_path / "map.png"
    browse(tmp_path, (run_dir / "map.html").as_uri(), f"--screenshot={shot}")
    width, height, rows = png_pixels(shot)
    assert (width, height) == (1100, 900)
    colours = {row[i:i + 3] for row in rows for i in range(0, len(row), 3)}
    assert len(colours) > 20  # not blank: text, the grid's colours, the curve
    # the page, an empty cell
    assert bytes((255, 255, 255)) in colours and bytes((0xd0, 0xd0, 0xd0)) in colours
    # the best elite, at the top of the scale: viridis' yellow
    assert bytes((253, 231, 37)) in colours


def test_every_cell_renders_with_its_value_in_each_view(fake_run, tmp_path):
    _, summary, run_dir, _ = fake_run
    url = (run_dir / "map.html").as_uri()
    views = {"elite": lambda c: to_fixed(c["elite"]), "mean": lambda c: to_fixed(c["mean"]),
             "count": lambda c: str(c["count"]) if c["count"] else None}
    for view, shown in views.items():
        got = cells(browse(tmp_path, f"{url}#view={view}", "--dump-dom").stdout)
        assert set(got) == set(summary["cells"]) and len(got) == 25
        for key, cell in summary["cells"].items():
            cls, inner = got[key]
            if shown(cell) is None:
                assert "empty" in cls.split()
            else:
                assert ("empty" not in cls.split()
                        and f'<span class="value">{shown(cell)}</span>' in inner), (view, key)
    assert sum(c["elite"] is None for c in summary["cells"].values()) > 0  # both kinds were checked


def test_a_click_on_a_cell_shows_its_poem_and_lineage(fake_run, tmp_path):
    archive, summary, run_dir, history = fake_run
    key, elite = max(archive.elites.items(), key=lambda kv: len(lineage(history, kv[1])))
    chain, name = lineage(history, elite), "/".join(key)
    assert len(chain) >= 2  # a lineage worth walking: parent and grandparent at least
    dom = browse(tmp_path, f"{(run_dir / 'map.html').as_uri()}#cell={name}", "--dump-dom").stdout
    assert "selected" in cells(dom)[name][0].split()  # the hash clicked that very cell
    detail = dom[dom.index('<div id="detail"'):dom.index('<div id="curve"')]
    assert f'<h2 id="detail-cell">{name}</h2>' in detail
    assert f'<pre id="poem" class="poem">{dom_text(elite["text"])}</pre>' in detail
    assert f"fitness {elite['fitness']:.3f}" in detail
    items = re.findall(r'<li class="ancestor"><div class="meta">(.*?)</div>'
                       r'<pre class="poem">(.*?)</pre></li>', detail, re.S)
    assert len(items) == len(chain)
    for (meta, text), p in zip(items, chain):  # parent first, back to the fresh poem
        assert meta.startswith(f"#{p['id']} ") and text == dom_text(p["text"])
        assert ("fresh poem" in meta) == (p["op"] == "init")
    assert chain[-1]["op"] == "init" and "<b>" not in dom  # the markup in the poems stayed text
