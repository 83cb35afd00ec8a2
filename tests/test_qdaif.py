"""qdaif.py: MAP-Elites invariants (shared/reference/qdaif.md §9.1) on mock domains with known
optima, the heatmaps against a planted reward table, bad input, and the LM-facing code on a tiny
random model."""

import json
import math
import random
import shutil
import xml.etree.ElementTree as ET

import pytest
import transformers
import torch

import qdaif
from conftest import crash_at_step
from nanorlhf.checkpoint import load_model
from nanorlhf.errors import UserError
from nanorlhf.run import resume_run
from nanorlhf.tasks.qdaif_report import by_tone
from nanorlhf.tokenizer import Tokenizer

GENRES = ["haiku", "sonnet", "ballad", "limerick", "hymn"]
TONES = ["happy", "dark", "mysterious", "romantic", "reflective"]


class MockPoetry(qdaif.Domain):
    """Toy A of qdaif.md §9.2: a poem is 'genre|tone|quality'. A rewrite copies the parent's
    quality, raises it by 1 (cap 10) with probability q and reaches the requested genre with
    probability p (else the next genre). The judge reads the true labels and the quality. Optimum:
    25 x 10 = 250."""
    fitness_range = (0.0, 10.0)

    def __init__(self, p=0.8, q=0.5):
        self.p, self.q = p, q

    def _write(self, target, quality, rng):
        genre = (target["genre"] if rng.random() < self.p
                 else GENRES[(GENRES.index(target["genre"]) + 1) % 5])
        return f"{genre}|{target['tone']}|{quality}"

    def init_batch(self, targets, seed):
        rng = random.Random(seed)
        return [self._write(t, 1, rng) for t in targets]

    def mutate_batch(self, parents, targets, seed):
        rng = random.Random(seed)
        out = []
        for parent, target in zip(parents, targets):
            quality = int(parent["text"].split("|")[2])
            out.append(self._write(target, min(quality + 1, 10) if rng.random() < self.q
                                   else quality, rng))
        return out

    def labels_batch(self, texts):
        return [dict(zip(("genre", "tone"), t.split("|")[:2])) if t else None for t in texts]

    def fitness_batch(self, texts, cells):
        return [float("nan") if "nan" in t else float(t.split("|")[2]) if t else 0.0 for t in texts]


# a planted per-cell reward table (negative values, like RM logits), exact in 2 decimals
TABLE = {(g, t): round(-3 + 0.75 * i - 0.5 * j, 2)
         for i, g in enumerate(GENRES) for j, t in enumerate(TONES)}


class MockReward(MockPoetry):
    """Toy E: reward = TABLE[cell] - 0.5 k, plus 1 for the planted keyword 'hack'. Per-cell maximum:
    TABLE + 1 (k = 0, with 'hack'). Some candidates are empty or score NaN: they must change
    nothing."""
    fitness_range = None

    def _write(self, target, quality, rng):
        r = rng.random()
        if r < 0.05:
            return ""
        text = (f"{target['genre']}|{target['tone']}|{rng.randrange(4)}"
                + (" hack" if rng.random() < 0.3 else ""))
        return text + " nan" if r > 0.95 else text

    def mutate_batch(self, parents, targets, seed):
        return self.init_batch(targets, seed)

    def fitness_batch(self, texts, cells):
        return [float("nan") if "nan" in t
                else TABLE[tuple(c.values())] - 0.5 * int(t.split("|")[2][0])
                + ("hack" in t) if t else 0.0 for t, c in zip(texts, cells)]


def cfg_for(tmp_path, name="r", **kw):
    return qdaif.Config(out_dir=str(tmp_path), run=name,
                        **{"iterations": 200, "init_iterations": 20, "batch_size": 8, **kw})


def history(run_dir):
    return [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]


def grid():
    return qdaif.Grid(qdaif.POETRY_GRID)


def cand(genre, tone, fitness, text="a poem", i=0):
    return {"id": i, "cell": {"genre": genre, "tone": tone}, "fitness": fitness, "text": text}


# --- the archive ---

def test_elitism_strictly_higher_replaces_and_ties_keep_the_incumbent():
    archive = qdaif.Archive(grid(), offset=0.0)
    assert archive.add(cand("haiku", "dark", 0.5, i=0)) == "new"
    assert archive.add(cand("haiku", "dark", 0.5, i=1)) == "kept"  # a tie: the older poem stays
    assert archive.add(cand("haiku", "dark", 0.4, i=2)) == "kept"
    assert archive.elites[("haiku", "dark")]["id"] == 0
    assert archive.add(cand("haiku", "dark", 0.6, i=3)) == "improved"
    assert archive.elites[("haiku", "dark")]["id"] == 3


