"""Pink-elephant evaluation of saved models, side by side: how often does each mention what it was
told not to? (nanorlhf/tasks/pink_eval.py)

    python tools/pink_eval.py --model llama --model out/train_dpo/run1/model [--data rows.jsonl]
    python tools/pink_eval.py --model llama --ilql-heads out/train_ilql/run1 --beta 8   # ILQL decoding
"""

import argparse
import json
from pathlib import Path

from nanorlhf.atomic import atomic_write_text
from nanorlhf.checkpoint import load_model, resolve_model
from nanorlhf.errors import UserError, run_cli
from nanorlhf.ilql_heads import ilql_logits_hook, load_heads
from nanorlhf.model import device
from nanorlhf.sampling import LogitsHook
from nanorlhf.tasks.pink import HELDOUT_PATH, load_eval_rows
from nanorlhf.tasks.pink_eval import format_table, sample_eval, score_nll
from nanorlhf.tokenizer import Tokenizer


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
    tok, dev = Tokenizer(dirs[0]), device()  # on CUDA generate() and the NLL run under bf16 autocast

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
