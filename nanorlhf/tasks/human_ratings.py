"""Real human sentiment ratings, offline: the VADER paper's ground truth as preference pairs for an
RM.

The source distribution of vaderSentiment 3.3.2 on PyPI carries
additional_resources/hutto_ICWSM_2014.tar.gz (Hutto & Gilbert, ICWSM 2014; MIT licence): 23,703
short texts in four sets, each rated on [-4, 4] by ~20 independent raters. We fetch the sdist once,
check its SHA-256, and keep the eight rating files in the cache.

Rules, each a choice a reader could make differently:
- Text: decoded as UTF-8 (a line that is not valid UTF-8 is read as Windows-1252, the files being
  Windows CRLF files; bytes undefined there become U+FFFD), HTML entities unescaped once (the tweets
  carry Twitter's "&amp;", "&lt;3"), outer whitespace stripped.
- mean: the published *_GroundTruth.txt mean (what VADER's r = 0.881 was measured against). For 199
  tweets it differs from the mean of the per-rater file (which holds more raters); we keep the
  published one. se: sample standard deviation of the individual ratings / sqrt(n_raters).
- Split by text (not by id: 84 texts appear under two ids), by a seeded hash, so no text is in two
  splits; a whole source (default NYT editorials) is held out to measure transfer.
- Pairs: within one source and one split, "A is more positive than B" when the raters' means differ
  by more than z combined standard errors, |m_a - m_b| > z * sqrt(se_a^2 + se_b^2): with z = 1.96
  the raters' preference is significant at 5% (two-sided). Pairs between identical texts are never
  made.
"""

import hashlib
import html
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np

from nanorlhf.atomic import atomic_dir
from nanorlhf.embedded import cache_dir
from nanorlhf.errors import UserError

SDIST = "vaderSentiment==3.3.2"
SDIST_NAME = "vaderSentiment-3.3.2.tar.gz"
SDIST_BYTES = 2_466_783
SDIST_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
INNER_TAR = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
DATA_NAME = "hutto_ICWSM_2014"
SOURCES = ("tweets", "movieReviewSnippets", "nytEditorialSnippets", "amazonReviewSnippets")
FILES = tuple(f"{s}_{kind}.txt" for s in SOURCES for kind in ("GroundTruth", "anonDataRatings"))
SPLITS = ("train", "validation", "test", "heldout_source")
PIP_COMMAND = f"pip download --no-binary :all: --no-deps {SDIST} -d DIR"