def test_random_stream_per_cell_elitism_and_stats():
    archive, rng = qdaif.Archive(grid(), offset=-5.0), random.Random(0)
    for i in range(500):
        before = {k: e["fitness"] for k, e in archive.elites.items()}
        qd_before = archive.stats()["qd_score"]
        archive.add(cand(rng.choice(GENRES), rng.choice(TONES), rng.uniform(-5, 5), i=i))
        after = {k: e["fitness"] for k, e in archive.elites.items()}
        assert all(after[k] >= f for k, f in before.items()) and set(before) <= set(after)
        assert archive.stats()["qd_score"] >= qd_before
        fs = list(after.values())
        s = archive.stats()
        assert s["num_elites"] == len(fs) and s["coverage"] == len(fs) / 25
        assert (s["qd_score"] == pytest.approx(sum(f + 5 for f in fs))
                and s["mean"] == pytest.approx(sum(fs) / len(fs)))
        # cell membership
        assert all(archive.grid.key(e["cell"]) == k for k, e in archive.elites.items())


@pytest.mark.parametrize("bad", [
    cand("haiku", "dark", float("nan")), cand("haiku", "dark", float("inf")),
    cand("haiku", "dark", -float("inf")), cand("haiku", "dark", None),
    cand("haiku", "dark", "high"), cand("haiku", "dark", 9.0, text="  \n"),
    cand("haiku", "dark", 9.0, text=None), cand("ode", "dark", 9.0), cand("haiku", "Dark", 9.0),
    {"cell": {"genre": "haiku"}, "fitness": 9.0, "text": "x"},
    {"cell": None, "fitness": 9.0, "text": "x"},
])
def test_invalid_candidates_leave_the_archive_unchanged(bad):
    archive = qdaif.Archive(grid(), offset=0.0)
    archive.add(cand("haiku", "dark", 1.0))
    before, stats = dict(archive.elites), archive.stats()
    assert archive.add(bad) == "invalid"
    assert archive.elites == before and archive.stats() == stats


def test_qd_score_never_falls_with_an_offset_but_a_raw_sum_does():
    """pyribs #283 / OpenELM: with negative rewards a raw sum of elite fitness drops when a cell
    fills."""
    archive = qdaif.Archive(grid(), offset=qdaif.RM_OFFSET)
    archive.add(cand("haiku", "dark", 2.0))
    raw, qd = sum(e["fitness"] for e in archive.elites.values()), archive.stats()["qd_score"]
    archive.add(cand("sonnet", "dark", -3.0))
    assert sum(e["fitness"] for e in archive.elites.values()) < raw
    assert archive.stats()["qd_score"] == pytest.approx(qd + 7.0)
    archive.add(cand("ballad", "dark", -30.0))  # below the floor: counts 0, still no fall
    assert (archive.stats()["qd_score"] == pytest.approx(qd + 7.0)
            and archive.stats()["coverage"] == 3 / 25)


def test_grid_spec_parsing_and_errors():
    g = qdaif.Grid("genre = haiku, sonnet ; tone=happy,dark,odd")
    assert (g.names == ["genre", "tone"] and len(g.keys) == 6
            and g.key({"genre": "sonnet", "tone": "odd"}) == ("sonnet", "odd"))
    for spec, message in [("genre=;tone=happy", "axis 'genre' has no labels"),
                          ("genre=haiku;tone= , ", "axis 'tone' has no labels"),
                          ("genre", "expected 'axis=label"), ("genre=a;genre=b", "repeated"),
                          ("genre=a,a", "repeats a label")]:
        with pytest.raises(UserError, match=message):
            qdaif.Grid(spec)


# --- the search on mock domains ---

def test_mock_poetry_reaches_the_known_optimum_and_replay_matches(tmp_path):
    archive, summary, run_dir = qdaif.run(cfg_for(tmp_path, iterations=1600), MockPoetry())
    assert summary["qd_score"] == 250 and summary["coverage"] == 1.0
    rows = history(run_dir)
    assert [r["id"] for r in rows] == list(range(1600))
    best = {}  # replay by brute force: each cell's elite is the first candidate with the cell's max
    for r in rows:
        if r["status"] != "invalid":
            key = archive.grid.key(r["cell"])
            if key not in best or r["fitness"] > best[key]["fitness"]:
                best[key] = r
    assert {k: e["id"] for k, e in archive.elites.items()} == {k: r["id"] for k, r in best.items()}
    assert summary["best"] == max(r["fitness"] for r in rows)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 200 and all(a["qd_score"] <= b["qd_score"]
                                       and a["coverage"] <= b["coverage"]
                                       for a, b in zip(metrics, metrics[1:]))
    assert {r["op"] for r in rows[:24]} == {"init"} and {r["op"] for r in rows[24:]} == {"mutate"}
    for r in rows[24:]:  # parents are elites picked before the batch: valid, earlier candidates
        assert (rows[r["parent"]]["status"] in ("new", "improved")
                and rows[r["parent"]]["batch"] < r["batch"])
    elites = [json.loads(line) for line in (run_dir / "elites.jsonl").read_text().splitlines()]
    assert len(elites) == 25 and all(e["fitness"] == 10 and e["text"].endswith("|10")
                                     for e in elites)


def test_requested_labels_mislabel_cells_and_the_rate_is_reported(tmp_path, capsys):
    _, judged, _ = qdaif.run(cfg_for(tmp_path, "j"), MockPoetry(p=0.7))
    archive, requested, run_dir = qdaif.run(cfg_for(tmp_path, "q", labels="requested"),
                                            MockPoetry(p=0.7))
    for summary in (judged, requested):
        assert 0.2 < summary["disagreement"]["any"] == summary["disagreement"]["genre"] < 0.4
        assert summary["disagreement"]["tone"] == 0
    wrong = sum(e["judged"] != e["cell"] for e in archive.elites.values())
    assert wrong > 0  # requested mode files poems under labels they do not have
    assert "judged labels differ from the requested ones for" in capsys.readouterr().out


