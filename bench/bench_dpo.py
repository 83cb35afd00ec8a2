"""DPO step cost on the embedded SmolLM2-135M: steps/s, peak memory, and where the time goes.

    python bench/bench_dpo.py [--model llama] [--steps 6] [--batch-size 4] [--grad-accum 2]

Uses the real pink-elephant pairs. Splits one optimizer step into reference scoring (done once per
pair before training, reported per step-equivalent), policy forward, backward, and the optimizer
update. Peak memory is the process's peak resident set on CPU, max allocated on CUDA. Not a test.
"""

import argparse
import resource
import statistics
import time

import torch

import train_dpo
from nanorlhf.checkpoint import load_model, resolve_model
from nanorlhf.cli import device
from nanorlhf.data import read_preferences
from nanorlhf.tokenizer import Tokenizer


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama")
    parser.add_argument("--data", default="data/pink_dpo_train.jsonl")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=2)
    args = parser.parse_args()
    dev = device()
    model_dir = resolve_model(args.model)
    tok, model = Tokenizer(model_dir), load_model(model_dir, device=dev)
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    n_pairs = args.steps * args.batch_size * args.grad_accum
    pairs, _ = train_dpo.tokenize_pairs(read_preferences(args.data)[:n_pairs], tok, 192, model.cfg.vocab_size)
    tokens_per_step = 2 * sum(len(p["prompt"]) + (len(p["chosen"]) + len(p["rejected"])) / 2
                              for p in pairs) / args.steps

    sync(dev)
    start = time.perf_counter()
    train_dpo.reference_logps(model, pairs, tok.pad_id, args.batch_size * 2, dev, average=False)
    sync(dev)
    reference_s = (time.perf_counter() - start) / args.steps
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    timings = {"forward": [], "backward": [], "optimizer": []}
    for step in range(args.steps):
        fwd = bwd = 0.0
        for k in range(args.grad_accum):
            chunk = pairs[(step * args.grad_accum + k) * args.batch_size:][:args.batch_size]
            t0 = time.perf_counter()
            chosen, rejected = train_dpo.batch_logps(model, train_dpo.pair_batch(chunk, tok.pad_id), dev, False)
            losses, _, _ = train_dpo.dpo_loss(chosen, rejected, torch.tensor([p["ref_chosen"] for p in chunk], device=dev),
                                              torch.tensor([p["ref_rejected"] for p in chunk], device=dev), 0.1)
            sync(dev)
            t1 = time.perf_counter()
            losses.mean().backward()
            sync(dev)
            fwd, bwd = fwd + t1 - t0, bwd + time.perf_counter() - t1
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(dev)
        for name, value in (("forward", fwd), ("backward", bwd), ("optimizer", time.perf_counter() - t2)):
            timings[name].append(value)
    medians = {k: statistics.median(v[1:] or v) for k, v in timings.items()}  # first step warms up
    step_s = sum(medians.values())
    peak = (torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(f"{dev}, torch {torch.__version__}, {torch.get_num_threads()} threads; {args.batch_size} pairs x "
          f"{args.grad_accum} accumulation = {args.batch_size * args.grad_accum} pairs/step, "
          f"~{tokens_per_step:.0f} tokens/step")
    print(f"optimizer steps/s: {1 / step_s:.3f}  ({step_s:.1f} s/step, {tokens_per_step / step_s:.0f} train tokens/s)")
    for name, seconds in [("reference (once, per step of pairs)", reference_s)] + list(medians.items()):
        print(f"  {name:38s} {seconds:7.2f} s  ({seconds / (step_s + reference_s):5.1%})")
    print(f"peak memory: {peak:.0f} MiB ({'allocated' if dev.type == 'cuda' else f'RSS; {rss_loaded:.0f} MiB after loading the model'})")


if __name__ == "__main__":
    main()
