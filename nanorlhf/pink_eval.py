"""Pink-elephant evaluation: how often does a model mention what it was told not to?

    python -m nanorlhf.pink_eval --model llama --model out/train_dpo/run1/model [--data rows.jsonl]

For every row {"pink", "grey", "prompt"} the model gets the avoid-instruction as its system prompt
and the drifting question as the user turn; n samples per row at a fixed temperature and seed. The
pink rate is the fraction of samples that mention the pink entity (lower is better), the grey rate
the fraction that mention the alternative.

Saying nothing would score a perfect pink rate, so a degeneracy guard is reported next to it: mean
response length, distinct-2 (unique bigrams / all bigrams, over all samples) and the per-token NLL of
the samples under the *base* model (a policy that drifts into gibberish scores high there).
"""

import argparse
import json
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from nanorlhf.checkpoint import load_model, resolve_model
from nanorlhf.data import response_logps_batched
from nanorlhf.errors import run_cli
from nanorlhf.generate import LogitsHook, generate
from nanorlhf.pink import AVOID_TEMPLATE, HELDOUT_PATH, judge, load_eval_rows
from nanorlhf.tokenizer import Tokenizer


def avoid_messages(row: dict) -> list[dict]:
    """The conversation every pink-elephant prompt is posed in (training data uses the same one)."""
    return [{"role": "system", "content": AVOID_TEMPLATE.format(pink=row["pink"], grey=row["grey"])},
            {"role": "user", "content": row["prompt"]}]


def distinct_n(token_lists: list[list[int]], n: int = 2) -> float:
    grams = [tuple(t[i:i + n]) for t in token_lists for i in range(len(t) - n + 1)]
    return len(set(grams)) / max(len(grams), 1)


@torch.no_grad()
def mean_nll(model, prompts: list[list[int]], responses: list[list[int]], pad_id: int, batch_size: int = 16) -> float:
    """Per-token negative log-likelihood of `responses` (given their prompts) under `model`."""
    return -sum(response_logps_batched(model, prompts, responses, pad_id, batch_size)) / max(sum(map(len, responses)), 1)


def sample_responses(model, tok: Tokenizer, conversations: list[list[dict]], n: int, temperature: float, seed: int,
                     max_new_tokens: int, batch_size: int, logits_hook: LogitsHook | None = None,
                     desc: str = "sampling") -> tuple[list[list[int]], list[list[int]], list[str]]:
    """n samples for every conversation -> (prompt ids, response ids, response texts), conversation-major."""
    prompts = [tok.chat_prompt(messages) for messages in conversations for _ in range(n)]
    responses = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch", leave=False):
        out = generate(model, prompts[start:start + batch_size], max_new_tokens, tok.stop_ids, tok.pad_id,
                       temperature=temperature, seed=seed + start, logits_hook=logits_hook)
        responses += out.ids
    texts = [tok.decode(r) for r in responses]
    return prompts, responses, texts


def evaluate(model, tok: Tokenizer, rows: list[dict], base_model=None, n: int = 4, temperature: float = 0.7,
             seed: int = 0, max_new_tokens: int = 96, batch_size: int = 32, logits_hook: LogitsHook | None = None,
             desc: str = "eval") -> dict:
    """Pink/grey mention rates and the degeneracy guard for one model; `base_model` scores the NLL."""
    start = time.perf_counter()
    prompts, responses, texts = sample_responses(model, tok, [avoid_messages(r) for r in rows], n, temperature, seed, max_new_tokens,
                                                 batch_size, logits_hook, desc)
    verdicts = [judge(text, row) for text, row in zip(texts, (r for r in rows for _ in range(n)))]
    content = [[t for t in r if t not in tok.stop_ids] for r in responses]
    return {
        "pink_rate": sum(v["pink"] for v in verdicts) / len(verdicts),
        "grey_rate": sum(v["grey"] for v in verdicts) / len(verdicts),
        "mean_tokens": sum(map(len, content)) / len(content),
        "distinct_2": distinct_n(content, 2),
        "base_nll": mean_nll(base_model or model, prompts, responses, tok.pad_id),
        "samples": len(texts),
        "seconds": time.perf_counter() - start,
        "examples": [{"prompt": r["prompt"], "pink": r["pink"], "response": t}
                     for r, t in zip((r for r in rows for _ in range(n)), texts)],
    }


@dataclass
class EvalConfig:
    """The held-out evaluation flags of the training scripts (their Config inherits them)."""
    eval_data: str = field(default=str(HELDOUT_PATH), metadata={"help": "pink-elephant eval jsonl ({pink, grey, prompt}); '' to skip"})
    eval_n: int = field(default=2, metadata={"help": "samples per eval prompt"})
    eval_temperature: float = field(default=0.7, metadata={"help": "eval sampling temperature"})
    eval_max_new_tokens: int = field(default=80, metadata={"help": "eval response length cap"})
    eval_batch_size: int = field(default=56, metadata={"help": "eval generation batch size"})


def evaluate_as(cfg: EvalConfig, seed: int, model, tok: Tokenizer, rows: list[dict], base_model=None,
                logits_hook: LogitsHook | None = None, desc: str = "eval") -> dict:
    """evaluate() with a training script's eval flags."""
    return evaluate(model, tok, rows, base_model, cfg.eval_n, cfg.eval_temperature, seed, cfg.eval_max_new_tokens,
                    cfg.eval_batch_size, logits_hook, desc)


METRICS = [("pink mention rate (lower is better)", "pink_rate", "{:.1%}"), ("grey mention rate", "grey_rate", "{:.1%}"),
           ("mean response tokens", "mean_tokens", "{:.1f}"), ("distinct-2", "distinct_2", "{:.3f}"),
           ("NLL/token under base model", "base_nll", "{:.3f}")]


def format_table(results: dict[str, dict]) -> str:
    """Side-by-side table: one column per evaluated model."""
    names = list(results)
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label, key, fmt in METRICS:
        lines.append(f"| {label} | " + " | ".join(fmt.format(results[m][key]) for m in names) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True,
                        help="model to evaluate (repeat the flag to compare); the first one is the base for the NLL")
    parser.add_argument("--data", default=str(HELDOUT_PATH), help="jsonl of {pink, grey, prompt} rows")
    parser.add_argument("--n", type=int, default=4, help="samples per prompt")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write all results and samples to this json file")
    args = parser.parse_args()

    rows = load_eval_rows(args.data)
    dirs = [resolve_model(m) for m in args.model]
    tok = Tokenizer(dirs[0])
    base = load_model(dirs[0]).eval()
    results = {}
    for name, model_dir in zip(args.model, dirs):
        model = base if model_dir == dirs[0] else load_model(model_dir).eval()
        results[name] = evaluate(model, tok, rows, base, args.n, args.temperature, args.seed,
                                 args.max_new_tokens, args.batch_size, desc=name)
    print(f"{len(rows)} prompts x {args.n} samples, temperature {args.temperature}, seed {args.seed}")
    print(format_table(results))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    run_cli(main)