def test_same_seed_same_run_other_seed_other_run(tmp_path):
    runs = [qdaif.run(cfg_for(tmp_path, name, seed=seed, iterations=120), MockPoetry())[2]
            for name, seed in (("a", 1), ("b", 1), ("c", 2))]
    text = [(r / "history.jsonl").read_bytes() for r in runs]
    assert text[0] == text[1] and text[0] != text[2]
    assert (runs[0] / "elites.jsonl").read_bytes() == (runs[1] / "elites.jsonl").read_bytes()


def resumed(run_dir) -> qdaif.Config:
    """--resume RUN_DIR: the interrupted run's own config, as main() reads it."""
    return resume_run(qdaif.Config, str(run_dir), "qdaif")[0]


def test_resume_from_a_snapshot_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    full = qdaif.run(cfg_for(tmp_path, "full", iterations=160), MockReward())[2]
    part = tmp_path / "part"  # a crash after writing batch 10's candidates, before its state
    crash_at_step(monkeypatch, 10, lambda: qdaif.run(cfg_for(tmp_path, "part", iterations=160),
                                                     MockReward()))
    with open(part / "history.jsonl", "a") as fh:  # and a line half written
        fh.write('{"id": 80, "half": "written"}\n')
    qdaif.run(resumed(part), MockReward())
    for name in ("history.jsonl", "elites.jsonl", "metrics.jsonl", "state/state.json",
                 "state/state.safetensors", "summary.json"):
        assert (full / name).read_bytes() == (part / name).read_bytes(), name
    crash_at_step(monkeypatch, 1, lambda: qdaif.run(cfg_for(tmp_path, "early"), MockReward()))
    with pytest.raises(UserError, match="no resumable state"):  # it crashed before its first state
        resumed(tmp_path / "early")
    with pytest.raises(UserError, match="no config.json"):
        resumed(tmp_path / "nothing")


def test_heatmaps_show_the_planted_reward_table(tmp_path, capsys):
    """Toy E: elites reach TABLE + 1 (the planted 'hack' keyword found everywhere); the mean map is
    the mean over every valid candidate; invalid ones (empty, NaN) left no mark."""
    archive, summary, run_dir = qdaif.run(cfg_for(tmp_path, iterations=2000), MockReward())
    rows = history(run_dir)
    assert {r["status"] for r in rows if r["text"] == "" or "nan" in r["text"]} == {"invalid"}
    assert summary["invalid"] == sum(r["text"] == "" or "nan" in r["text"] for r in rows) > 0
    assert summary["offset"] == qdaif.RM_OFFSET  # unbounded fitness: the documented default floor

    def cells(svg):
        texts = ET.parse(run_dir / svg).getroot().iter("{http://www.w3.org/2000/svg}text")
        return {(t.get("data-row"), t.get("data-col")): t.text for t in texts
                if t.get("class") == "value"}

    assert cells("elites.svg") == {k: f"{v + 1:.2f}" for k, v in TABLE.items()}
    assert all("hack" in e["text"] for e in archive.elites.values())
    valid = [r for r in rows if r["status"] != "invalid"]
    means = {k: [r["fitness"] for r in valid if tuple(r["cell"].values()) == k] for k in TABLE}
    assert cells("mean_fitness.svg") == {k: f"{sum(v) / len(v):.2f}" for k, v in means.items()}
    assert (run_dir / "qd_score.svg").read_text().startswith("<svg")
    out = capsys.readouterr().out
    assert "coverage 25/25 (100%)" in out and f"{TABLE['hymn', 'happy'] + 1:.3g}" in out


def test_empty_cells_are_grey_and_the_scale_is_fixed(tmp_path):
    path = tmp_path / "h.svg"
    from nanorlhf.svg import EMPTY, heatmap
    heatmap(["a", "b"], ["x", "y"], [[0.0, None], [1.0, 0.5]], path, "t", vmin=0.0, vmax=2.0)
    rects = [r.get("fill")
             for r in ET.parse(path).getroot().iter("{http://www.w3.org/2000/svg}rect")
             if r.get("width") == "84"]
    # 0 -> bottom, 1 -> middle of 0..2
    assert rects[1] == EMPTY and rects[0] == "#440154" and rects[2] == "#21918c"


# --- bad input on the command line ---

