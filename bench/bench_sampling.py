"""Sampling throughput of the RL scripts' workloads: generate() in batches against continuous
batching.

    python bench/bench_sampling.py [--model llama] [--repeats 3] [--threads 1]

Two workloads:
- ReST's grow (rest_loop.py defaults): 48 prompts x 4 samples, up to 40 new tokens, T = 1;
  before: sampling.sample_responses in batches of 48 (what rest_loop does); after:
  stream.generate_stream with 48, 96 and 192 rows.
- QDAIF's writing (qdaif.py defaults): 16 chat prompts, up to 64 new tokens, T = 0.8, top-p 0.95;
  one batch of 16 either way (MAP-Elites needs each batch's poems before it picks the next
  parents), so what changes is the sampler (no vocabulary sort for top-p, one uniform per token)
  and dropping stopped rows.
Every measurement runs in a fresh process, as a script's first sampling call would (stream packs the
weights for oneDNN once per process, nanorlhf/fast/packed.py, and that cost is counted), the
variants alternating round by round; medians of --repeats. Tokens/s counts the tokens kept (up to
and including the stop id), not pad steps. Not a test.
"""

import argparse
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # nanorlhf from this checkout
from nanorlhf.checkpoint import load_model, resolve_model  # noqa: E402
from nanorlhf.data import read_prompts  # noqa: E402
from nanorlhf.fast.decode import generate_stream  # noqa: E402
from nanorlhf.sampling import generate, sample_responses  # noqa: E402
from nanorlhf.tokenizer import Tokenizer  # noqa: E402

REST_PROMPTS = os.path.join(os.path.dirname(__file__), "..", "data", "rest_prompts.jsonl")
QDAIF_PROMPT = "Write a {tone} {genre} about {topic}. Reply with the poem only."


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


VARIANTS = ("ReST grow, generate() x 48", "ReST grow, stream 48 rows",
            "ReST grow, stream 96 rows", "ReST grow, stream 192 rows",
            "QDAIF batch, generate() x 16", "QDAIF batch, stream 16 rows")


def run_one(name: str, model_name: str) -> float:
    """Load the model and sample the variant `name` once -> tokens/s."""
    model_dir = resolve_model(model_name)
    tok, model = Tokenizer(model_dir), load_model(model_dir).eval()
    chats = [[{"role": "user", "content": p}] for p in read_prompts(REST_PROMPTS)[:48]]
    rest_ids = [tok.chat_prompt(c) for c in chats for _ in range(4)]
    rng = random.Random(0)
    poems = [tok.chat_prompt(QDAIF_PROMPT.format(tone=rng.choice(["happy", "dark", "romantic"]),
                                                 genre=rng.choice(["haiku", "sonnet", "ballad"]),
                                                 topic=rng.choice(["the sea", "first snow",
                                                                   "the stars"])))
             for _ in range(16)]
    stops, pad = tok.stop_ids, tok.pad_id
    if name.startswith("ReST grow, generate()"):
        fn = lambda: sample_responses(model, tok, chats, 4, 1.0, 0, 40, 48)[1]
    elif name.startswith("ReST grow, stream"):
        rows = int(name.split()[3])
        fn = lambda: generate_stream(model, rest_ids, 40, stops, pad, rows, 1.0, seed=0).ids
    elif name.startswith("QDAIF batch, generate()"):
        fn = lambda: generate(model, poems, 64, stops, pad, 0.8, top_p=0.95, seed=0).ids
    else:
        fn = lambda: generate_stream(model, poems, 64, stops, pad, 16, 0.8, top_p=0.95, seed=0).ids
    seconds, ids = timed(fn)
    return sum(map(len, ids)) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="llama")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--one", choices=VARIANTS, help=argparse.SUPPRESS)  # a child's variant
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        print(run_one(args.one, args.model))
        return
    print(f"torch {torch.__version__}, {args.threads} thread(s), "
          f"load average {os.getloadavg()[0]:.2f}")
    rates = {name: [] for name in VARIANTS}
    for r in range(args.repeats):
        for name in VARIANTS:
            child = subprocess.run([sys.executable, __file__, "--model", args.model,
                                    "--threads", str(args.threads), "--one", name],
                                   check=True, capture_output=True, text=True)
            rates[name].append(float(child.stdout.split()[-1]))
        print(f"round {r + 1}/{args.repeats} done, load average {os.getloadavg()[0]:.2f}",
              flush=True)
    base = {"ReST": statistics.median(rates[VARIANTS[0]]),
            "QDAIF": statistics.median(rates[VARIANTS[4]])}
    print(f"\n| workload | tokens/s (median of {args.repeats}) | vs generate() |\n|---|---|---|")
    for name, values in rates.items():
        med = statistics.median(values)
        print(f"| {name} | {med:.1f} | {med / base[name.split()[0]]:.2f}x |")


if __name__ == "__main__":
    main()
