"""Full fine-tuning vs LoRA vs LoRA + gradient checkpointing: peak memory, tokens/s of a DPO step.

    python bench/bench_lora.py [--model llama] [--steps 4] [--batch-size 4] [--grad-accum 2]
                               [--lora-rank 16]

Each configuration runs in a fresh subprocess (bench_dpo's setup and timed steps), so each peak is
its own: the peak resident set on CPU (model, activations, gradients and AdamW state together), max
allocated on CUDA. tokens/s counts the prompt and response tokens of the chosen and rejected rows
of one optimizer step over its forward, backward and update (the reference pass is done once
before and not counted). Not a test.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from bench_dpo import add_args, peak_mib, reference, setup, timed_steps
from nanorlhf import lora
from nanorlhf.model import device

# configuration -> (LoRA adapters?, gradient checkpointing?)
CONFIGS = {"full": (False, False), "lora": (True, False), "lora+ckpt": (True, True)}


def run_one(args) -> dict:
    """One configuration in this process -> {config, tokens_per_s, step_s, peak_mib, trainable,
    loaded_mib}."""
    dev = device()
    model, pad_id, batches, tokens_per_step = setup(args, dev)
    loaded = peak_mib(dev)
    adapters, checkpointing = CONFIGS[args.one]
    # as train_dpo.main() prepares the model: rank r or none, α = 2r, every projection
    rank = args.lora_rank if adapters else 0
    lora.adapt(model, rank, 2.0 * args.lora_rank, ",".join(lora.TARGETS))
    model.model.grad_checkpointing = checkpointing
    reference(model, batches, pad_id, dev)
    step_s = sum(timed_steps(model, batches, pad_id, dev, args.grad_accum).values())
    return {"config": args.one, "tokens_per_s": tokens_per_step / step_s, "step_s": step_s,
            "peak_mib": peak_mib(dev), "loaded_mib": loaded,
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def main() -> None:
    parser = add_args(argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    parser.set_defaults(steps=4)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--one", choices=list(CONFIGS), help=argparse.SUPPRESS)  # the child's
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args)))
        return
    passed = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k != "one"]
    rows = []
    for name in CONFIGS:
        out = subprocess.run([sys.executable, str(Path(__file__)), *passed, f"--one={name}"],
                             capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"{name} failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    dev = device()
    print(f"{dev}, torch {torch.__version__}, model {args.model}; {args.batch_size} pairs x "
          f"{args.grad_accum} accumulation per step, {args.steps} steps (median after the first); "
          f"LoRA rank {args.lora_rank}, α = 2r, all attention and MLP projections")
    memory = "max allocated" if dev.type == "cuda" else "peak RSS"
    print(f"| config | trainable params | train tokens/s | s/step | {memory} MiB "
          f"| after loading MiB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['trainable']:,} | {r['tokens_per_s']:.0f} | "
              f"{r['step_s']:.2f} | {r['peak_mib']:.0f} | {r['loaded_mib']:.0f} |")


if __name__ == "__main__":
    main()