@pytest.mark.parametrize("argv, message", [
    (["--fitness", "rm:/no/such/rm"],
     "--fitness rm:/no/such/rm: '/no/such/rm' is not a readable reward-model"),
    (["--fitness", "gpt4"], "--fitness 'gpt4': choose ai, vader or rm:PATH"),
    (["--fitness", "rm:/no/such/rm@pair"],
     "--fitness rm:/no/such/rm@pair: '/no/such/rm' is not a readable"),
    (["--fitness", "rm:/no/such/rm@human"], "unknown reward-model template 'human' after '@'"),
    (["--grid", "genre=;tone=happy"], "axis 'genre' has no labels"),
    (["--grid", "colour=red,blue"], "--init-prompt 'Write a {tone} {genre}"),
    (["--labels", "guessed"], "--labels 'guessed': choose one of judged, requested"),
    (["--qd-offset", "low"], "--qd-offset 'low'"),
])
def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys, argv, message):
    out = str(tmp_path / "out")
    monkeypatch.setattr("sys.argv", ["qdaif.py", "--model", "/no/model", "--out-dir", out, *argv])
    with pytest.raises(SystemExit) as info:
        qdaif.run_cli(qdaif.main)
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and err.startswith("error: ") and message in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_unreadable_rm_directory(tmp_path):
    (tmp_path / "rm").mkdir()  # a directory, but no checkpoint in it
    with pytest.raises(UserError, match="no config.json"):
        qdaif.check_fitness(f"rm:{tmp_path / 'rm'}")


def test_rm_fitness_with_a_template(tiny_chat_model):
    # the path before '@' is checked, not the whole spec
    qdaif.check_fitness(f"rm:{tiny_chat_model}@ultrarm")


# --- the LM-facing code, on a tiny random model ---

@pytest.mark.parametrize("sampler", ["batch", "stream"])
def test_poetry_domain_runs_end_to_end_on_a_tiny_model(tiny_chat_model, tmp_path, monkeypatch,
                                                       capsys, sampler):
    used = []
    from nanorlhf.fast import decode as stream

    for module, name in ((qdaif, "generate"), (stream, "generate_stream")):
        real = getattr(module, name)
        spy = lambda *a, _real=real, _name=name, **kw: used.append(_name) or _real(*a, **kw)
        monkeypatch.setattr(module, name, spy)
    monkeypatch.setattr("sys.argv", ["qdaif.py", "--model", str(tiny_chat_model),
                                     "--out-dir", str(tmp_path), "--run", "tiny",
                                     "--iterations", "4", "--init-iterations", "2",
                                     "--batch-size", "2", "--max-new-tokens", "8",
                                     "--sampler", sampler])
    qdaif.main()
    assert used == ["generate" if sampler == "batch" else "generate_stream"] * 2  # one per batch
    rows = history(tmp_path / "tiny")
    assert len(rows) == 4 and [r["batch"] for r in rows] == [0, 0, 1, 1]
    g = grid()
    for r in rows:
        assert g.key(r["target"]) is not None
        if r["text"].strip():
            assert (g.key(r["judged"]) is not None and r["cell"] == r["judged"]
                    and 0 <= r["fitness"] <= 1)
    for name in ("elites.svg", "mean_fitness.svg", "qd_score.svg", "summary.json",
                 "state/state.json", "config.json"):
        assert (tmp_path / "tiny" / name).exists()
    assert "coverage" in capsys.readouterr().out


def test_main_resumes_an_interrupted_run_with_its_own_flags(tiny_chat_model, tmp_path, monkeypatch,
                                                            capsys):
    """python qdaif.py --resume RUN_DIR on the LM: the judge's priors are recomputed, the sampler is
    the run's own (stream here; --sampler batch given beside --resume is ignored), and the outputs
    equal an uninterrupted run's. A used --run is refused with a line that offers --resume."""
    def main(*argv):
        monkeypatch.setattr("sys.argv", ["qdaif.py", *argv])
        qdaif.main()

    flags = ["--model", str(tiny_chat_model), "--out-dir", str(tmp_path), "--iterations", "6",
             "--init-iterations", "2", "--batch-size", "2", "--max-new-tokens", "8",
             "--sampler", "stream"]
    main(*flags, "--run", "full")
    crash_at_step(monkeypatch, 3, lambda: main(*flags, "--run", "part"))
    main("--resume", str(tmp_path / "part"), "--sampler", "batch", "--iterations", "2")
    out = capsys.readouterr().out
    assert f"QDAIF: resuming {tmp_path / 'part'} after batch 2, torch threads: " in out
    for name in ("history.jsonl", "elites.jsonl", "metrics.jsonl", "summary.json"):
        full, part = (tmp_path / run / name for run in ("full", "part"))
        assert full.read_bytes() == part.read_bytes(), name
    with pytest.raises(UserError, match=f"already holds a run: .* --resume {tmp_path / 'full'}$"):
        main(*flags, "--run", "full")


def test_poetry_domain_prompts():
    cfg = qdaif.Config()
    domain = qdaif.PoetryDomain(None, None, grid(), cfg, qdaif.generate)
    seen = []
    domain._generate = lambda prompts, seed: seen.extend(prompts) or [""] * len(prompts)
    domain.init_batch([{"genre": "haiku", "tone": "dark"}], seed=3)
    parent = {"text": "Grey sky,\nfields of green.", "cell": {"genre": "sonnet", "tone": "happy"}}
    domain.mutate_batch([parent], [{"genre": "limerick", "tone": "mysterious"}], seed=3)
    topic = random.Random(3).choice(qdaif.TOPICS)
    assert seen == [f"Write a dark haiku about {topic}. Reply with the poem only.",
                    "Here is a sonnet:\n\nGrey sky,\nfields of green.\n\nRewrite it as a "
                    "mysterious limerick of very high, award-winning quality. Reply with the poem "
                    "only."]
    assert domain.fitness_range == (0.0, 1.0)


