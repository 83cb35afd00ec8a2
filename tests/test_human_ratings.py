"""tasks/human_ratings.py offline: a tiny fake sdist with the real layout, pairs and splits checked
by hand."""

import hashlib
import io
import itertools
import math
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest

from nanorlhf.tasks import human_ratings as hr
from nanorlhf.errors import UserError


def rec(rid: str, mean: float, se: float, source: str = "tweets", text: str | None = None) -> dict:
    return dict(source=source, id=rid, mean=mean, text=text or f"text {source} {rid}", n_raters=20,
                se=se)


def tar_gz(members: dict[str, bytes], extra: list[tarfile.TarInfo] = ()) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        for info in extra:
            t.addfile(info)
    return buf.getvalue()


def fake_sdist(path: Path, evil: bool = False) -> Path:
    """vaderSentiment-3.3.2.tar.gz -> additional_resources/hutto_ICWSM_2014.tar.gz ->
    hutto_ICWSM_2014/*.txt, two texts per source. With evil=True the inner tar also holds "../" and
    absolute members."""
    files = {}
    for s in hr.SOURCES:
        files[f"{hr.DATA_NAME}/{s}_GroundTruth.txt"] = b"1\t1.5\tgood &amp; kind\r\n2\t-2\tbad\r\n"
        files[f"{hr.DATA_NAME}/{s}_anonDataRatings.txt"] = (b"1\t1.5\t0.5\t[1, 2]\r\n"
                                                             b"2\t-2\t0\t[-2, -2]\r\n")
    if evil:
        files |= {"../evil.txt": b"x", str(path.parent.resolve() / "abs_evil.txt"): b"x"}
    inner = tar_gz(files)
    path.write_bytes(tar_gz({hr.INNER_TAR: inner, "vaderSentiment-3.3.2/setup.py": b""}))
    return path


@pytest.fixture
def fake(tmp_path, monkeypatch) -> Path:
    """A fake sdist the module accepts (its size and SHA-256 patched in); downloads copy it; cache
    in tmp."""
    sdist = fake_sdist(tmp_path / "fake.tar.gz")
    monkeypatch.setattr(hr, "SDIST_BYTES", sdist.stat().st_size)
    monkeypatch.setattr(hr, "SDIST_SHA256", hashlib.sha256(sdist.read_bytes()).hexdigest())
    monkeypatch.setattr(hr, "download_sdist",
                        lambda dest: Path(shutil.copy(sdist, dest / hr.SDIST_NAME)))
    monkeypatch.setenv("NANORLHF_CACHE", str(tmp_path / "cache"))
    return sdist


def test_fetch_extracts_once_and_reads(fake, tmp_path, monkeypatch):
    out = hr.ensure_ratings()
    assert sorted(p.name for p in out.iterdir()) == sorted(hr.FILES)
    # no download left
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [hr.DATA_NAME]
    monkeypatch.setattr(hr, "download_sdist", lambda dest: pytest.fail("fetched twice"))
    assert hr.ensure_ratings() == out
    r = hr.read_source(out, "tweets")
    assert [(x["id"], x["mean"], x["text"], x["n_raters"]) for x in r] == [
        ("1", 1.5, "good & kind", 2), ("2", -2.0, "bad", 2)]
    # sd of [1, 2], ddof=1
    assert r[0]["se"] == pytest.approx(math.sqrt(0.5) / math.sqrt(2), rel=1e-12)
    assert r[1]["se"] == 0.0


