"""Pink-elephant evaluation: how often does a model mention what it was told not to?

    python tools/pink_eval.py --model llama --model out/train_dpo/run1/model [--data rows.jsonl]

For every row {"pink", "grey", "prompt"} the model gets the avoid-instruction as its system prompt
and the drifting question as the user turn; n samples per row at a fixed temperature and seed. The
pink rate is the fraction of samples that mention the pink entity (lower is better), the grey rate
the fraction that mention the alternative.

Saying nothing would score a perfect pink rate, so a degeneracy guard is reported next to it: mean
response length, distinct-2 (unique bigrams / all bigrams, over all samples) and the per-token NLL
of the samples under the *base* model (a policy that drifts into gibberish scores high there).
"""

import time

import torch

from nanorlhf.logprobs import response_logps_batched
from nanorlhf.sampling import Ids, LogitsHook, sample_responses
from nanorlhf.tasks.pink import avoid_messages, judge
from nanorlhf.tokenizer import Tokenizer


def distinct_n(token_lists: list[list[int]], n: int = 2) -> float:
    grams = [tuple(t[i:i + n]) for t in token_lists for i in range(len(t) - n + 1)]
    return len(set(grams)) / max(len(grams), 1)


@torch.no_grad()
def mean_nll(model, prompts: Ids, responses: Ids, pad_id: int, batch_size: int = 16) -> float:
    """Per-token negative log-likelihood of `responses` (given their prompts) under `model`."""
    logps = response_logps_batched(model, prompts, responses, pad_id, batch_size)
    return -sum(logps) / max(sum(map(len, responses)), 1)


def sample_eval(model, tok: Tokenizer, rows: list[dict], n: int = 4, temperature: float = 0.7,
                seed: int = 0, max_new_tokens: int = 96, batch_size: int = 32,
                logits_hook: LogitsHook | None = None, desc: str = "eval") -> tuple[dict, Ids, Ids]:
    """evaluate() up to the NLL: -> (its results with base_nll None, prompt ids, response ids)."""
    start = time.perf_counter()
    conversations = [avoid_messages(r) for r in rows]
    prompts, responses, texts = sample_responses(model, tok, conversations, n, temperature, seed,
                                                 max_new_tokens, batch_size, logits_hook, desc)
    verdicts = [judge(text, row) for text, row in zip(texts, (r for r in rows for _ in range(n)))]
    content = [[t for t in r if t not in tok.stop_ids] for r in responses]
    return {
        "pink_rate": sum(v["pink"] for v in verdicts) / len(verdicts),
        "grey_rate": sum(v["grey"] for v in verdicts) / len(verdicts),
        "mean_tokens": sum(map(len, content)) / len(content),
        "distinct_2": distinct_n(content, 2),
        "base_nll": None,  # the base model's verdict, from score_nll (the key keeps its place)
        "samples": len(texts),
        "seconds": time.perf_counter() - start,
        "examples": [{"prompt": r["prompt"], "pink": r["pink"], "response": t}
                     for r, t in zip((r for r in rows for _ in range(n)), texts)],
    }, prompts, responses


def score_nll(result: dict, base_model, prompts: Ids, responses: Ids, pad_id: int) -> dict:
    """sample_eval's result with base_nll under `base_model` (and its time added to the
    result's)."""
    start = time.perf_counter()
    nll = mean_nll(base_model, prompts, responses, pad_id)
    return {**result, "base_nll": nll, "seconds": result["seconds"] + time.perf_counter() - start}


def evaluate(model, tok: Tokenizer, rows: list[dict], base_model=None, n: int = 4,
             temperature: float = 0.7, seed: int = 0, max_new_tokens: int = 96,
             batch_size: int = 32, logits_hook: LogitsHook | None = None,
             desc: str = "eval") -> dict:
    """Pink/grey mention rates and the degeneracy guard for one model; `base_model` scores the
    NLL."""
    result, prompts, responses = sample_eval(model, tok, rows, n, temperature, seed, max_new_tokens,
                                             batch_size, logits_hook, desc)
    return score_nll(result, base_model or model, prompts, responses, tok.pad_id)


def evaluate_as(cfg, seed: int, model, tok: Tokenizer, rows: list[dict], base_model=None,
                logits_hook: LogitsHook | None = None, desc: str = "eval") -> dict:
    """evaluate() with a training script's eval flags: `cfg` is its Config, read for eval_n,
    eval_temperature, eval_max_new_tokens and eval_batch_size."""
    return evaluate(model, tok, rows, base_model, cfg.eval_n, cfg.eval_temperature, seed,
                    cfg.eval_max_new_tokens, cfg.eval_batch_size, logits_hook, desc)


METRICS = [("pink mention rate (lower is better)", "pink_rate", "{:.1%}"),
           ("grey mention rate", "grey_rate", "{:.1%}"),
           ("mean response tokens", "mean_tokens", "{:.1f}"),
           ("distinct-2", "distinct_2", "{:.3f}"),
           ("NLL/token under base model", "base_nll", "{:.3f}")]


def format_table(results: dict[str, dict]) -> str:
    """Side-by-side table: one column per evaluated model."""
    names = list(results)
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label, key, fmt in METRICS:
        cells = " | ".join(fmt.format(results[m][key]) for m in names)
        lines.append(f"| {label} | {cells} |")
    return "\n".join(lines)
