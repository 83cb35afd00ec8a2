"""Held-out evaluation of a policy against its reference, one protocol for every method that is
compared on a reward-vs-KL frontier (train_ppo.py, experiments/frontier.py): n samples per prompt at
temperature 1 from a fixed seed, scored by any scorers, and KL(π‖π₀) estimated on the same samples.

KL(π‖π₀) = E_{y~π}[log π(y|x) - log π₀(y|x)]: the mean of the per-sample log-ratio is an unbiased
Monte Carlo estimate because the samples come from π (rest_loop.py evaluates the same way). The
sampler's seed and batch size fix the samples, so two runs that evaluate π₀ with the same settings
score the very same responses. A run's prompts and reward come from here too when they are a jsonl
of prompts and a gold scorer (prompt_rows, prompt_scorer).
"""

from collections.abc import Callable
from pathlib import Path

import torch

from nanorlhf.data import read_prompts
from nanorlhf.errors import UserError
from nanorlhf.reward import make_gold_scorer
from nanorlhf.step import response_logps_batched
from nanorlhf.sampling import Sampler, generate_batched, sample_responses
from nanorlhf.tasks.stats import mean_se
from nanorlhf.tokenizer import Tokenizer

# a scorer: (the row each response answers, the response texts) -> one float per response
Scorer = Callable[[list[dict], list[str]], list[float]]


def prompt_rows(path: str | Path, held_out: int) -> tuple[list[dict], list[dict]]:
    """A jsonl of {"prompt"} -> (training rows, the last `held_out` rows), each row with its chat
    "messages" (the prompt as one user turn)."""
    prompts = read_prompts(path)
    if len(prompts) <= held_out:
        raise UserError(f"{path}: {len(prompts)} prompts, but --eval-prompts {held_out} holds out "
                        "that many")
    rows = [{"prompt": p, "messages": [{"role": "user", "content": p}]} for p in prompts]
    return rows[:len(rows) - held_out], rows[len(rows) - held_out:]


def row_scorer(gold) -> Scorer:
    """A GoldScorer (reward.py) as a Scorer: each response scored with its row's prompt."""
    return lambda rows, texts: gold.score([r["prompt"] for r in rows], texts)


def prompt_scorer(spec: str, device) -> Scorer:
    """vader | rm:PATH (reward.make_gold_scorer) as a Scorer (row_scorer)."""
    return row_scorer(make_gold_scorer(spec, device=device))


@torch.no_grad()
def evaluate_policy(policy, ref, tok: Tokenizer, rows: list[dict], scorers: dict[str, Scorer],
                    n: int, seed: int, max_new_tokens: int, batch_size: int, desc: str = "eval",
                    sampler: Sampler = generate_batched, greedy: bool = False) -> dict:
    """rows: held-out prompts, each with its chat "messages". -> {name: mean, name_se: SE,
    name_by_prompt: the mean of each row's n samples, for each scorer; kl, kl_se, eos_rate,
    mean_tokens, samples, examples}; greedy: also name_greedy, _se, _by_prompt, the scores of one
    greedy reply per row (for a 0/1 reward: greedy accuracy).

    `ref` is π₀ (a model or a LoRA BaseView); the SEs are over the len(rows)·n samples."""
    prompts, responses, texts = sample_responses(policy, tok, [r["messages"] for r in rows], n, 1.0,
                                                 seed, max_new_tokens, batch_size, desc=desc,
                                                 sampler=sampler)
    asked = [r for r in rows for _ in range(n)]  # row-major, as sample_responses returns
    kl = [a - b for a, b in zip(response_logps_batched(policy, prompts, responses, tok.pad_id),
                                response_logps_batched(ref, prompts, responses, tok.pad_id))]
    out = {}
    for name, score in scorers.items():
        scores = score(asked, texts)
        out[name], out[f"{name}_se"] = mean_se(scores)
        # per-prompt means: two evaluations of the same prompts compare prompt by prompt
        # (paired_gain)
        out[f"{name}_by_prompt"] = [sum(scores[i:i + n]) / n for i in range(0, len(scores), n)]
    if greedy:  # temperature 0: what the policy answers when asked once (no seed involved)
        _, _, first = sample_responses(policy, tok, [r["messages"] for r in rows], 1, 0.0, seed,
                                       max_new_tokens, batch_size, desc=f"{desc} greedy",
                                       sampler=sampler)
        for name, score in scorers.items():
            scores = score(rows, first)
            out[f"{name}_greedy"], out[f"{name}_greedy_se"] = mean_se(scores)
            out[f"{name}_greedy_by_prompt"] = scores
    out["kl"], out["kl_se"] = mean_se(kl)
    stopped = sum(bool(r) and r[-1] in tok.stop_ids for r in responses)
    examples = [{"prompt": r["messages"][-1]["content"], "response": t}
                for r, t in zip(asked, texts)][:8]
    return {**out, "eos_rate": stopped / len(responses),
            "mean_tokens": sum(map(len, responses)) / len(responses), "samples": len(texts),
            "examples": examples}


def paired_gain(before: list[float], after: list[float]) -> tuple[float, float]:
    """Per-prompt means of two evaluations on the same prompts -> (mean gain, its SE over prompts).
    Pairing by prompt removes the spread between prompts (some invite happier answers than others)
    from the gain's noise; the samples themselves are independent draws of the two policies."""
    return mean_se([a - b for a, b in zip(after, before, strict=True)])


def report(before: dict, after: dict, name: str, gold: str = "") -> str:
    """Two evaluate_policy results on the same prompts -> a markdown table (reward and, when the
    reward is a proxy, the `gold` scorer's; their greedy replies' when evaluated; KL; EOS rate;
    length) and each gain, paired by prompt."""
    scored = ("reward", "gold") if gold else ("reward",)
    greedy = tuple(f"{k}_greedy" for k in scored if f"{k}_greedy" in before)
    header = "| policy | reward ± SE |" + (f" gold ({gold}) ± SE |" if gold else "")
    header += "".join(f" {k.replace('_', ' (')}) ± SE |" for k in greedy)  # "reward (greedy)"
    lines = [header + " KL(π‖π₀) ± SE | EOS rate | tokens |",
             "|---|---|---|---|---|" + "---|" * (bool(gold) + len(greedy))]
    scored += greedy
    for label, r in (("π₀", before), (name, after)):
        cells = "".join(f" {r[k]:+.3f} ± {r[k + '_se']:.3f} |" for k in scored)
        lines.append(f"| {label} |{cells} {r['kl']:.3f} ± {r['kl_se']:.3f} | "
                     f"{r['eos_rate']:.2f} | {r['mean_tokens']:.1f} |")
    for key in scored:
        gain, se = paired_gain(before[f"{key}_by_prompt"], after[f"{key}_by_prompt"])
        prompts = len(before[f"{key}_by_prompt"])
        lines.append(f"{key} gain {gain:+.3f} ± {se:.3f} (SE over the {prompts} prompts, "
                     "paired by prompt)")
    return "\n".join(lines)