def test_tampered_archive_refused_nothing_left(fake, tmp_path):
    data = bytearray(fake.read_bytes())
    data[len(data) // 2] ^= 1  # same size, one bit flipped
    fake.write_bytes(bytes(data))
    with pytest.raises(UserError, match="SHA-256") as e:
        hr.ensure_ratings()
    assert "\n" not in str(e.value) and "tampered" in str(e.value)
    assert list((tmp_path / "cache").iterdir()) == []
    fake.write_bytes(bytes(data[:-1]))  # wrong size: refused before hashing
    with pytest.raises(UserError, match="bytes"):
        hr.ensure_ratings(fake)
    assert list((tmp_path / "cache").iterdir()) == []


def test_unsafe_members_never_written(fake, tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    evil = fake_sdist(tmp_path / "sub" / "evil.tar.gz", evil=True)
    monkeypatch.setattr(hr, "SDIST_BYTES", evil.stat().st_size)
    monkeypatch.setattr(hr, "SDIST_SHA256", hashlib.sha256(evil.read_bytes()).hexdigest())
    out = hr.ensure_ratings(evil)
    assert sorted(p.name for p in out.iterdir()) == sorted(hr.FILES)
    assert not list(tmp_path.rglob("*evil.txt"))


def test_link_member_is_refused(tmp_path):
    link = tarfile.TarInfo(f"{hr.DATA_NAME}/tweets_GroundTruth.txt")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    sdist = tmp_path / "s.tar.gz"
    sdist.write_bytes(tar_gz({hr.INNER_TAR: tar_gz({}, [link])}))
    (tmp_path / "out").mkdir()
    with pytest.raises(UserError, match="not a regular file"):
        hr.extract_ratings(sdist, tmp_path / "out")


def test_offline_names_the_command(tmp_path, monkeypatch):
    def no_network(*a, **k):
        raise subprocess.CalledProcessError(1, a[0])
    monkeypatch.setattr(hr.subprocess, "run", no_network)
    with pytest.raises(UserError) as e:
        hr.download_sdist(tmp_path)
    assert "pip download --no-binary :all: --no-deps vaderSentiment==3.3.2" in str(e.value)


def test_text_rules(tmp_path):
    gt = (b"\xef\xbb\xbfa\t1\tus &amp; them &lt;3\r\n"  # BOM, entities, CRLF
          b"b\t0.5\tcaf\xe9 \x93ok\x94\r\n"  # not UTF-8: Windows-1252
          # UTF-8; unescaped once; trailing blank line
          b"c\t-1\tM\xc3\xbcnch &amp;amp; co \r\n\r\n")
    (tmp_path / "tweets_GroundTruth.txt").write_bytes(gt)
    (tmp_path / "tweets_anonDataRatings.txt").write_bytes(
        b"a\t1\t0\t[1,1]\nb\t0\t0\t[0,1]\nc\t0\t0\t[-1,-1]\n")
    texts = [r["text"] for r in hr.read_source(tmp_path, "tweets")]
    assert texts == ["us & them <3", "caf\u00e9 \u201cok\u201d", "M\u00fcnch &amp; co"]
    assert hr.decode_line(b"\x81x") == "\ufffdx"  # a byte undefined in Windows-1252


@pytest.mark.parametrize("gt, anon, bad", [
    ("a\t1\tok\nb\tone\tx\n", "a\t1\t0\t[1,1]\nb\t1\t0\t[1,1]\n", "GroundTruth.txt:2"),
    # out of range
    ("a\t1\tok\n\nb\t5\tx\n", "a\t1\t0\t[1,1]\nb\t1\t0\t[1,1]\n", "GroundTruth.txt:3"),
    ("a\t1\tok\nb\t1\n", "a\t1\t0\t[1,1]\nb\t1\t0\t[1,1]\n", "GroundTruth.txt:2"),  # no text
    ("a\t1\tok\na\t1\tx\n", "a\t1\t0\t[1,1]\n", "GroundTruth.txt:2"),  # duplicate id
    ("a\t1\tok\nb\t1\tx\n", "a\t1\t0\t[1,1]\n", "GroundTruth.txt:2: id 'b' has no"),
    ("a\t1\tok\n", "a\t1\t0\t[1,1]\nb\t1\t0\t[1,\n", "anonDataRatings.txt:2"),
    ("a\t1\tok\n", "a\t1\t0\t[1]\n", "anonDataRatings.txt:1"),  # one rating: no standard error
    ("a\t1\tok\n", "a\t1\t0\t[1,9]\n", "anonDataRatings.txt:1"),
])
def test_malformed_line_names_file_line(tmp_path, gt, anon, bad):
    (tmp_path / "tweets_GroundTruth.txt").write_text(gt)
    (tmp_path / "tweets_anonDataRatings.txt").write_text(anon)
    with pytest.raises(UserError) as e:
        hr.read_source(tmp_path, "tweets")
    assert f"{tmp_path}/tweets_{bad}" in str(e.value) and "\n" not in str(e.value)


def test_pair_index_enumerates_every_pair_once():
    i, j = hr.pair_index(np.arange(60 * 59 // 2))
    assert sorted(zip(i.tolist(), j.tolist())) == list(itertools.combinations(range(60), 2))
    t = 10**7  # near perfect squares of 1 + 8k, where a float sqrt may round across the boundary
    k = np.array([t * (t - 1) // 2 - 1, t * (t - 1) // 2, t * (t - 1) // 2 + 1])
    i, j = hr.pair_index(k)
    assert list(zip(i.tolist(), j.tolist())) == [(t - 2, t - 1), (0, t), (1, t)]


# By hand, z = 1.96: A-B |0.5| > 1.96*sqrt(0.01+0.01)=0.277 yes;
# A-C 0.1 > 1.96*sqrt(0.01+0.09)=0.620 no; B-C 0.4 > 0.620 no;
# A-D 3.0, B-D 2.5, C-D 2.9 all > 1.96*sqrt(0.05 or 0.13)=0.707 yes. Four pairs.
HAND = [rec("A", 2.0, 0.1), rec("B", 1.5, 0.1), rec("C", 1.9, 0.3), rec("D", -1.0, 0.2)]


def test_pairs_by_hand():
    pairs = hr.preference_pairs(HAND, 4, seed=3)
    got = sorted((p["chosen"][-1], p["rejected"][-1], p["margin"]) for p in pairs)
    expect = [("A", "B", 0.5), ("A", "D", 3.0), ("B", "D", 2.5), ("C", "D", 2.9)]
    assert [g[:2] for g in got] == [e[:2] for e in expect]
    assert [g[2] for g in got] == pytest.approx([e[2] for e in expect], abs=1e-12)
    assert all(p["prompt"] == "" and p["source"] == "tweets" for p in pairs)
    with pytest.raises(UserError, match="only 4 pairs"):
        hr.preference_pairs(HAND, 5)
    assert len(hr.preference_pairs(HAND, 6, z=0.0)) == 6  # z = 0: every pair with different means


def test_pairs_stay_within_a_source_and_skip_identical_texts():
    other = [rec("F", 3.0, 0.1, "amazon"), rec("G", -3.0, 0.1, "amazon")]
    # shares 4/6 and 2/6 of 3: two tweet pairs, one amazon
    pairs = hr.preference_pairs(HAND + other, 3)
    assert sorted(p["source"] for p in pairs) == ["amazon", "tweets", "tweets"]
    assert all(p["chosen"].split()[1] == p["rejected"].split()[1] == p["source"] for p in pairs)
    amazon = [p for p in pairs if p["source"] == "amazon"][0]
    assert (amazon["chosen"], amazon["rejected"], amazon["margin"]) == ("text amazon F",
                                                                        "text amazon G", 6.0)
    same = [rec("X", 3.0, 0.0, text="same"), rec("Y", -3.0, 0.0, text="same")]
    with pytest.raises(UserError, match="only 0 pairs"):
        hr.preference_pairs(same, 1)


def test_pairs_seeded_distinct_and_qualifying():
    rng = np.random.default_rng(0)
    recs = [rec(str(k), float(rng.uniform(-3, 3)), float(rng.uniform(0.05, 0.4)))
            for k in range(200)]
    a, b = hr.preference_pairs(recs, 500, seed=1), hr.preference_pairs(recs, 500, seed=1)
    assert a == b and a != hr.preference_pairs(recs, 500, seed=2)
    assert len({(p["chosen"], p["rejected"]) for p in a}) == 500
    by_text = {r["text"]: r for r in recs}
    for p in a:
        c, r = by_text[p["chosen"]], by_text[p["rejected"]]
        assert c["mean"] - r["mean"] == p["margin"] > 1.96 * math.hypot(c["se"], r["se"])


def test_split_by_text_deterministic_with_heldout_source():
    recs = [rec(f"{s}{k}", 0.0, 0.1, s, text=f"{s} text {k % 250}")  # each text under two ids
            for s in ("tweets", "movies", "amazon", "nyt") for k in range(500)]
    recs.append(rec("shared", 0.0, 0.1, "tweets", text="nyt text 7"))  # also in the held-out source
    splits = hr.split_records(recs, heldout=("nyt",), seed=0)
    assert list(splits) == list(hr.SPLITS) and sum(map(len, splits.values())) == len(recs)
    where = {}
    for name, rs in splits.items():
        for r in rs:
            assert where.setdefault(r["text"], name) == name  # no text in two splits
    assert {r["source"] for r in splits["heldout_source"]} == {"nyt", "tweets"}
    assert len(splits["heldout_source"]) == 501
    assert all(r["source"] != "nyt" for s in ("train", "validation", "test") for r in splits[s])
    assert splits == hr.split_records(recs, heldout=("nyt",), seed=0)
    assert splits != hr.split_records(recs, heldout=("nyt",), seed=1)
    # 750 distinct texts outside nyt, 10% each to validation/test: binomial
    # sd = sqrt(750*0.1*0.9) = 8.2
    for name in ("validation", "test"):
        assert abs(len({r["text"] for r in splits[name]}) - 75) < 5 * 8.2


@pytest.mark.slow
def test_checksum_constant_matches_the_real_sdist(tmp_path):
    """The real file from PyPI: size and SHA-256 match the constants, and the four sets have the
    published sizes (the README's counts; the notes' 4,199... count newlines, the last line has
    none)."""
    try:
        sdist = hr.download_sdist(tmp_path)
    except UserError as e:
        pytest.skip(f"PyPI unreachable: {e}")
    hr.verify_sdist(sdist)
    assert sdist.stat().st_size == 2_466_783
    hr.extract_ratings(sdist, tmp_path)
    sizes = {s: len(hr.read_source(tmp_path, s)) for s in hr.SOURCES}
    assert sizes == {"tweets": 4200, "movieReviewSnippets": 10605, "nytEditorialSnippets": 5190,
                     "amazonReviewSnippets": 3708}
