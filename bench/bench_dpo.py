"""DPO step cost on the embedded SmolLM2-135M: steps/s, peak memory, and where the time goes.

    python bench/bench_dpo.py [--model llama] [--steps 6] [--batch-size 4] [--grad-accum 2]

Uses the real pink-elephant pairs. Splits one optimizer step into reference scoring (done once per
pair before training, reported per step-equivalent), policy forward, backward, and the optimizer
update. Peak memory is the process's peak resident set on CPU, max allocated on CUDA. Not a test.
bench/bench_lora.py reuses setup(), reference() and timed_steps().
"""

import sys
from pathlib import Path
import argparse
import resource
import statistics
import time

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the scripts, from the repo root
import train_dpo  # noqa: E402
from nanorlhf import step as logprobs, lora
from nanorlhf.checkpoint import load_model, resolve_model
from nanorlhf.model import device
from nanorlhf.data import read_preferences
from nanorlhf.tokenizer import Tokenizer


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def peak_mib(dev) -> float:
    """Peak memory so far: max allocated on CUDA, the process's peak resident set on CPU."""
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def add_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", default="llama")
    parser.add_argument("--data", default="data/pink_dpo_train.jsonl")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=2)
    return parser


def setup(args, dev):
    """-> model (fp32, on dev), pad id, the micro-batches of pairs for args.steps steps, train
    tokens per step."""
    model_dir = resolve_model(args.model)
    tok, model = Tokenizer(model_dir), load_model(model_dir, device=dev)
    n_pairs = args.steps * args.batch_size * args.grad_accum
    rows = read_preferences(args.data)[:n_pairs]
    pairs, _ = train_dpo.tokenize_pairs(rows, tok, 192, model.cfg.vocab_size)
    batches = [pairs[i:i + args.batch_size] for i in range(0, len(pairs), args.batch_size)]
    tokens_per_step = 2 * sum(len(p["prompt"]) + (len(p["chosen"]) + len(p["rejected"])) / 2
                              for p in pairs) / args.steps
    return model, tok.pad_id, batches, tokens_per_step


def reference(model, batches, pad_id, dev) -> float:
    """Reference log-probs of every pair (adapters off, if any) -> seconds."""
    sync(dev)
    start = time.perf_counter()
    with lora.disabled(model):
        logprobs.reference_logps(model, batches, pad_id, dev, average=False)
    sync(dev)
    return time.perf_counter() - start


def timed_steps(model, batches, pad_id, dev, grad_accum: int) -> dict[str, float]:
    """One DPO optimizer step per grad_accum micro-batches, AdamW on the trainable parameters ->
    median seconds of forward, backward and optimizer per step (the first step warms up)."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6)
    timings = {"forward": [], "backward": [], "optimizer": []}
    for step in range(len(batches) // grad_accum):
        fwd = bwd = 0.0
        for chunk in batches[step * grad_accum:(step + 1) * grad_accum]:
            t0 = time.perf_counter()
            batch = logprobs.pair_batch(chunk, pad_id)
            chosen, rejected = logprobs.batch_logps(model, batch, dev, False)
            ref_chosen = torch.tensor([p["ref_chosen"] for p in chunk], device=dev)
            ref_rejected = torch.tensor([p["ref_rejected"] for p in chunk], device=dev)
            losses, _, _ = train_dpo.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, 0.1)
            sync(dev)
            t1 = time.perf_counter()
            losses.mean().backward()
            sync(dev)
            fwd, bwd = fwd + t1 - t0, bwd + time.perf_counter() - t1
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(dev)
        optimizer_s = time.perf_counter() - t2
        for name, value in (("forward", fwd), ("backward", bwd), ("optimizer", optimizer_s)):
            timings[name].append(value)
    return {k: statistics.median(v[1:] or v) for k, v in timings.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    args = add_args(parser).parse_args()
    dev = device()
    model, pad_id, batches, tokens_per_step = setup(args, dev)
    rss_loaded = peak_mib(torch.device("cpu"))
    reference_s = reference(model, batches, pad_id, dev) / args.steps
    medians = timed_steps(model, batches, pad_id, dev, args.grad_accum)
    step_s = sum(medians.values())
    peak = peak_mib(dev)
    print(f"{dev}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{args.batch_size} pairs x {args.grad_accum} accumulation = "
          f"{args.batch_size * args.grad_accum} pairs/step, ~{tokens_per_step:.0f} tokens/step")
    print(f"optimizer steps/s: {1 / step_s:.3f}  ({step_s:.1f} s/step, "
          f"{tokens_per_step / step_s:.0f} train tokens/s)")
    parts = [("reference (once, per step of pairs)", reference_s)] + list(medians.items())
    for name, seconds in parts:
        print(f"  {name:38s} {seconds:7.2f} s  ({seconds / (step_s + reference_s):5.1%})")
    what = "allocated" if dev.type == "cuda" else f"RSS; {rss_loaded:.0f} MiB after loading"
    print(f"peak memory: {peak:.0f} MiB ({what})")


if __name__ == "__main__":
    main()
