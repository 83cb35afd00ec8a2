"""Pink-elephant evaluation: how often does a model mention what it was told not to?

    python -m nanorlhf.pink_eval --model llama --model out/train_dpo/run1/model [--data rows.jsonl]
    python -m nanorlhf.pink_eval --model llama --ilql-heads out/train_ilql/run1 --beta 8   # ILQL decoding

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
from dataclasses import dataclass
from pathlib import Path

import torch

from nanorlhf import cli, distributed
from nanorlhf.atomic import atomic_write_text
from nanorlhf.checkpoint import load_model, resolve_model
from nanorlhf.data import response_logps_batched
from nanorlhf.errors import UserError, run_cli
from nanorlhf.generate import LogitsHook, generate
from nanorlhf.ilql_heads import ilql_logits_hook, load_heads
from nanorlhf.pink import AVOID_TEMPLATE, HELDOUT_PATH, judge, load_eval_rows
from nanorlhf.stream import generate_stream
from nanorlhf.tokenizer import Tokenizer

Ids = list[list[int]]  # token ids, one list per prompt or response


def avoid_messages(row: dict) -> list[dict]:
    """The conversation every pink-elephant prompt is posed in (training data uses the same one)."""
    return [{"role": "system", "content": AVOID_TEMPLATE.format(pink=row["pink"], grey=row["grey"])},
            {"role": "user", "content": row["prompt"]}]


def distinct_n(token_lists: list[list[int]], n: int = 2) -> float:
    grams = [tuple(t[i:i + n]) for t in token_lists for i in range(len(t) - n + 1)]
    return len(set(grams)) / max(len(grams), 1)


@torch.no_grad()
def mean_nll(model, prompts: Ids, responses: Ids, pad_id: int, batch_size: int = 16) -> float:
    """Per-token negative log-likelihood of `responses` (given their prompts) under `model`."""
    logps = response_logps_batched(model, prompts, responses, pad_id, batch_size)
    return -sum(logps) / max(sum(map(len, responses)), 1)


def sample_responses(model, tok: Tokenizer, conversations: list[list[dict]], n: int, temperature: float,
                     seed: int, max_new_tokens: int, batch_size: int, logits_hook: LogitsHook | None = None,
                     desc: str = "sampling", stream: bool = False) -> tuple[Ids, Ids, list[str]]:
    """n samples for every conversation -> (prompt ids, response ids, response texts), conversation-major.
    stream: continuous batching through batch_size rows (nanorlhf/stream.py; other tokens than batches)."""
    prompts = [tok.chat_prompt(messages) for messages in conversations for _ in range(n)]
    if stream:
        bar = distributed.bar(total=len(prompts) * max_new_tokens, desc=desc, unit="tok", leave=False)
        responses = generate_stream(model, prompts, max_new_tokens, tok.stop_ids, tok.pad_id, batch_size,
                                    temperature, seed=seed, logits_hook=logits_hook, progress=bar.update).ids
        bar.close()
        return prompts, responses, [tok.decode(r) for r in responses]
    responses = []
    for start in distributed.bar(range(0, len(prompts), batch_size), desc=desc, unit="batch", leave=False):
        out = generate(model, prompts[start:start + batch_size], max_new_tokens, tok.stop_ids, tok.pad_id,
                       temperature=temperature, seed=seed + start, logits_hook=logits_hook)
        responses += out.ids
    texts = [tok.decode(r) for r in responses]
    return prompts, responses, texts


def sample_eval(model, tok: Tokenizer, rows: list[dict], n: int = 4, temperature: float = 0.7, seed: int = 0,
                max_new_tokens: int = 96, batch_size: int = 32, logits_hook: LogitsHook | None = None,
                desc: str = "eval") -> tuple[dict, Ids, Ids]:
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
        "base_nll": None,  # the base model's verdict, filled in by the caller (the key keeps its place)
        "samples": len(texts),
        "seconds": time.perf_counter() - start,
        "examples": [{"prompt": r["prompt"], "pink": r["pink"], "response": t}
                     for r, t in zip((r for r in rows for _ in range(n)), texts)],
    }, prompts, responses


def score_nll(result: dict, base_model, prompts: Ids, responses: Ids, pad_id: int) -> dict:
    """sample_eval's result with base_nll under `base_model` (and its time added to the result's)."""
    start = time.perf_counter()
    nll = mean_nll(base_model, prompts, responses, pad_id)
    return {**result, "base_nll": nll, "seconds": result["seconds"] + time.perf_counter() - start}


def evaluate(model, tok: Tokenizer, rows: list[dict], base_model=None, n: int = 4, temperature: float = 0.7,
             seed: int = 0, max_new_tokens: int = 96, batch_size: int = 32,
             logits_hook: LogitsHook | None = None, desc: str = "eval") -> dict:
    """Pink/grey mention rates and the degeneracy guard for one model; `base_model` scores the NLL."""
    result, prompts, responses = sample_eval(model, tok, rows, n, temperature, seed, max_new_tokens,
                                             batch_size, logits_hook, desc)
    return score_nll(result, base_model or model, prompts, responses, tok.pad_id)


@dataclass
class EvalConfig:
    """The held-out evaluation flags of the training scripts (their Config inherits them)."""
    eval_data: str = cli.flag(str(HELDOUT_PATH), "pink-elephant eval jsonl ({pink, grey, prompt}); '' skips")
    eval_n: int = cli.flag(2, "samples per eval prompt", min=1)
    eval_temperature: float = cli.flag(0.7, "eval sampling temperature (0 = greedy)", min=0.0)
    eval_max_new_tokens: int = cli.flag(80, "eval response length cap", min=1)
    eval_batch_size: int = cli.flag(56, "eval generation batch size", min=1)


def evaluate_as(cfg: EvalConfig, seed: int, model, tok: Tokenizer, rows: list[dict], base_model=None,
                logits_hook: LogitsHook | None = None, desc: str = "eval") -> dict:
    """evaluate() with a training script's eval flags."""
    return evaluate(model, tok, rows, base_model, cfg.eval_n, cfg.eval_temperature, seed,
                    cfg.eval_max_new_tokens, cfg.eval_batch_size, logits_hook, desc)


