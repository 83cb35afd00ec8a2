"""QDAIF: quality-diversity through AI feedback. MAP-Elites over poems, genre x tone.

    python qdaif.py --model llama                    # embedded SmolLM2-135M-Instruct, CPU, ~10 min
    python qdaif.py --model llama --fitness rm:PATH  # map a reward model (the hackathon's use)
    python qdaif.py --model llama --iterations 2500  # the hackathon's length (a GPU job)
    python qdaif.py --resume out/qdaif/RUN           # continue an interrupted run exactly

MAP-Elites keeps one poem per cell of a grid of categories (default 5 genres x 5 tones): the cell's
elite, the best poem seen so far whose labels fall in the cell. Each batch either writes fresh poems
("Write a {tone} {genre} about ...": the first --init-iterations poems, or while the archive is
empty) or rewrites elites: pick a filled cell uniformly and ask for its elite rewritten as a
randomly drawn (genre, tone), QDAIF's LMX-rewrite (Bradley et al. 2023, arXiv 2310.13032). Every
child is judged twice:
  fitness  ai: P(yes) for "is this a high-quality poem?", from the LM's log-probs of yes and no
           vader: VADER sentiment of the poem (compound, in [-1, 1])
           rm:PATH: a reward model's score of (request, poem), on the LM's device (bf16 on CUDA)
  labels   judged: the LM picks the genre (then the tone) of highest log-prob (QDAIF)
           requested: the cell is the target the prompt asked for (the New England RLHF
           hackathon's fork)
Both labels are recorded for every poem, and the run reports how often they disagree. A child takes
a cell only if the cell is empty or the child's fitness is strictly higher (a tie keeps the older
poem). Two measures beside the fitness, recorded for every candidate: `echo`, whether the poem
repeats its instruction ("... of very high, award-winning quality": see echoes_instruction;
--echo-elites false keeps such poems out of the archive), and `sentiment`, VADER's compound score,
to see how far a rewrite moves a poem toward the tone it was asked for.

QD score = sum over filled cells of max(f - offset, 0): the offset is a floor under fitness, so
every filled cell adds a term >= 0 and the score never falls (the clip keeps that true below the
floor). --qd-offset auto uses the fitness's lower bound: 0 for ai (QD <= number of cells), -1 for
vader; a reward model is unbounded, so it gets -10, the hackathon's floor (set it below the scores
you see).

Out: out/qdaif/<run>/ history.jsonl (every candidate), elites.jsonl, metrics.jsonl, summary.json,
elites.svg, mean_fitness.svg, counts.svg, qd_score.svg, and map.html: the map to click through
(elite, mean and count views; each elite's poem and lineage), one self-contained file
(nanorlhf/tasks/qdaif_report.py writes these). RUN/state/ holds the archive, the curve and the RNGs
every --save-every batches, for --resume. Several seeds' runs side by side:
python tools/qdaif_seeds.py RUN_DIR RUN_DIR ...
"""

import itertools
import json
import math
import random
import re
import string
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from nanorlhf import distributed
from nanorlhf.atomic import atomic_write_text
from nanorlhf.checkpoint import load_model, resolve_model
from nanorlhf.data import fit_prompts
from nanorlhf.errors import UserError, run_cli
from nanorlhf.run import (Run, THREADS_HELP, check_flags, choose_threads, exit_interrupted, flag,
                          load_state, parse_config, resume_run, run_dir, save_state,
                          seed_everything)
from nanorlhf.model import device
from nanorlhf.reward import VaderScorer, parse_rm_spec
from nanorlhf.sampling import SAMPLER_HELP, SAMPLERS, generate
from nanorlhf.tasks.qdaif_judge import option_logprobs
from nanorlhf.tasks.qdaif_report import report
from nanorlhf.tokenizer import Tokenizer

POETRY_GRID = ("genre=haiku,sonnet,ballad,limerick,hymn;"
               "tone=happy,dark,mysterious,romantic,reflective")
