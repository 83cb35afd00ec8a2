"""nanorlhf's model vs transformers on the embedded SmolLM2-135M, side by side in one run.

    OMP_NUM_THREADS=1 python bench/bench_model.py [--model llama] [--repeats 5]
        [--decode eager,static,compiled] [--bf16]

Prints load time, training forward+backward tokens/s (8 x 128; also with --onednn's matmuls, packing
every weight anew each step as after an optimizer step), greedy generation tokens/s at batch
1 and 16 (64 new tokens) for each generate(decode=...) mode, the ratios nanorlhf/transformers
(medians over repeats, every variant and transformers alternating so machine noise hits all alike),
whether the greedy tokens are identical to transformers', the compile cost, and with --bf16 how long
bf16 weights keep fp32's greedy tokens. Not a test.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # nanorlhf from this checkout
from nanorlhf.checkpoint import load_model, resolve_model  # noqa: E402
from nanorlhf.fast import packed  # noqa: E402
from nanorlhf.fast.decode import generate  # noqa: E402 (decode=eager, static, compiled)
from nanorlhf.sampling import left_pad  # noqa: E402
from nanorlhf.tokenizer import Tokenizer  # noqa: E402

HF = transformers.AutoModelForCausalLM
QUESTIONS = ["What is the capital of France?", "Name three fruits.", "Why is the sky blue?",
             "Write a haiku about rain.", "How do bees make honey?", "What is 12 times 7?",
             "Tell me about the Moon.", "Give me a tip for studying."]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def train_step(model, ids: torch.Tensor, is_hf: bool) -> None:
    logits = model(ids).logits if is_hf else model(ids)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    loss.backward()
    model.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--decode", default="eager,static",
                        help="generate(decode=...) modes, comma-separated (eager,static,compiled; "
                             "compiled costs minutes of compiling per batch size)")
    parser.add_argument("--bf16", action="store_true",
                        help="also decode with a bf16 copy of the weights")
    parser.add_argument("--skip-train", action="store_true", help="generation only")
    args = parser.parse_args()
    model_dir = resolve_model(args.model)
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"threads {torch.get_num_threads()}, {model_dir}, load average at the start {load}")

    load_s = {"nanorlhf": [], "transformers": []}
    for _ in range(3):
        load_s["nanorlhf"].append(timed(lambda: load_model(model_dir)))
        load_s["transformers"].append(timed(lambda: HF.from_pretrained(model_dir)))
    ours = load_model(model_dir).train()
    hf = HF.from_pretrained(model_dir, attn_implementation="sdpa").train()
    tok = Tokenizer(model_dir)
    results = {"load s": {k: statistics.median(v) for k, v in load_s.items()}}

    ids = torch.randint(0, ours.cfg.vocab_size, (8, 128),
                        generator=torch.Generator().manual_seed(0))
    fast = load_model(model_dir).train()
    packed.pack_linears(fast)  # what --onednn true does (in a training script's main())

    def fast_step():  # an optimizer step changes every weight: pack them anew, as a real step does
        packed._packed.clear(), packed._packed_t.clear()
        train_step(fast, ids, False)

    train = {"nanorlhf": [], "nanorlhf --onednn": [], "transformers": []}
    if not args.skip_train:
        train_step(ours, ids, False), fast_step(), train_step(hf, ids, True)  # warm-up
    for _ in range(0 if args.skip_train else args.repeats):
        train["nanorlhf"].append(ids.numel() / timed(lambda: train_step(ours, ids, False)))
        train["nanorlhf --onednn"].append(ids.numel() / timed(fast_step))
        train["transformers"].append(ids.numel() / timed(lambda: train_step(hf, ids, True)))
    del fast
    if not args.skip_train:
        hf_rate = statistics.median(train["transformers"])
        for name in ("nanorlhf", "nanorlhf --onednn"):
            results[f"train tok/s (8x128){name[8:]}"] = {"nanorlhf": statistics.median(train[name]),
                                                         "transformers": hf_rate}

    ours.eval(), hf.eval()
    modes = args.decode.split(",")
    bf16 = load_model(model_dir, dtype=torch.bfloat16).eval() if args.bf16 else None
    same_tokens = {m: True for m in modes}
    agree = []  # bf16 vs fp32 eager: share of greedy tokens before the first difference
    compile_s = {}
    for batch in (1, 16):
        prompts = [tok.chat_prompt(QUESTIONS[i % len(QUESTIONS)]) for i in range(batch)]
        ids, mask = left_pad(prompts, tok.pad_id)
        n_new = args.new_tokens

        def no_stop(logits, hidden, step):  # as transformers' min_new_tokens: no early EOS
            logits[:, tok.stop_ids] = float("-inf")
            return logits

        def ours_gen(model, mode, n=n_new):
            return generate(model, prompts, n, [], tok.pad_id, temperature=0, logits_hook=no_stop,
                            decode=mode)
        if "compiled" in modes:  # the first call per shape compiles; its cost beyond an eager call
            compile_s[batch] = (timed(lambda: ours_gen(ours, "compiled", 4))
                                - timed(lambda: ours_gen(ours, "eager", 4)))
        variants = [(m, ours, m) for m in modes]
        if bf16:
            variants.append(("bf16 " + modes[-1], bf16, modes[-1]))
        runs = {name: [] for name, _, _ in variants} | {"transformers": []}
        for r in range(args.repeats + 1):  # the first round is a warm-up
            outs = {}
            for name, model, mode in variants:  # alternating: machine noise hits every one alike
                t = timed(lambda: outs.update({name: ours_gen(model, mode).ids}))
                if r:
                    runs[name].append(batch * n_new / t)
            with torch.no_grad():
                hf_out = {}
                t_hf = timed(lambda: hf_out.update(g=hf.generate(
                    input_ids=ids, attention_mask=mask, max_new_tokens=n_new, min_new_tokens=n_new,
                    do_sample=False, pad_token_id=tok.pad_id)))
            if r:
                runs["transformers"].append(batch * n_new / t_hf)
            hf_ids = hf_out["g"][:, ids.shape[1]:].tolist()
            for m in modes:
                same_tokens[m] &= outs[m] == hf_ids
            if bf16:
                agree += [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), n_new) / n_new
                          for x, y in zip(outs["bf16 " + modes[-1]], outs[modes[0]])]
        hf_rate = statistics.median(runs["transformers"])
        for name in runs:
            if name != "transformers":
                results[f"greedy b{batch} {name}"] = {"nanorlhf": statistics.median(runs[name]),
                                                      "transformers": hf_rate}

    with open("/proc/loadavg") as f:
        print(f"load average at the end: {' '.join(f.read().split()[:3])} "
              f"(2 cores; other jobs share the machine)")
    print(f"{'':30}{'nanorlhf':>12}{'transformers':>14}{'ratio':>8}")
    for name, r in results.items():
        ratio = (r["transformers"] / r["nanorlhf"] if name.startswith("load")
                 else r["nanorlhf"] / r["transformers"])
        print(f"{name:30}{r['nanorlhf']:12.2f}{r['transformers']:14.2f}{ratio:8.2f}x")
    for m in modes:
        print(f"identical greedy tokens to transformers, decode={m}: {same_tokens[m]}")
    for batch, s in compile_s.items():
        print(f"torch.compile cost at batch {batch}: {s:.0f} s (first call, beyond an eager call)")
    if bf16:
        print(f"bf16 weights: greedy tokens equal to fp32 until the first difference: "
              f"{100 * statistics.mean(agree):.0f}% of {n_new} tokens (mean over rows and repeats)")


if __name__ == "__main__":
    main()
