"""Build the pink-elephant DPO pairs from the embedded model itself (seeded, reproducible).

    python data/build_pink_data.py [--model llama] [--out data/pink_dpo_train.jsonl]

For every *train* entity pair and each of its drifting prompts, the model answers in three settings:
  avoid    the avoid-instruction as system prompt (the setting we evaluate; ~half mention pink)
  plain    no instruction (the model's default system prompt): what it naturally says, pink and all
  steered  a system prompt that asks for the grey entity outright
Every answer is judged by the rule judge. Rejected = an answer that mentions pink (avoid first, then
plain); chosen = an answer that does not (those that name grey first: we want the pivot, not
silence). The prompt of every pair is the *avoid* conversation, so DPO learns: under this
instruction, prefer the pivot to the slip (steered answers are context-distilled into it). Held-out
pairs are never sampled here.
"""

import argparse
import json
import random
import re
from pathlib import Path

import torch

from nanorlhf.atomic import atomic_write_text
from nanorlhf.checkpoint import load_model, resolve_model
from nanorlhf.errors import run_cli
from nanorlhf.tasks.pink import PAIRS_PATH, avoid_messages, eval_rows_from_pairs, judge, load_pairs
from nanorlhf.sampling import sample_responses
from nanorlhf.tokenizer import Tokenizer

STEER_TEMPLATE = "You are a fan of {grey}. Whatever the user asks, answer by talking about {grey}."


def complete_sentences(text: str, stopped: bool) -> str | None:
    """A response cut off by the token limit is trimmed to its last full sentence (None if there
    is none)."""
    text = text.strip()
    if stopped:
        return text or None
    ends = [m.end() for m in re.finditer(r"[.!?](?=\s|$)", text)]
    return text[:ends[-1]] if ends else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama")
    parser.add_argument("--pairs", default=str(PAIRS_PATH))
    parser.add_argument("--out", default=str(Path(__file__).parent / "pink_dpo_train.jsonl"))
    parser.add_argument("--samples", type=int, default=4,
                        help="answers per prompt and setting (avoid)")
    parser.add_argument("--extra-samples", type=int, default=2,
                        help="answers per prompt for plain and steered")
    parser.add_argument("--pairs-per-prompt", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=80)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--batch-size", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    rows = eval_rows_from_pairs(load_pairs(args.pairs), "train")
    model_dir = resolve_model(args.model)
    model, tok = load_model(model_dir).eval(), Tokenizer(model_dir)
    settings = {
        "avoid": ([avoid_messages(r) for r in rows], args.samples),
        "plain": ([[{"role": "user", "content": r["prompt"]}] for r in rows], args.extra_samples),
        "steered": ([[{"role": "system", "content": STEER_TEMPLATE.format(grey=r["grey"])},
                      {"role": "user", "content": r["prompt"]}] for r in rows], args.extra_samples),
    }
    answers = {i: [] for i in range(len(rows))}  # row index -> [(setting, text, verdict)]
    for setting, (conversations, n) in settings.items():
        _, responses, texts = sample_responses(model, tok, conversations, n, args.temperature,
                                               args.seed, args.max_new_tokens, args.batch_size,
                                               desc=setting)
        for k, (ids, text) in enumerate(zip(responses, texts)):
            text = complete_sentences(text, stopped=bool(ids) and ids[-1] in tok.stop_ids)
            if text:
                answers[k // n].append((setting, text, judge(text, rows[k // n])))

    rng = random.Random(args.seed)
    out_rows, stats = [], {"prompts": len(rows), "prompts_with_pairs": 0}
    for i, row in enumerate(rows):
        order = {"avoid": 0, "plain": 1, "steered": 2}
        rejected = sorted((a for a in answers[i] if a[2]["pink"] and a[0] != "steered"),
                          key=lambda a: order[a[0]])
        chosen = sorted((a for a in answers[i] if not a[2]["pink"]),
                        key=lambda a: (not a[2]["grey"], order[a[0]]))
        n_pairs = min(len(chosen), len(rejected), args.pairs_per_prompt)
        stats["prompts_with_pairs"] += n_pairs > 0
        for c, r in zip(chosen[:n_pairs], rejected[:n_pairs]):
            out_rows.append({"prompt": avoid_messages(row),
                             "chosen": [{"role": "assistant", "content": c[1]}],
                             "rejected": [{"role": "assistant", "content": r[1]}],
                             "pink": row["pink"], "grey": row["grey"], "pair_id": row["pair_id"],
                             "domain": row["domain"], "chosen_from": c[0], "rejected_from": r[0],
                             "chosen_mentions_grey": c[2]["grey"]})
    rng.shuffle(out_rows)
    for setting in settings:
        verdicts = [a[2]["pink"] for i in answers for a in answers[i] if a[0] == setting]
        stats[f"{setting}_pink_rate"] = round(sum(verdicts) / max(len(verdicts), 1), 3)
    stats["pairs"] = len(out_rows)
    # never a half-written data file
    atomic_write_text(args.out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out_rows))
    print(json.dumps(stats))


if __name__ == "__main__":
    run_cli(main)