def test_the_judge_multiplies_through_packed_matmuls_and_the_writer_does_not(tiny_chat_model):
    """The numbers QDAIF has published: its judge runs oneDNN's packed matmuls
    (nanorlhf/fast/packed.py, where this torch has them), its writer torch's own. The choice is
    qdaif.py's (PoetryDomain.ask), not the judge's."""
    from nanorlhf.fast.packed import PackedLinear, available

    model, kinds = load_model(tiny_chat_model).eval(), []
    model.lm_head.register_forward_pre_hook(lambda mod, args: kinds.append(type(mod)))
    domain = qdaif.PoetryDomain(model, Tokenizer(tiny_chat_model), grid(),
                                qdaif.Config(max_new_tokens=4), qdaif.generate)
    poems = domain.init_batch([{"genre": "haiku", "tone": "dark"}], seed=0)
    assert kinds and set(kinds) == {torch.nn.Linear}
    kinds.clear()
    domain.labels_batch(poems + ["a poem"])
    assert kinds and set(kinds) == {PackedLinear if available() else torch.nn.Linear}
    assert type(model.lm_head) is torch.nn.Linear  # unpacked again after the judge


def test_calibration_divides_by_the_mean_content_free_distribution():
    """Hand numbers: p = (.7, .2, .1), priors (.9, .05, .05) and (.7, .15, .15), mean (.8, .1, .1);
    p / mean = (.875, 2, 1), over 3.875."""
    p = torch.tensor([[0.7, 0.2, 0.1]]).log()
    priors = torch.tensor([[0.9, 0.05, 0.05], [0.7, 0.15, 0.15]]).log()
    out = qdaif.calibrate(p, priors).exp()
    torch.testing.assert_close(out, torch.tensor([[0.875, 2.0, 1.0]]) / 3.875)
    assert out.argmax().item() == 1  # the label the judge favours for every input no longer wins
    # flat prior: no-op
    torch.testing.assert_close(qdaif.calibrate(p, torch.full((1, 3), 1 / 3).log()).exp(), p.exp())


def test_calibrated_labels_and_fitness_match_a_float64_recomputation(tiny_chat_model, tmp_path,
                                                                     monkeypatch):
    """The judged labels and the ai fitness end to end against plain float64 arithmetic: each
    answer's probability is its spellings' summed p(tokens | question), from transformers' own
    forward of the whole sequence (no KV cache, no prompt tree), normalised over the labels;
    calibration divides by the mean of those distributions for the content-free inputs and
    renormalises (Zhao et al. 2021, arXiv 2102.09690, eq. 1 with W = diag(p̄)^-1, b = 0). The
    fitness is P(yes) over {yes, no}. Labels and fitness come from one judge forward."""
    judge_dir = tmp_path / "judge"  # the tiny model with 8x its logits: a judge with opinions
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_chat_model)
    with torch.no_grad():
        hf.model.norm.weight.mul_(8.0)
    hf.save_pretrained(judge_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_chat_model / name, judge_dir / name)
    tok, hf = Tokenizer(judge_dir), hf.double().eval()

    def probs(poem: str, axis: str) -> torch.Tensor:  # (labels,) float64: the judge's raw ones
        values = grid().axes[axis] if axis != "quality" else ["yes", "no"]
        question = qdaif.LABEL_PROMPT.format(poem=poem, axis=axis, options=", ".join(values))
        prompt = tok.chat_prompt(question if axis != "quality"
                                 else qdaif.QUALITY_PROMPT.format(poem=poem))
        p = []
        for value in values:
            total = 0.0
            for spelling in {value, value.capitalize()}:
                option = tok.encode(spelling)
                with torch.no_grad():
                    logps = hf(torch.tensor([prompt + option])).logits[0].log_softmax(-1)
                total += math.exp(sum(logps[len(prompt) - 1 + i, t].item()
                                      for i, t in enumerate(option)))
            p.append(total)
        p = torch.tensor(p, dtype=torch.float64)
        return p / p.sum()

    poems = ["The capital of France is Paris.", "Never mention the pink elephant,\never.",
             "system user assistant"]
    seen = []  # what labels_batch computes: qdaif.calibrate's outputs, one (B, labels) per axis
    real_calibrate = qdaif.calibrate
    monkeypatch.setattr(qdaif, "calibrate",
                        lambda lp, prior: seen.append(real_calibrate(lp, prior)) or seen[-1])
    # the judge's forwards: one for the content-free priors, one for the poems' labels and fitness
    forwards = []
    real_option_logprobs = qdaif.option_logprobs
    monkeypatch.setattr(qdaif, "option_logprobs",
                        lambda *a: forwards.append(a) or real_option_logprobs(*a))
    domain = qdaif.PoetryDomain(load_model(judge_dir).eval(), tok, grid(), qdaif.Config(),
                                qdaif.generate)
    judged = domain.labels_batch(poems)
    fitness = domain.fitness_batch(poems, judged)
    assert len(seen) == 2 and len(forwards) == 2
    # P(yes) = p / (p + q) of fp32 probabilities each within 1e-4 · itself (as below): within
    # 2e-4 · P(yes)
    want = [p[0].item() for p in (probs(t, "quality") for t in poems)]
    assert fitness == pytest.approx(want, rel=2e-4, abs=0)
    assert (domain.fitness_batch(poems[:1], [None]) == pytest.approx(want[:1], rel=2e-4)
            and len(forwards) == 3)
    # labels calibration changes: some, or this judge could not tell a wrong calibration from none
    changed = 0
    for axis, got in zip(grid().names, seen):
        # p̄: a mean of probabilities
        prior = torch.stack([probs(t, axis) for t in qdaif.CONTENT_FREE]).mean(0)
        raw = torch.stack([probs(t, axis) for t in poems])
        want = raw / prior
        want = want / want.sum(-1, keepdim=True)
        changed += (raw.argmax(-1) != want.argmax(-1)).sum().item()
        # fp32 (ε = 1.2e-7) log-softmax of logits |z| < 50 errs by < 1e-5 per token; a calibrated
        # probability p ≤ 1 is exp of a sum of < 10 such terms (option tokens, 3 priors, the
        # normaliser): error < 1e-4 · p
        torch.testing.assert_close(got.exp().double(), want, rtol=1e-4, atol=0)
        top2 = want.topk(2, -1).values
        assert bool((top2[:, 0] - top2[:, 1] > 2e-4 * top2[:, 0]).all())  # gap > tol: sure argmax
        assert [row[axis] for row in judged] == [grid().axes[axis][i]
                                                 for i in want.argmax(-1).tolist()]
    assert changed > 0