TOPICS = ("the sea", "autumn leaves", "a city at night", "an old house", "the moon", "a garden",
          "mountains", "first snow", "a long journey", "a lost friend", "the stars",
          "a summer storm")
INIT_PROMPT = "Write a {tone} {genre} about {topic}. Reply with the poem only."
MUTATE_PROMPT = ("Here is a {parent_genre}:\n\n{poem}\n\nRewrite it as a {tone} {genre} of very "
                 "high, award-winning quality. Reply with the poem only.")
LABEL_PROMPT = ("{poem}\n\nWhich {axis} is the poem above closest to: {options}? "
                "Answer with one word.")
QUALITY_PROMPT = "{poem}\n\nIs the poem above a high-quality poem? Answer yes or no."
CONTENT_FREE = ("N/A", "[poem]", "")  # no content: what the judge answers for these is its prior
RM_OFFSET = -10.0
# Words of the instructions above that a poem has no call to use: one that holds them is repeating
# its request, not answering it. The earlier measure was "rewrite" or "quality"; a preamble ("Here
# is a dark haiku:") counts only at the very start. Matched case-insensitively as whole words;
# "rewrit" also takes rewrite(s|ten|ing).
ECHO_MARKERS = re.compile(r"\brewrit\w*|\baward[- ]winning\b|\bquality\b|\breply with\b"
                          r"|\bpoem only\b|\A\s*here(?: is|'s) an?\b", re.IGNORECASE)


@dataclass
class Config:
    model: str = flag("llama", "checkpoint dir, local HF cache id, or 'llama' (the embedded "
                      "SmolLM2-135M)")
    fitness: str = flag("ai", "ai (LM's P(yes) 'high quality?') | vader | rm:PATH[@TEMPLATE] "
                        "(reward model)")
    labels: str = flag("judged", "cell from the LM's judged labels (QDAIF) or the requested ones "
                       "(hackathon)", choices=("judged", "requested"))
    calibrate: bool = flag(True, "judged labels: divide out the judge's answer for content-free "
                           "poems")
    echo_elites: bool = flag(True, "instruction echoes may become elites (false: status 'echo', "
                             "kept out)")
    grid: str = flag(POETRY_GRID, "axes and their labels: 'axis=a,b,c;axis2=x,y'")
    iterations: int = flag(400, "candidate poems in all (each costs one generation and its "
                           "judging)", min=1)
    init_iterations: int = flag(64, "the first N candidates are fresh poems, not rewrites", min=0)
    batch_size: int = flag(16, "candidates generated and judged together", min=1)
    sampler: str = flag("batch", SAMPLER_HELP, choices=SAMPLERS)
    max_new_tokens: int = flag(64, "poem length cap (a cut-off last line is dropped)", min=1)
    temperature: float = flag(0.8, "sampling temperature for writing and rewriting (0: greedy)",
                              min=0)
    top_p: float = flag(0.95, "nucleus sampling for writing and rewriting", gt=0, max=1)
    qd_offset: str = flag("auto", "QD-score floor: a number, or auto (ai 0, vader -1, rm -10)")
    init_prompt: str = flag(INIT_PROMPT, "fresh-poem prompt: every axis as {axis}, and {topic}")
    mutate_prompt: str = flag(MUTATE_PROMPT, "rewrite prompt: every axis, {poem}, optionally "
                              "{parent_AXIS}")
    rm_prompt: str = flag("Write a {tone} {genre}.", "rm:PATH scores (this request, poem); {axis}: "
                          "the cell")
    rm_batch_size: int = flag(8, "reward-model scoring batch", min=1)
    out_dir: str = flag("out/qdaif", "runs are written to OUT_DIR/RUN")
    run: str = flag("", "run name (empty: a timestamp)")
    resume: str = flag("", "RUN_DIR of an interrupted run: continue it with its own config")
    save_every: int = flag(1, "write RUN/state/ (for --resume) every N batches", min=1)
    seed: int = flag(0, "seed for targets, parents and sampling")
    threads: int = flag(0, THREADS_HELP, min=0)

    def check(self) -> None:
        """The rules between flags, before any work: the grid, the prompts that must name its axes,
        --qd-offset, and --fitness (a bad rm:PATH should not cost a model load first)."""
        axes = set(Grid(self.grid).names)
        check_template("init-prompt", self.init_prompt, axes, axes | {"topic"})
        parents = {f"parent_{a}" for a in axes}
        check_template("mutate-prompt", self.mutate_prompt, axes | {"poem"},
                       axes | {"poem"} | parents)
        check_template("rm-prompt", self.rm_prompt, set(), axes)
        if self.qd_offset != "auto" and _number(self.qd_offset) is None:
            raise UserError(f"--qd-offset {self.qd_offset!r}: expected a number or auto")
        check_fitness(self.fitness)


