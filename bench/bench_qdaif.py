"""QDAIF's judging, before and after the prompt tree (nanorlhf/tasks/qdaif_judge.py), in one
process.

    OMP_NUM_THREADS=1 PYTHONPATH=. python bench/bench_qdaif.py [--model llama] [--repeats 3] \\
        [--batch-size 16]

Each round writes one batch of fresh poems (qdaif's init_batch), then judges it (labels_batch, then
fitness_batch with --fitness ai) with main's judging as of 24a5687 (MainJudge below, a copy: a
prefill per question, one more forward per multi-token option) and with qdaif.py's, in alternating
order. Prints poems/minute of the judging and of the whole batch (generation + judging) as medians
over the rounds after a warm-up round (which also computes both judges' content-free priors), their
ratio, whether the labels agree and the largest fitness difference, and the load average. Not a
test.
"""

import itertools
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

# the scripts, from the repository root
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import qdaif  # noqa: E402
from nanorlhf.checkpoint import load_model, resolve_model
from nanorlhf.model import autocast
from nanorlhf.run import flag, parse_config
from nanorlhf.sampling import left_pad, prefill
from nanorlhf.tokenizer import Tokenizer


@torch.no_grad()
def main_option_logprobs(model, prompts: list[list[int]], options: list[list[int]],
                         pad_id: int) -> torch.Tensor:
    """main's qdaif.option_logprobs: prefill the prompts, then one forward per option from the
    rewound cache."""
    dev = next(model.parameters()).device
    ids, mask = (t.to(dev) for t in left_pad(prompts, pad_id))
    B, P = ids.shape
    first, _, cache = prefill(model, ids, mask, max(len(o) for o in options))
    first = first.log_softmax(-1)
    with autocast(dev):
        scores = []
        for option in options:
            lp = first[:, option[0]]
            if len(option) > 1:
                cache.pos = P
                x = torch.tensor(option[:-1], device=dev).expand(B, -1)
                seen = torch.cat([mask, mask.new_ones(B, len(option) - 1)], 1)
                logits = model(x, seen, cache).float()
                nxt = torch.tensor(option[1:], device=dev)[None, :, None].expand(B, -1, 1)
                lp = lp + logits.log_softmax(-1).gather(-1, nxt).squeeze(-1).sum(-1)
            scores.append(lp)
    return torch.stack(scores, 1)


class MainJudge(qdaif.PoetryDomain):
    """main's labels_batch and fitness_batch: every question about the batch separately."""

    def choose(self, prompts: list[str], answers: list[str]) -> torch.Tensor:
        spellings = [sorted({a, a.capitalize()}) for a in answers]
        flat = [self.tok.encode(s) for group in spellings for s in group]
        chats = [self.tok.chat_prompt(p) for p in prompts]
        lp = main_option_logprobs(self.model, chats, flat, self.tok.pad_id)
        bounds = list(itertools.accumulate([0] + [len(g) for g in spellings]))
        return torch.stack([lp[:, i:j].logsumexp(-1) for i, j in zip(bounds, bounds[1:])], -1)

    def label_logprobs(self, texts: list[str], axis: str) -> torch.Tensor:
        values = self.grid.axes[axis]
        prompts = [qdaif.LABEL_PROMPT.format(poem=t, axis=axis, options=", ".join(values))
                   for t in texts]
        return self.choose(prompts, values).log_softmax(-1)

    def labels_batch(self, texts):
        judged = [{} for _ in texts]
        for axis, values in self.grid.axes.items():
            logps = self.label_logprobs(texts, axis)
            if self.cfg.calibrate:
                if axis not in self.priors:
                    self.priors[axis] = self.label_logprobs(list(qdaif.CONTENT_FREE), axis)
                logps = qdaif.calibrate(logps, self.priors[axis])
            for row, i in zip(judged, logps.argmax(-1).tolist()):
                row[axis] = values[i]
        return [row if t.strip() else None for row, t in zip(judged, texts)]

    def fitness_batch(self, texts, cells):
        lp = self.choose([qdaif.QUALITY_PROMPT.format(poem=t) for t in texts], ["yes", "no"])
        return torch.sigmoid(lp[:, 0] - lp[:, 1]).tolist()


def judge(domain, texts) -> tuple[float, list, list]:
    start = time.perf_counter()
    labels = domain.labels_batch(texts)
    fitness = domain.fitness_batch(texts, labels)
    return time.perf_counter() - start, labels, fitness


@dataclass
class Config:
    model: str = flag("llama", "checkpoint directory, local HF cache id, or 'llama' (embedded)")
    repeats: int = flag(3, "timed rounds (after one warm-up round)", min=1)
    batch_size: int = flag(16, "poems a batch", min=1)


def main() -> None:
    args = parse_config(Config, __doc__, prog="python bench/bench_qdaif.py")
    print(f"load average at the start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    model_dir = resolve_model(args.model)
    model, tok = load_model(model_dir).eval(), Tokenizer(model_dir)
    cfg, grid = qdaif.Config(model=args.model), qdaif.Grid(qdaif.POETRY_GRID)
    domains = {"main": MainJudge(model, tok, grid, cfg, qdaif.generate),
               "tree": qdaif.PoetryDomain(model, tok, grid, cfg, qdaif.generate)}
    seconds = {name: [] for name in ("gen", *domains)}
    same, diff = True, 0.0
    for r in range(args.repeats + 1):  # round 0 is a warm-up
        targets = [grid.labels(grid.keys[(7 * r + i) % len(grid.keys)])
                   for i in range(args.batch_size)]
        start = time.perf_counter()
        texts = domains["tree"].init_batch(targets, seed=r)
        gen = time.perf_counter() - start
        order = list(domains) if r % 2 else list(domains)[::-1]
        out = {name: judge(domains[name], texts) for name in order}
        same &= out["main"][1] == out["tree"][1]
        diff = max([diff] + [abs(a - b) for a, b in zip(out["main"][2], out["tree"][2])])
        if r:
            seconds["gen"].append(gen)
            for name in domains:
                seconds[name].append(out[name][0])
    per_min = lambda times: 60 * args.batch_size / statistics.median(times)
    whole = {name: [g + t for g, t in zip(seconds["gen"], seconds[name])] for name in domains}
    print(f"{args.batch_size} poems a batch, medians of {args.repeats} rounds, poems/minute:")
    for what, times in (("judging (labels + ai fitness)", seconds),
                        ("whole batch (generation + judging)", whole)):
        print(f"  {what}: main {per_min(times['main']):.1f}, tree {per_min(times['tree']):.1f}, "
              f"ratio {per_min(times['tree']) / per_min(times['main']):.2f}x")
    print(f"  generation alone: {per_min(seconds['gen']):.1f}")
    print(f"labels identical: {same}; largest |fitness difference|: {diff:.2e}")
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