class Loaded(Exception):
    """Raised by the recording loader: the request is all these tests need."""


@pytest.mark.parametrize("lm_device, dtype", [("cuda", torch.bfloat16), ("cpu", torch.float32)])
def test_rm_fitness_loads_on_the_lm_device_bf16_on_cuda(tiny_chat_model, tmp_path, monkeypatch,
                                                        lm_device, dtype):
    """--fitness rm:PATH: the RM goes where the LM is, in bf16 on CUDA (a 13B RM in fp32 on the CPU
    needs ~52 GB of RAM), fp32 on the CPU. No GPU here: device() says CUDA, and both loaders record
    what they are asked for."""
    import nanorlhf.reward

    asked = {}
    monkeypatch.setattr(qdaif, "device", lambda: torch.device(lm_device))
    load_lm = lambda path, device: asked.update(lm=torch.device(device)) or torch.nn.Module()
    monkeypatch.setattr(qdaif, "load_model", load_lm)

    def load_reward_model(path, dtype=torch.float32, device="cpu", template=None):
        asked["rm"] = (torch.device(device), dtype)
        raise Loaded

    monkeypatch.setattr(nanorlhf.reward, "load_reward_model", load_reward_model)
    monkeypatch.setattr("sys.argv", ["qdaif.py", "--model", str(tiny_chat_model), "--fitness",
                                     f"rm:{tiny_chat_model}", "--out-dir", str(tmp_path)])
    with pytest.raises(Loaded):
        qdaif.main()
    assert asked == {"lm": torch.device(lm_device), "rm": (torch.device(lm_device), dtype)}


# --- instruction echoes, sentiment, per-cell counts (the evidence beside the map) ---

@pytest.mark.parametrize("text, echo", [
    ("Rewrite it as a dark haiku", True), ("a poem of very high, award-winning quality", True),
    ("An award winning rose", True), ("The quality of mercy is not strained", True),
    ("rewritten in the sand", True),
    ("Reply with the poem only.", True), ("Here is a dark haiku:\nmoon over water", True),
    ("  here's a sonnet\nof the sea", True), ("POEM ONLY", True),
    ("The sea at night,\nwaves whisper", False), ("Where is a path?", False),
    ("And here is a rose for you", False),
    ("unqualified, prewritten, a writer's reply", False), ("qualityless", False), ("", False),
])
def test_echoes_instruction(text, echo):
    assert qdaif.echoes_instruction(text) is echo


class MockEcho(MockPoetry):
    """MockPoetry, but 30% of poems repeat their instruction, and the judge gives those 0.5 more."""

    def _write(self, target, quality, rng):
        echo = "|award-winning quality" if rng.random() < 0.3 else ""
        return super()._write(target, quality, rng) + echo

    def fitness_batch(self, texts, cells):
        return [float(t.split("|")[2]) + 0.5 * ("quality" in t) for t in texts]