def check_template(flag: str, template: str, required: set[str], allowed: set[str]) -> None:
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        raise UserError(f"--{flag}: {e}") from None
    if fields - allowed or required - fields:
        names = lambda xs: ", ".join("{" + x + "}" for x in sorted(xs)) or "none"
        raise UserError(f"--{flag} {template!r}: must use {names(required)}; may also use "
                        f"{names(allowed - required)}; unknown: {names(fields - allowed)} "
                        "(set the prompt flags to match --grid)")


def check_fitness(spec: str) -> None:
    if spec in ("ai", "vader"):
        return
    if not spec.startswith("rm:"):
        raise UserError(f"--fitness {spec!r}: choose ai, vader or rm:PATH")
    name, _ = parse_rm_spec(spec)
    try:
        path = resolve_model(name)
    except UserError:
        path = None
    if path is None or not (path / "config.json").is_file():
        raise UserError(f"--fitness {spec}: {name!r} is not a readable reward-model checkpoint "
                        "directory (no config.json)")


# --- the grid and the archive ---

class Grid:
    """A categorical behaviour space: named axes, each a list of labels. A cell is one label per
    axis. Cells are keyed by tuples in axis order; candidates carry labels as {axis: label}."""

    def __init__(self, spec: str):
        self.spec, self.axes = spec, {}
        for part in spec.split(";"):
            name, eq, labels = (s.strip() for s in part.partition("="))
            values = [v.strip() for v in labels.split(",") if v.strip()]
            if not eq or not name:
                raise UserError(f"--grid {spec!r}: expected 'axis=label,label;axis=...', "
                                f"got {part!r}")
            if not values:
                raise UserError(f"--grid {spec!r}: axis {name!r} has no labels")
            if name in self.axes or len(set(values)) < len(values):
                raise UserError(f"--grid {spec!r}: axis {name!r} is repeated or repeats a label")
            self.axes[name] = values
        self.names = list(self.axes)
        self.keys = list(itertools.product(*self.axes.values()))

    def key(self, labels) -> tuple | None:
        """{axis: label} -> the cell's key; None when an axis is missing or a label is not on its
        list."""
        if not isinstance(labels, dict):
            return None
        key = tuple(labels.get(n) for n in self.names)
        return key if all(v in self.axes[n] for n, v in zip(self.names, key)) else None

    def labels(self, key: tuple) -> dict:
        return dict(zip(self.names, key))


def _number(f) -> float | None:
    """A finite float, or None (NaN, inf, not a number) meaning the candidate is invalid."""
    try:
        f = float(f)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


