"""Held-out evaluation of a policy against its reference, one protocol for every method that is
compared on a reward-vs-KL frontier (train_ppo.py, experiments/frontier.py): n samples per prompt at
temperature 1 from a fixed seed, scored by any scorers, and KL(π‖π₀) estimated on the same samples.

KL(π‖π₀) = E_{y~π}[log π(y|x) - log π₀(y|x)]: the mean of the per-sample log-ratio is an unbiased
Monte Carlo estimate because the samples come from π (rest_loop.py evaluates the same way). The
sampler's seed and batch size fix the samples, so two runs that evaluate π₀ with the same settings
score the very same responses.
"""

from collections.abc import Callable

import torch

from nanorlhf.step import response_logps_batched
from nanorlhf.sampling import Sampler, generate_batched, sample_responses
from nanorlhf.tasks.stats import mean_se
from nanorlhf.tokenizer import Tokenizer

# a scorer: (the row each response answers, the response texts) -> one float per response
Scorer = Callable[[list[dict], list[str]], list[float]]


@torch.no_grad()
def evaluate_policy(policy, ref, tok: Tokenizer, rows: list[dict], scorers: dict[str, Scorer],
                    n: int, seed: int, max_new_tokens: int, batch_size: int, desc: str = "eval",
                    sampler: Sampler = generate_batched) -> dict:
    """rows: held-out prompts, each with its chat "messages". -> {name: mean, name_se: SE,
    name_by_prompt: the mean of each row's n samples, for each scorer; kl, kl_se, eos_rate,
    mean_tokens, samples, examples}.

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
    reward is a proxy, the `gold` scorer's; KL; EOS rate; length) and each gain, paired by
    prompt."""
    scored = ("reward", "gold") if gold else ("reward",)
    header = "| policy | reward ± SE |" + (f" gold ({gold}) ± SE |" if gold else "")
    lines = [header + " KL(π‖π₀) ± SE | EOS rate | tokens |",
             "|---|---|---|---|---|" + "---|" * bool(gold)]
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