def test_echo_flag_per_candidate_and_echo_elites_false_keeps_them_out(tmp_path, capsys):
    _, summary, run_dir = qdaif.run(cfg_for(tmp_path, "yes"), MockEcho())
    rows = history(run_dir)
    assert all(r["echo"] == ("quality" in r["text"]) for r in rows)
    elites = [json.loads(line) for line in (run_dir / "elites.jsonl").read_text().splitlines()]
    # the judge's +0.5 wins cells
    assert summary["echo"]["elites"] == sum(e["echo"] for e in elites) > 0
    assert summary["echo"]["candidates"] == sum(r["echo"] for r in rows)
    for echo, key in ((True, "fitness_echo"), (False, "fitness_other")):
        fs = [r["fitness"] for r in rows if r["echo"] == echo]
        assert summary["echo"][key]["n"] == len(fs)
        assert summary["echo"][key]["mean"] == pytest.approx(sum(fs) / len(fs))
    assert (f"instruction echoes: {summary['echo']['elites']} of {summary['num_elites']} elites"
            in capsys.readouterr().out)

    archive, summary, run_dir = qdaif.run(cfg_for(tmp_path, "no", echo_elites=False), MockEcho())
    rows = history(run_dir)
    assert {r["status"] for r in rows if r["echo"]} == {"echo"}  # valid, but never in the archive
    assert not any(e["echo"] for e in archive.elites.values()) and summary["echo"]["elites"] == 0
    # echoes still count as candidates
    assert summary["cells"]["haiku/happy"]["count"] == sum(
        r["cell"] == {"genre": "haiku", "tone": "happy"} for r in rows)
    assert resumed(run_dir).echo_elites is False  # a resume goes on with the run's own flag


def test_sentiment_is_vaders_compound_for_every_candidate(tmp_path):
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    class MockWords(MockPoetry):  # the labels, then a word that carries the tone
        words = {"happy": "joy", "dark": "grief", "mysterious": "fog", "romantic": "love",
                 "reflective": "still"}

        def _write(self, target, quality, rng):
            return super()._write(target, quality, rng) + "| " + self.words[target["tone"]]

    qdaif.run(cfg_for(tmp_path, iterations=48), MockWords())
    rows, vader = history(tmp_path / "r"), SentimentIntensityAnalyzer()
    assert all(r["sentiment"] == vader.polarity_scores(r["text"])["compound"] for r in rows)
    assert {r["sentiment"] > 0 for r in rows if r["target"]["tone"] == "happy"} == {True}
    assert {r["sentiment"] < 0 for r in rows if r["target"]["tone"] == "dark"} == {True}


def test_by_tone_hand_numbers():
    """Fresh happy 0.5, 0.7 (mean 0.6, s = 0.1414, se = 0.1); fresh dark -0.2 (one poem: no se).
    Rewrites: happy children 0.9 (of #0, 0.5) and 0.1 (of #2, -0.2): mean 0.5, se 0.4, shifts 0.4
    and 0.3 (mean 0.35, se 0.05); dark children -0.6 (of #1, 0.7) and -0.4 (of #0): mean -0.5, se
    0.1, shifts -1.3, -0.9 (mean -1.1, se 0.2). Gaps: fresh 0.8 (no se), rewrites 1.0, se sqrt(0.4²
    + 0.1²) = 0.41231. An invalid row counts nowhere."""
    def row(i, op, tone, s, parent=None, f=1.0, status="new"):
        return {"id": i, "op": op, "parent": parent, "target": {"genre": "haiku", "tone": tone},
                "sentiment": s, "fitness": f, "status": status}
    hist = [row(0, "init", "happy", 0.5, f=0.2), row(1, "init", "happy", 0.7, f=0.4),
            row(2, "init", "dark", -0.2), row(3, "mutate", "happy", 0.9, 0),
            row(4, "mutate", "happy", 0.1, 2), row(5, "mutate", "dark", -0.6, 1),
            row(6, "mutate", "dark", -0.4, 0),
            row(7, "mutate", "dark", 1.0, 0, f=None, status="invalid")]
    bt = by_tone(grid(), hist)
    close = lambda got, want: got is None if want is None else got == pytest.approx(want)
    approx = lambda d, n, mean, se: d["n"] == n and close(d["mean"], mean) and close(d["se"], se)
    assert (approx(bt["init"]["happy"]["sentiment"], 2, 0.6, 0.1)
            and approx(bt["init"]["happy"]["fitness"], 2, 0.3, 0.1))
    assert approx(bt["init"]["dark"]["sentiment"], 1, -0.2, None)
    assert approx(bt["init"]["romantic"]["sentiment"], 0, None, None)
    assert (approx(bt["mutate"]["happy"]["sentiment"], 2, 0.5, 0.4)
            and approx(bt["mutate"]["happy"]["shift"], 2, 0.35, 0.05))
    assert (approx(bt["mutate"]["dark"]["sentiment"], 2, -0.5, 0.1)
            and approx(bt["mutate"]["dark"]["shift"], 2, -1.1, 0.2))
    assert bt["gap"]["init"] == {"mean": pytest.approx(0.8), "se": None}
    assert bt["gap"]["mutate"] == {"mean": pytest.approx(1.0), "se": pytest.approx(0.4123106)}
    assert by_tone(qdaif.Grid("genre=haiku;mood=calm"), hist) is None