def download_sdist(dest: Path) -> Path:
    """pip-download the sdist into `dest` (pip checks PyPI's hash in transit; we check ours
    afterwards)."""
    pip = [sys.executable, "-m", "pip", "download", "-q", "--no-binary", ":all:", "--no-deps",
           SDIST, "-d", str(dest)]
    try:
        subprocess.run(pip, check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        raise UserError(f"could not download {SDIST} ({type(e).__name__}); run by hand: "
                        f"{PIP_COMMAND} and pass the .tar.gz, or set NANORLHF_CACHE") from None
    return dest / SDIST_NAME


def verify_sdist(path: Path) -> None:
    """Refuse any file but the exact published sdist: size first (cheap), then SHA-256."""
    size = path.stat().st_size if path.is_file() else -1
    digest = hashlib.sha256(path.read_bytes()).hexdigest() if size == SDIST_BYTES else None
    if digest != SDIST_SHA256:
        got = f"SHA-256 {digest}" if digest else f"{size} bytes"
        raise UserError(f"{path}: {got}, expected {SDIST_BYTES} bytes with SHA-256 {SDIST_SHA256}; "
                        "refusing a tampered or corrupt archive")


def _member(tar: tarfile.TarFile, name: str):
    """The open file of member `name`, which must be a regular file (KeyError otherwise)."""
    member = tar.getmember(name)
    if not member.isfile():
        raise KeyError(f"{name} is not a regular file")
    return tar.extractfile(member)


def extract_ratings(sdist: Path, out: Path) -> None:
    """Copy the eight rating files from sdist -> inner tar.gz -> hutto_ICWSM_2014/ into `out`. Only
    these named regular-file members are read, and written under names we choose: a member's own
    path (absolute, "..", a link) is never used, so nothing can land outside `out`."""
    try:
        with tarfile.open(sdist, "r:gz") as outer, _member(outer, INNER_TAR) as inner_file:
            with tarfile.open(fileobj=inner_file, mode="r:gz") as inner:
                for name in FILES:
                    member = _member(inner, f"{DATA_NAME}/{name}")
                    with member as src, open(out / name, "wb") as dst:
                        shutil.copyfileobj(src, dst)
    except (KeyError, tarfile.TarError, OSError, EOFError) as e:
        raise UserError(f"{sdist}: not the expected vaderSentiment layout ({e})") from None


def ensure_ratings(sdist: str | Path | None = None) -> Path:
    """The cached folder holding the eight rating files, fetched (or taken from `sdist`) and checked
    on first use. Atomic: a failure anywhere leaves no folder and no download behind."""
    out = cache_dir() / DATA_NAME
    if all((out / f).is_file() for f in FILES):
        return out
    print(f"nanorlhf: fetching the human ratings of {SDIST} into {out} (one time, 2.5 MB)",
          file=sys.stderr)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f"sdist.tmp-{os.getpid()}"
    try:
        tmp.mkdir()
        path = Path(sdist) if sdist is not None else download_sdist(tmp)
        verify_sdist(path)
        with atomic_dir(out) as d:
            extract_ratings(path, d)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def decode_line(raw: bytes) -> str:
    """UTF-8, else Windows-1252 (undefined bytes -> U+FFFD); a UTF-8 byte-order mark is dropped."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        line = raw.decode("cp1252", errors="replace")
    return line.removeprefix("\ufeff").rstrip("\r\n")


def clean_text(text: str) -> str:
    """HTML entities unescaped exactly once ("&amp;lt;" -> "&lt;"), outer whitespace stripped."""
    return html.unescape(text).strip()


def _lines(path: Path):
    """(where, fields) for each non-blank line, fields split on tabs; where = "file:line" for
    errors."""
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    for n, raw in enumerate(path.read_bytes().split(b"\n"), 1):
        if (line := decode_line(raw)).strip():
            yield f"{path}:{n}", line.split("\t")


def _ratings(fields: list[str]) -> np.ndarray | None:
    """The individual ratings of an anonDataRatings line (id, mean, sd, [r1, r2, ...]), None if
    malformed."""
    try:
        r = json.loads(fields[3]) if len(fields) == 4 and fields[0] else None
    except ValueError:
        return None
    ok = (isinstance(r, list) and len(r) >= 2
          and all(type(x) in (int, float) and -4 <= x <= 4 for x in r))
    return np.asarray(r, dtype=np.float64) if ok else None


def _mean(fields: list[str]) -> float | None:
    """The mean of a GroundTruth line (id, mean, text), None if malformed."""
    try:
        mean = float(fields[1]) if len(fields) >= 3 and fields[0] else math.nan
    except ValueError:
        return None
    return mean if -4 <= mean <= 4 else None  # a NaN fails this test too


def read_source(folder: str | Path, source: str) -> list[dict]:
    """One set -> [{source, id, mean, text, n_raters, se}] in file order; a malformed line ->
    UserError."""
    folder = Path(folder)
    ratings = {}  # id -> individual ratings
    for where, f in _lines(folder / f"{source}_anonDataRatings.txt"):
        if (r := _ratings(f)) is None or f[0] in ratings:
            raise UserError(f"{where}: expected a new id<TAB>mean<TAB>sd<TAB>[two or more ratings "
                            "in -4..4]")
        ratings[f[0]] = r
    records, seen = [], set()
    for where, f in _lines(folder / f"{source}_GroundTruth.txt"):
        # a tab inside the text is kept (none in the real files)
        text = clean_text("\t".join(f[2:]))
        if (mean := _mean(f)) is None or not text or f[0] in seen:
            raise UserError(f"{where}: expected a new id<TAB>mean in -4..4<TAB>non-empty text")
        if f[0] not in ratings:
            raise UserError(f"{where}: id {f[0]!r} has no individual ratings in "
                            f"{source}_anonDataRatings.txt")
        seen.add(f[0])
        r = ratings[f[0]]
        se = float(r.std(ddof=1) / math.sqrt(len(r)))
        records.append(dict(source=source, id=f[0], mean=mean, text=text, n_raters=len(r), se=se))
    return records


def split_of(text: str, seed: int, val_frac: float, test_frac: float) -> str:
    """train / validation / test from a seeded hash of the text: the same text always lands
    together."""
    u = int.from_bytes(hashlib.sha256(f"{seed}\0{text}".encode()).digest()[:8], "big") / 2**64
    return "validation" if u < val_frac else "test" if u < val_frac + test_frac else "train"


def split_records(records: list[dict], heldout: tuple[str, ...] = ("nytEditorialSnippets",),
                  seed: int = 0, val_frac: float = 0.1,
                  test_frac: float = 0.1) -> dict[str, list[dict]]:
    """{split: records} for SPLITS. Sources in `heldout` go whole to "heldout_source", and so does
    any text they share with another source; the rest is split by split_of."""
    held_texts = {r["text"] for r in records if r["source"] in heldout}
    out = {s: [] for s in SPLITS}
    for r in records:
        held = r["source"] in heldout or r["text"] in held_texts
        out["heldout_source" if held else split_of(r["text"], seed, val_frac, test_frac)].append(r)
    return out


def pair_index(k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unordered pair number k -> (i, j), i < j, enumerating (0,1), (0,2), (1,2), (0,3), ... so that
    sampling k without replacement samples distinct pairs without listing all m(m-1)/2 of them."""
    # j is the largest integer with j(j-1)/2 <= k. sqrt is correctly rounded, so for 1 + 8k < 2**52
    # (k < 5.6e14, m < 3e7 texts) sqrt(n*n - 1) stays below n and the floor is exact.
    j = np.floor((1 + np.sqrt(1 + 8 * k.astype(np.float64))) / 2).astype(np.int64)
    return k - j * (j - 1) // 2, j


def _source_pairs(recs: list[dict], n: int, z: float, rng: np.random.Generator) -> list[dict]:
    if n == 0:
        return []
    m = len(recs)
    total = m * (m - 1) // 2
    mean = np.array([r["mean"] for r in recs])
    se = np.array([r["se"] for r in recs])
    size = min(total, 2 * n + 16)  # most candidate pairs qualify: usually one draw suffices
    while True:
        i, j = pair_index(rng.choice(total, size=size, replace=False))
        ok = np.abs(mean[i] - mean[j]) > z * np.sqrt(se[i] ** 2 + se[j] ** 2)
        ok &= np.array([recs[a]["text"] != recs[b]["text"] for a, b in zip(i, j)], dtype=bool)
        if ok.sum() >= n or size == total:
            break
        size = min(total, 2 * size)
    if ok.sum() < n:
        raise UserError(f"only {ok.sum()} pairs of {recs[0]['source'] if recs else 'no'} texts "
                        f"pass the rule (z={z}); asked for {n}")
    out = []
    for a, b in zip(i[ok][:n], j[ok][:n]):
        hi, lo = (recs[a], recs[b]) if mean[a] > mean[b] else (recs[b], recs[a])
        out.append(dict(prompt="", chosen=hi["text"], rejected=lo["text"],
                        margin=hi["mean"] - lo["mean"], source=hi["source"]))
    return out


def preference_pairs(records: list[dict], n: int, seed: int = 0, z: float = 1.96) -> list[dict]:
    """n distinct pairs {prompt: "", chosen, rejected, margin = mean_chosen - mean_rejected > 0,
    source}, each within one source (pass one split's records). The n are shared out over the
    sources in proportion to their texts (largest remainder), drawn uniformly from each source's
    qualifying pairs with a seeded RNG, then shuffled together."""
    rng = np.random.default_rng(seed)
    by_source = {}
    for r in records:
        by_source.setdefault(r["source"], []).append(r)
    names = sorted(by_source)
    share = n * np.array([len(by_source[s]) for s in names]) / max(len(records), 1)
    counts = np.floor(share).astype(np.int64)  # largest remainders get the leftover pairs
    counts[np.argsort(counts - share, kind="stable")[: n - counts.sum()]] += 1
    pairs = [p for s, c in zip(names, counts) for p in _source_pairs(by_source[s], int(c), z, rng)]
    return [pairs[k] for k in rng.permutation(len(pairs))]


def load_splits(seed: int = 0,
                heldout: tuple[str, ...] = ("nytEditorialSnippets",)) -> dict[str, list[dict]]:
    """All four sets, fetched on first use, split by split_records (10% validation, 10% test)."""
    folder = ensure_ratings()
    return split_records([r for s in SOURCES for r in read_source(folder, s)], heldout, seed)