METRICS = [("pink mention rate (lower is better)", "pink_rate", "{:.1%}"),
           ("grey mention rate", "grey_rate", "{:.1%}"), ("mean response tokens", "mean_tokens", "{:.1f}"),
           ("distinct-2", "distinct_2", "{:.3f}"),
           ("NLL/token under base model", "base_nll", "{:.3f}")]


def format_table(results: dict[str, dict]) -> str:
    """Side-by-side table: one column per evaluated model."""
    names = list(results)
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label, key, fmt in METRICS:
        lines.append(f"| {label} | " + " | ".join(fmt.format(results[m][key]) for m in names) + " |")
    return "\n".join(lines)


def ilql_run(run_dir: str, base_dir: Path) -> tuple[Path, Path, dict]:
    """A train_ilql run directory -> (its heads file, the LM they steer, its config). The LM is the run's
    own when it trained one (--train-lm true), else the base: the heads were fitted to its hidden states."""
    run = Path(run_dir)
    heads, config = run / "ilql_heads.safetensors", run / "config.json"
    if not heads.is_file() or not config.is_file():
        raise UserError(f"--ilql-heads {run_dir}: no ilql_heads.safetensors and config.json there "
                        "(not a finished train_ilql run directory)")
    cfg = json.loads(config.read_text())
    if cfg.get("train_lm") and not (run / "model").is_dir():
        raise UserError(f"--ilql-heads {run_dir}: the run trained its LM, but {run / 'model'} is missing")
    return heads, run / "model" if cfg.get("train_lm") else base_dir, cfg


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True,
                        help="model to evaluate (repeat to compare); the first one is the base for the NLL")
    parser.add_argument("--data", default=str(HELDOUT_PATH), help="jsonl of {pink, grey, prompt} rows")
    parser.add_argument("--n", type=int, default=4, help="samples per prompt")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write all results and samples to this json file")
    parser.add_argument("--ilql-heads", default="", metavar="RUN_DIR",
                        help="a train_ilql run: also sample its LM (the first --model if the LM was frozen) "
                             "steered by its heads")
    parser.add_argument("--beta", type=float, action="append",
                        help="--ilql-heads: decoding β, one column each (repeat the flag; default 8)")
    parser.add_argument("--gen-style", choices=("snell", "trlx"), help="--ilql-heads: default the run's")
    parser.add_argument("--top-k", type=int, help="--ilql-heads: default the run's --eval-top-k")
    args = parser.parse_args(argv)
    if not args.ilql_heads and (args.beta or args.gen_style or args.top_k is not None):
        raise UserError("--beta, --gen-style and --top-k steer ILQL heads: add --ilql-heads RUN_DIR")
    if any(b < 0 for b in args.beta or []) or (args.top_k or 0) < 0:
        raise UserError("--beta and --top-k must be >= 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rows = load_eval_rows(args.data)
    dirs = [resolve_model(m) for m in args.model]
    tok, dev = Tokenizer(dirs[0]), cli.device()  # on CUDA generate() and the NLL run under bf16 autocast

    def sample(model, name: str, hook: LogitsHook | None = None):
        return sample_eval(model.eval(), tok, rows, args.n, args.temperature, args.seed, args.max_new_tokens,
                           args.batch_size, hook, name)

    # One model resident at a time: each samples and is freed (its last reference goes when sample()
    # returns), then the base scores every model's samples. The ILQL columns go first: bad heads fail fast.
    steered = {}
    if args.ilql_heads:
        heads_path, policy_dir, run_cfg = ilql_run(args.ilql_heads, dirs[0])
        style, top_k = args.gen_style or run_cfg.get("gen_style", "snell"), args.top_k
        top_k = run_cfg.get("eval_top_k", 0) if top_k is None else top_k
        policy = load_model(policy_dir, device=dev)
        heads = load_heads(heads_path, policy)
        for beta in args.beta or [8.0]:
            hook = ilql_logits_hook(heads, beta, args.temperature, top_k, style)
            steered[f"ILQL β={beta:g}"] = sample(policy, f"ILQL beta={beta:g}", hook)
        del policy, heads, hook
    sampled = {name: sample(load_model(d, device=dev), name) for name, d in zip(args.model, dirs)}
    base = load_model(dirs[0], device=dev).eval()
    results = {name: score_nll(r, base, prompts, responses, tok.pad_id)
               for name, (r, prompts, responses) in {**sampled, **steered}.items()}
    print(f"{len(rows)} prompts x {args.n} samples, temperature {args.temperature}, seed {args.seed}"
          + (f"; ILQL heads {args.ilql_heads} ({style} style, top-k {top_k or 'off'})" if steered else ""))
    print(format_table(results))
    if args.out:
        atomic_write_text(args.out, json.dumps(results, indent=1))


if __name__ == "__main__":
    run_cli(main)