def test_summary_cells_hold_elite_mean_and_count(tmp_path, capsys):
    archive, summary, run_dir = qdaif.run(cfg_for(tmp_path, iterations=400), MockReward())
    valid = [r for r in history(run_dir) if r["status"] != "invalid"]
    assert sum(c["count"] for c in summary["cells"].values()) == len(valid)
    for key in grid().keys:
        fs = [r["fitness"] for r in valid if tuple(r["cell"].values()) == key]
        cell = summary["cells"]["/".join(key)]
        assert cell["count"] == len(fs) and cell["mean"] == pytest.approx(sum(fs) / len(fs))
        assert cell["elite"] == archive.elites[key]["fitness"] == max(fs)
    texts = ET.parse(run_dir / "counts.svg").getroot().iter("{http://www.w3.org/2000/svg}text")
    counts = {(t.get("data-row"), t.get("data-col")): t.text for t in texts
              if t.get("class") == "value"}
    assert counts == {k: str(summary["cells"]["/".join(k)]["count"]) for k in grid().keys}
    assert "valid candidates per cell" in capsys.readouterr().out


# --- several seeds ---

def test_seeds_aggregate_hand_made_summaries(tmp_path, capsys):
    """coverage 0.4, 0.6, 0.8, 0.6: mean 0.6, s = sqrt(0.08 / 3), se = s / 2 = 0.0816497; qd 10, 12,
    17: mean 13, s = sqrt(13), se = 2.0816660; echo elites 3, 5, 7: mean 5, se 2 / sqrt(3); the
    fourth run predates echoes."""
    from tools import qdaif_seeds

    def summary(cov, qd, echo, gap):
        tone = {"sentiment": {"n": 4, "mean": gap / 2, "se": 0.1},
                "fitness": {"n": 4, "mean": 0.3, "se": 0.1}}
        return {"coverage": cov, "qd_score": qd, "echo": {"elites": echo, "candidates": 10 * echo},
                "by_tone": {"init": {"happy": tone},
                            "mutate": {"happy": {**tone, "shift": {"n": 4, "mean": 0.2,
                                                                   "se": None}}},
                            "gap": {"init": {"mean": gap, "se": 0.1},
                                    "mutate": {"mean": None, "se": None}}}}
    runs = [summary(0.4, 10, 3, 0.5), summary(0.6, 12, 5, 0.4), summary(0.8, 17, 7, 0.6),
            {"coverage": 0.6, "qd_score": None}]
    dirs = []
    for i, s in enumerate(runs):
        (tmp_path / f"s{i}").mkdir()
        (tmp_path / f"s{i}" / "summary.json").write_text(json.dumps(s))
        dirs.append(str(tmp_path / f"s{i}"))
    stats = qdaif_seeds.main(dirs + ["--json", str(tmp_path / "seeds.json")])
    assert stats["coverage"] == {"n": 4, "mean": pytest.approx(0.6), "se": pytest.approx(0.0816497)}
    assert stats["qd_score"] == {"n": 3, "mean": pytest.approx(13.0),
                                 "se": pytest.approx(2.0816660)}
    assert stats["echo elites"] == {"n": 3, "mean": pytest.approx(5.0),
                                    "se": pytest.approx(2 / math.sqrt(3))}
    assert stats["fresh happy-dark gap"] == {"n": 3, "mean": pytest.approx(0.5),
                                             "se": pytest.approx(0.1 / math.sqrt(3))}
    assert stats["rewrite happy-dark gap"]["n"] == 0
    assert stats["fresh happy fitness"] == {"n": 3, "mean": pytest.approx(0.3),
                                            "se": pytest.approx(0, abs=1e-12)}
    # not in these summaries
    assert "rewrite happy fitness" not in stats and stats["echo fitness"]["n"] == 0
    assert (stats["fresh happy sentiment"]["mean"] == pytest.approx(0.25)
            and stats["rewrite happy shift"]["se"] == pytest.approx(0, abs=1e-12))
    out = capsys.readouterr().out
    assert "coverage" in out and "0.600" in out and "rewrite happy-dark gap" not in out  # none has
    assert json.loads((tmp_path / "seeds.json").read_text())["figures"]["qd_score"]["n"] == 3
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "summary.json").write_text("{not json")
    for bad, message in ((tmp_path / "none", "no summary.json"),
                         (tmp_path / "bad", "not valid JSON")):
        with pytest.raises(UserError, match=message):
            qdaif_seeds.main([str(bad)])


def test_resume_and_report_keep_poems_that_hold_unicode_line_separators(tmp_path, monkeypatch):
    """json.dumps leaves U+2028 and U+0085 in a poem as they are, and str.splitlines splits at them:
    history.jsonl must be read line by line at '\\n' only, or the report misreads it and a resume
    cuts it in the wrong place."""
    class Separators(MockReward):
        def _write(self, target, quality, rng):
            text = super()._write(target, quality, rng)
            return text and text + " one\u2028two\x85three"

    full = qdaif.run(cfg_for(tmp_path, "full", iterations=80), Separators())[2]
    part = tmp_path / "part"
    crash_at_step(monkeypatch, 6,
                  lambda: qdaif.run(cfg_for(tmp_path, "part", iterations=80), Separators()))
    qdaif.run(resumed(part), Separators())
    assert (full / "history.jsonl").read_bytes() == (part / "history.jsonl").read_bytes()
    rows = [json.loads(line) for line in (full / "history.jsonl").read_text().split("\n")[:-1]]
    assert len(rows) == 80 and sum("\u2028" in r["text"] for r in rows) > 0