class Archive:
    """MAP-Elites archive: at most one elite per cell, the best valid candidate that landed
    there."""

    def __init__(self, grid: Grid, offset: float):
        self.grid, self.offset, self.elites = grid, offset, {}  # cell key -> candidate dict

    def valid(self, cand: dict) -> bool:
        """Invalid: empty text, labels off the grid, NaN/inf/missing fitness."""
        has_text = bool(str(cand.get("text") or "").strip())
        on_grid = self.grid.key(cand.get("cell")) is not None
        return on_grid and has_text and _number(cand.get("fitness")) is not None

    def add(self, cand: dict) -> str:
        """-> 'new' (filled an empty cell) | 'improved' | 'kept' (not strictly better) | 'invalid'.
        An invalid candidate changes nothing."""
        if not self.valid(cand):
            return "invalid"
        key, f = self.grid.key(cand["cell"]), cand["fitness"]
        old = self.elites.get(key)
        if old is not None and not f > old["fitness"]:
            return "kept"
        self.elites[key] = cand
        return "new" if old is None else "improved"

    def stats(self) -> dict:
        fs, n = [e["fitness"] for e in self.elites.values()], len(self.grid.keys)
        qd = sum(max(f - self.offset, 0.0) for f in fs)
        return {"qd_score": qd, "norm_qd_score": qd / n, "coverage": len(fs) / n,
                "num_elites": len(fs), "best": max(fs, default=None),
                "mean": sum(fs) / len(fs) if fs else None}


# --- the domain: what the search asks of a language model (tests plug in mocks) ---

class Domain:
    """Write, rewrite and judge candidates in batches. Targets, parents' and judged labels are
    {axis: label}. All randomness comes from `seed`, so a run (and a resumed run) is
    reproducible."""
    fitness_range: tuple[float, float] | None = None  # known bounds of fitness (None: unbounded)

    def init_batch(self, targets: list[dict], seed: int) -> list[str]: ...
    def mutate_batch(self, parents: list[dict], targets: list[dict], seed: int) -> list[str]: ...
    def labels_batch(self, texts: list[str]) -> list[dict | None]: ...
    def fitness_batch(self, texts: list[str], cells: list[dict | None]) -> list[float]: ...


def calibrate(label_logps: torch.Tensor, prior_logps: torch.Tensor) -> torch.Tensor:
    """Contextual calibration (Zhao et al. 2021, arXiv 2102.09690): p(label | poem) / p̄(label),
    p̄ the mean of the judge's distributions for K content-free inputs. (B, L), (K, L) log-probs ->
    (B, L), renormalised. A small judge's favourite label (often simply the first option listed)
    no longer takes every poem."""
    prior = prior_logps.logsumexp(0) - math.log(prior_logps.shape[0])  # log of the mean probability
    return (label_logps - prior).log_softmax(-1)


