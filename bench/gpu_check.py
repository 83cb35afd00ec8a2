"""The GPU check: bf16 DPO steps, full fine-tuning vs LoRA vs LoRA + gradient checkpointing, on the
embedded model and on a ~1B random Llama; tokens/s, peak memory and model-FLOPs utilisation on this
card.

    python bench/gpu_check.py                       # needs CUDA; a few minutes on an H100
    python bench/gpu_check.py --peak-tflops 400     # a card that is not in PEAK_TFLOPS
    python bench/gpu_check.py --tiny                # smoke check anywhere: two tiny random models

Each step is what train_dpo.py runs (bench_dpo.timed_steps): bf16 autocast, fp32 weights and
AdamW state, log-softmax in fp32; the reference log-probs are computed once beforehand and not
timed. Pairs are random token ids of realistic lengths (speed does not depend on the values). The
embedded model uses its real weights when it is already in the cache, otherwise SmolLM2-135M's
architecture with random weights.

MFU = 6·N·(train tokens/s) / (the card's dense bf16 peak), N = the parameters each token multiplies
(all but the input embedding; a tied head counts once). It is the same 6N for every configuration,
so it is *model* FLOPs: LoRA really does ~4N (no weight gradients) and checkpointing ~8N (one more
forward).
"""

import argparse
import gc
import json
import random
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # nanorlhf from this checkout
from bench_dpo import peak_mib, reference, timed_steps  # noqa: E402 (bench/ is the script's folder)
from nanorlhf import lora  # noqa: E402
from nanorlhf.checkpoint import load_model  # noqa: E402
from nanorlhf.embedded import MODEL_NAME, cache_dir  # noqa: E402
from nanorlhf.errors import UserError, run_cli  # noqa: E402
from nanorlhf.model import ModelConfig, Transformer, device  # noqa: E402

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, rope_theta=1e5,
                    tie_word_embeddings=True)
LLAMA_1B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                num_attention_heads=32, num_key_value_heads=8, head_dim=64, rope_theta=1e4,
                tie_word_embeddings=False)  # 1.1B, TinyLlama's shape
TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)
TINY_WIDE = dict(TINY, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                 tie_word_embeddings=False)
PEAK_TFLOPS = [("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0),
               ("A100", 312.0)]  # dense bf16, no sparsity
CONFIGS = {"full": {}, "lora": {"lora_rank": 16, "lora_alpha": 32.0},
           "lora+ckpt": {"lora_rank": 16, "lora_alpha": 32.0, "grad_checkpointing": True}}
ALL_PROJECTIONS = ",".join(lora.TARGETS)


def random_pairs(n: int, prompt_len: int, response_len: int, vocab: int,
                 seed: int = 0) -> list[dict]:
    """n pairs of random ids; lengths vary ±25% around the given ones, as real pairs do."""
    rng = random.Random(seed)

    def ids(mean: int) -> list[int]:
        return [rng.randrange(3, vocab) for _ in range(rng.randint(3 * mean // 4, 5 * mean // 4))]

    return [{"prompt": ids(prompt_len), "chosen": ids(response_len), "rejected": ids(response_len)}
            for _ in range(n)]


def flop_params(model: Transformer) -> int:
    """N of 6N: every base parameter but the input embedding, plus the head's matmul when it shares
    the embedding."""
    n = sum(p.numel() for name, p in model.named_parameters()
            if "embed_tokens" not in name and ".lora_" not in name)
    tied_head = model.cfg.vocab_size * model.cfg.hidden_size if model.cfg.tie_word_embeddings else 0
    return n + tied_head


def build(arch: dict | None, dev) -> Transformer:
    """The embedded model from the cache (arch None), else a random model of shape `arch`."""
    if arch is None:
        return load_model(cache_dir() / MODEL_NAME, device=dev)
    with torch.device(dev):  # init on the device; .to() moves the RoPE buffer (made on the CPU)
        return Transformer(ModelConfig(**arch)).to(dev)


def measure(name: str, arch: dict | None, lengths: tuple[int, int], args, dev,
            peak_tflops: float | None) -> list[dict]:
    """Every CONFIGS entry on a fresh copy of the model -> one row each (also printed as a row)."""
    rows = []
    for config, flags in CONFIGS.items():
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        # what a training script's main() does with --lora-rank/--lora-alpha/--grad-checkpointing
        model = lora.adapt(build(arch, dev), flags.get("lora_rank", 0),
                           flags.get("lora_alpha", 16.0), ALL_PROJECTIONS, seed=0)
        model.model.grad_checkpointing = flags.get("grad_checkpointing", False)
        pairs = random_pairs(args.steps * args.batch_size, *lengths, model.cfg.vocab_size)
        batches = [pairs[i:i + args.batch_size] for i in range(0, len(pairs), args.batch_size)]
        tokens = sum(len(p["prompt"]) * 2 + len(p["chosen"]) + len(p["rejected"])
                     for p in pairs) / args.steps
        reference(model, batches, 0, dev)
        step_s = sum(timed_steps(model, batches, 0, dev, grad_accum=1).values())
        n = flop_params(model)
        mfu = 6 * n * tokens / step_s / (peak_tflops * 1e12) if peak_tflops else None
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        rows.append({"model": name, "config": config, "N": n, "tokens_per_step": tokens,
                     "tokens_per_s": tokens / step_s, "step_s": step_s, "peak_mib": peak_mib(dev),
                     "mfu": mfu, "trainable": trainable})
        mfu_text = "-" if mfu is None else f"{mfu:.1%}"
        print(f"| {name} | {config} | {trainable:,} | {tokens:.0f} | {tokens / step_s:,.0f} | "
              f"{step_s:.3f} | {rows[-1]['peak_mib']:,.0f} | {mfu_text} |", flush=True)
        del model
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true",
                        help="two tiny random models: a smoke check that runs anywhere")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the card's dense bf16 peak (default: from PEAK_TFLOPS)")
    parser.add_argument("--steps", type=int, default=6,
                        help="optimizer steps per configuration (median after the first)")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per step (16 rows)")
    parser.add_argument("--out", default="", help="also write the rows as JSON to this file")
    args = parser.parse_args()
    dev = device()
    if dev.type != "cuda" and not args.tiny:
        raise UserError("no CUDA device: this check is for a GPU machine "
                        "(--tiny runs a smoke check on any device)")
    card = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    peak = args.peak_tflops or next(
        (tf for key, tf in PEAK_TFLOPS if key in card and dev.type == "cuda"), None)
    cached = (cache_dir() / MODEL_NAME / "model.safetensors").is_file()
    # name -> (architecture, or None for the cached embedded model; mean prompt and response tokens)
    smollm2 = "SmolLM2-135M" + ("" if cached else " (random weights)")
    models = {"tiny": (TINY, (24, 16)), "tiny-wide": (TINY_WIDE, (24, 16))} if args.tiny else {
        smollm2: (None if cached else SMOLLM2_135M, (96, 64)),
        "Llama 1.1B (random)": (LLAMA_1B, (256, 256))}
    precision = "bf16 autocast" if dev.type == "cuda" else "fp32"
    peak_text = f"{peak:g} TFLOPS dense bf16" if peak else "unknown (pass --peak-tflops for MFU)"
    print(f"{card}, torch {torch.__version__}, {precision}; peak {peak_text}; "
          f"{args.batch_size} pairs/step, median of {args.steps - 1} steps after one warm-up; "
          f"LoRA rank 16 on all projections")
    print("| model | config | trainable | tokens/step | tokens/s | s/step | peak MiB | MFU (6N) |\n"
          "|---|---|---|---|---|---|---|---|")
    rows = [row for name, (arch, lengths) in models.items()
            for row in measure(name, arch, lengths, args, dev, peak)]
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"card": card, "torch": torch.__version__, "peak_tflops": peak, "rows": rows},
                      f, indent=1)
    best = max((r["mfu"] for r in rows if r["mfu"] is not None), default=None)
    if best is not None:
        print(f"best MFU: {best:.1%}")
    else:
        print(f"median tokens/s: {statistics.median(r['tokens_per_s'] for r in rows):,.0f}")


if __name__ == "__main__":
    run_cli(main)