class PoetryDomain(Domain):
    """The LM writes, rewrites and judges poems. Fitness: from the LM (ai) or from a scorer (vader,
    rm). `sample` writes: generate, or another sampler with its signature (main() chooses)."""

    def __init__(self, model, tok: Tokenizer, grid: Grid, cfg: Config, sample,
                 scorer=None, scorer_range=None):
        self.model, self.tok, self.grid, self.cfg = model, tok, grid, cfg
        self.sample, self.scorer = sample, scorer
        self.priors: dict[str, torch.Tensor] = {}  # axis -> label log-probs for content-free poems
        self.judged: tuple[list[str], dict] = ([], {})  # the last batch's poems and ask()'s answers
        self.fitness_range = (0.0, 1.0) if scorer is None else scorer_range

    def _generate(self, prompts: list[str], seed: int) -> list[str]:
        cfg, tok = self.cfg, self.tok
        # a prompt longer than the model's context allows keeps its last tokens (the one rule)
        ids = fit_prompts([tok.chat_prompt(p) for p in prompts],
                          self.model.cfg.max_position_embeddings, cfg.max_new_tokens)
        gen = self.sample(self.model, ids, cfg.max_new_tokens, tok.stop_ids, tok.pad_id,
                          temperature=cfg.temperature, top_p=cfg.top_p, seed=seed)
        texts = []
        for ids in gen.ids:
            text = self.tok.decode(ids).strip()
            if not (ids and ids[-1] in self.tok.stop_ids) and "\n" in text:
                text = text.rsplit("\n", 1)[0].rstrip()  # hit the length cap: drop the cut-off line
            texts.append(text)
        return texts

    def init_batch(self, targets, seed):
        rng = random.Random(seed)
        prompts = [self.cfg.init_prompt.format(**t, topic=rng.choice(TOPICS)) for t in targets]
        return self._generate(prompts, seed)

    def mutate_batch(self, parents, targets, seed):
        parent_labels = lambda p: {f"parent_{a}": v for a, v in p["cell"].items()}
        prompts = [self.cfg.mutate_prompt.format(poem=p["text"], **t, **parent_labels(p))
                   for p, t in zip(parents, targets)]
        return self._generate(prompts, seed)

    def ask(self, texts: list[str], quality: bool) -> dict[str, torch.Tensor]:
        """{axis: (B, labels) log p(label | question)} and, with quality, {"quality": (B, 2) log p
        of yes, no}, each answer's spellings (lower, Capital) pooled, not normalised. A poem's
        questions share their prompts' prefix (the chat template, the poem): they are scored
        together, in one forward for the batch (nanorlhf/tasks/qdaif_judge.py)."""
        # the fast layer: the judge multiplies through oneDNN's packed fp32 matmuls (as it always
        # has), the writer through torch's own (packed_linears packs for the `with` block only)
        from nanorlhf.fast.packed import packed_linears

        questions = {axis: (LABEL_PROMPT, {"axis": axis, "options": ", ".join(values)}, values)
                     for axis, values in self.grid.axes.items()}
        if quality:
            questions["quality"] = (QUALITY_PROMPT, {}, ["yes", "no"])
        spellings = [[sorted({a, a.capitalize()}) for a in answers]
                     for _, _, answers in questions.values()]
        prompts = [[self.tok.chat_prompt(template.format(poem=t, **fields))
                    for template, fields, _ in questions.values()] for t in texts]
        options = [[self.tok.encode(s) for group in groups for s in group] for groups in spellings]
        with packed_linears(self.model):
            answers = option_logprobs(self.model, prompts, options, self.tok.pad_id)
        pooled = []
        for lp, groups in zip(answers, spellings):
            bounds = list(itertools.accumulate([0] + [len(g) for g in groups]))
            pooled.append(torch.stack([lp[:, i:j].logsumexp(-1)
                                       for i, j in zip(bounds, bounds[1:])], -1))
        return dict(zip(questions, pooled))

    def judge(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """ask() about this batch, kept for the next call: search() asks labels_batch, then
        fitness_batch, about the same poems, and one forward answers both."""
        if self.judged[0] != texts:
            self.judged = (list(texts), self.ask(texts, quality=self.scorer is None))
        return self.judged[1]

    def labels_batch(self, texts):
        answers, judged = self.judge(texts), [{} for _ in texts]
        if self.cfg.calibrate and not self.priors:  # once: the judge's answers to no poem at all
            content_free = self.ask(list(CONTENT_FREE), False)
            self.priors = {axis: lp.log_softmax(-1) for axis, lp in content_free.items()}
        for axis, values in self.grid.axes.items():
            logps = answers[axis].log_softmax(-1)  # normalised over the axis's labels
            if self.cfg.calibrate:
                logps = calibrate(logps, self.priors[axis])
            for row, i in zip(judged, logps.argmax(-1).tolist()):
                row[axis] = values[i]
        return [row if t.strip() else None for row, t in zip(judged, texts)]

    def fitness_batch(self, texts, cells):
        if self.scorer is not None:
            return self.scorer(texts, cells)
        lp = self.judge(texts)["quality"]
        return torch.sigmoid(lp[:, 0] - lp[:, 1]).tolist()  # P(yes) over {yes, no}


def make_scorer(cfg: Config, dev: torch.device):
    """-> (score(texts, cells) -> list[float], known range or None) for vader and rm:PATH. The RM
    goes on the LM's device, bf16 on CUDA (reward.scorer_dtype): a 13B RM in fp32 on the CPU would
    need ~52 GB of RAM."""
    from nanorlhf.reward import make_gold_scorer  # lazy: only these fitnesses need it

    scorer = make_gold_scorer(cfg.fitness, device=dev, batch_size=cfg.rm_batch_size)

    def score(texts, cells):
        prompts = [cfg.rm_prompt.format(**c) if c else "Write a poem." for c in cells]
        return [float(s) for s in scorer.score(prompts, texts)]
    return score, ((-1.0, 1.0) if cfg.fitness == "vader" else None)


def echoes_instruction(text: str) -> bool:
    """Does the poem repeat words of its instruction (ECHO_MARKERS)? A marker copied from an echoing
    parent counts too: every lineage starts at a fresh poem, whose prompt held no poem, so the words
    first came from an instruction, and the judge scores the elite for what it holds, not where it
    came from."""
    return ECHO_MARKERS.search(text) is not None


# --- the search ---

def search(domain: Domain, grid: Grid, cfg: Config, out: Run, archive: Archive,
           curve: list[dict]) -> None:
    """MAP-Elites, one batch per step, to cfg.iterations candidates, into `archive` (empty) and
    `curve` (the archive's stats after each batch; empty): what the finished batches made, should a
    Ctrl-C stop the search. RUN/state/ (the archive, the curve, the RNGs) every cfg.save_every
    batches lets a resumed run (cfg.resume) continue exactly as the uninterrupted one would."""
    rng, done = random.Random(cfg.seed), 0
    vader = VaderScorer()  # a measure beside the fitness, for every candidate (draws no rng)
    history = out.dir / "history.jsonl"
    if cfg.resume:  # the archive, the curve and the RNGs exactly as the last saved state left them
        _, _, state = load_state(out.dir)  # also restores Python's and torch's global RNGs
        done, curve[:] = state["done"], state["curve"]
        version, ints, gauss = state["rng"]
        rng.setstate((version, tuple(ints), gauss))
        archive.elites = {grid.key(e["cell"]): e for e in state["elites"]}
        # split at "\n" only: str.splitlines also splits at U+2028 and U+0085, which json.dumps
        # leaves in a poem
        lines = history.read_text().split("\n") if history.exists() else []
        # drop what came after the saved state: those batches are redone
        atomic_write_text(history, "".join(line + "\n" for line in lines[:done]))
        out.rewrite(curve)
    else:
        atomic_write_text(history, "")
    bar = distributed.bar(total=cfg.iterations, initial=done, desc="QDAIF", unit="poem")
    while done < cfg.iterations:
        n = min(cfg.batch_size, cfg.iterations - done)
        # Select. MAP-Elites starts from random solutions: here fresh poems written for random
        # cells. After that a parent is the elite of a filled cell drawn uniformly: every niche,
        # not only the fittest, gets offspring, which is what spreads the search over the grid.
        # (The draws' order is fixed: a resumed run must make the same ones.)
        init = done < cfg.init_iterations or not archive.elites
        targets = [grid.labels(rng.choice(grid.keys)) for _ in range(n)]
        occupied = [k for k in grid.keys if k in archive.elites]
        parents = None if init else [archive.elites[rng.choice(occupied)] for _ in range(n)]
        seed = rng.randrange(2**31)
        # Mutate: LMX-rewrite, the LM as the variation operator. The target cell is only a
        # request: the child may not be what was asked for, and with judged labels it lands where
        # the judge puts it.
        if init:
            texts = domain.init_batch(targets, seed)
        else:
            texts = domain.mutate_batch(parents, targets, seed)
        # Evaluate: AI feedback gives both the behaviour (the cell) and the quality (the fitness).
        judged = domain.labels_batch(texts)
        cells = judged if cfg.labels == "judged" else targets
        fitness = domain.fitness_batch(texts, cells)
        # Insert: a child takes its cell if it is empty or the child is strictly fitter; a tie
        # keeps the older poem, and an invalid child (no text, off-grid labels, NaN fitness)
        # changes nothing. With --echo-elites false a child that echoes its instruction is valid
        # but ineligible.
        rows, sentiment = [], vader.score([], texts)
        children = zip(texts, targets, judged, cells, fitness)
        for i, (text, target, label, cell, f) in enumerate(children):
            cand = {"id": done + i, "batch": len(curve), "op": "init" if init else "mutate",
                    "parent": None if init else parents[i]["id"], "target": target,
                    "judged": label, "cell": cell, "fitness": _number(f), "text": text,
                    "echo": echoes_instruction(text), "sentiment": sentiment[i]}
            barred = cand["echo"] and not cfg.echo_elites and archive.valid(cand)
            cand["status"] = "echo" if barred else archive.add(cand)
            rows.append(cand)
        with open(history, "a") as fh:
            fh.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        done += n
        point = {"step": len(curve) + 1, "candidates": done, "phase": "init" if init else "mutate",
                 **archive.stats(), "added": sum(r["status"] in ("new", "improved") for r in rows)}
        curve.append(point)
        out.log(**point)
        # RUN/state/ is swapped in whole (save_state): a crash leaves the previous one to resume
        # from, and the history lines written after it are cut at the resume
        if point["step"] % cfg.save_every == 0 or done == cfg.iterations:
            save_state(out.dir, point["step"], {}, done=done, rng=rng.getstate(), curve=curve,
                       elites=list(archive.elites.values()))
        bar.set_postfix(qd=f"{point['qd_score']:.3g}", cov=f"{point['coverage']:.0%}")
        bar.update(n)
    bar.close()


def run(cfg: Config, domain: Domain) -> tuple[Archive, dict, Path]:
    """Search and report on `domain` (main()'s LM, or a mock in tests); cfg.resume set (the
    interrupted run's own config, from resume_run) continues that run from RUN/state/. The flags
    are checked here too, for callers that build a Config without parse_config."""
    check_flags(cfg)
    grid, bounds = Grid(cfg.grid), domain.fitness_range
    auto = bounds[0] if bounds else RM_OFFSET  # the fitness's floor, or the hackathon's for an RM
    offset = float(cfg.qd_offset) if cfg.qd_offset != "auto" else auto
    out = Run("qdaif", cfg.out_dir, cfg.run, cfg, resume=bool(cfg.resume))
    archive, curve = Archive(grid, offset), []

    def save() -> Path:  # the end's files, of the finished batches (RUN/state stays for --resume)
        report(out, grid, archive, curve, bounds)
        return out.dir

    try:
        search(domain, grid, cfg, out, archive, curve)
    except KeyboardInterrupt:  # Ctrl-C: the map of the finished batches; one line, exit 130
        exit_interrupted(out, len(curve), "archive, poems and plots", save, unit="batch")
    return archive, report(out, grid, archive, curve, bounds), out.dir


def main() -> None:
    cfg = parse_config(Config, __doc__)
    if cfg.resume:  # the interrupted run's own flags: any given beside --resume are ignored
        cfg, step, _ = resume_run(Config, cfg.resume, "qdaif")
        start = f"resuming {cfg.resume} after batch {step}"
    else:
        run_dir(cfg.out_dir, cfg.run)  # refuse a used --run now, not after the model has loaded
        start = f"{cfg.iterations} candidates"
    threads = choose_threads(cfg.threads)
    print(f"QDAIF: {start}, torch threads: {threads}")
    started = time.perf_counter()
    sample = generate  # the writer's sampler; the optional fast layer is imported only when asked
    if cfg.sampler == "stream":
        from nanorlhf.fast.decode import generate_stream as sample
    seed_everything(cfg.seed)
    model_dir, dev = resolve_model(cfg.model), device()
    tok, model = Tokenizer(model_dir), load_model(model_dir, device=dev).eval()
    scorer, scorer_range = make_scorer(cfg, dev) if cfg.fitness != "ai" else (None, None)
    domain = PoetryDomain(model, tok, Grid(cfg.grid), cfg, sample, scorer, scorer_range)
    _, _, out = run(cfg, domain)
    minutes = (time.perf_counter() - started) / 60
    print(f"archive, poems and plots in {out} ({minutes:.1f} min)")


if __name__ == "__main__":
    run_cli(main)
