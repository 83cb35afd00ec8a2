"""nanorlhf's model vs transformers on the embedded SmolLM2-135M, side by side in one run.

    python bench/bench_model.py [--model llama] [--repeats 5]

Prints load time, training forward+backward tokens/s (8 x 128), greedy generation tokens/s at batch
1 and 16 (64 new tokens), the ratios nanorlhf/transformers (medians over repeats, alternating the
two so machine noise hits both) and whether the greedy tokens are identical. Not a test.
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
import transformers

from nanorlhf.checkpoint import load_model, resolve_model
from nanorlhf.generate import generate, left_pad
from nanorlhf.tokenizer import Tokenizer

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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    model_dir = resolve_model(args.model)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, threads {torch.get_num_threads()}, {model_dir}")

    load_s = {"nanorlhf": [], "transformers": []}
    for _ in range(3):
        load_s["nanorlhf"].append(timed(lambda: load_model(model_dir)))
        load_s["transformers"].append(timed(lambda: transformers.AutoModelForCausalLM.from_pretrained(model_dir)))
    ours = load_model(model_dir).train()
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa").train()
    tok = Tokenizer(model_dir)
    results = {"load s": {k: statistics.median(v) for k, v in load_s.items()}}

    ids = torch.randint(0, ours.cfg.vocab_size, (8, 128), generator=torch.Generator().manual_seed(0))
    train = {"nanorlhf": [], "transformers": []}
    train_step(ours, ids, False), train_step(hf, ids, True)  # warm-up
    for _ in range(args.repeats):
        train["nanorlhf"].append(ids.numel() / timed(lambda: train_step(ours, ids, False)))
        train["transformers"].append(ids.numel() / timed(lambda: train_step(hf, ids, True)))
    results["train tok/s (8x128)"] = {k: statistics.median(v) for k, v in train.items()}

    ours.eval(), hf.eval()
    same_tokens = True
    for batch in (1, 16):
        prompts = [tok.chat_prompt(QUESTIONS[i % len(QUESTIONS)]) for i in range(batch)]
        ids, mask = left_pad(prompts, tok.pad_id)
        n_new = args.new_tokens
        runs = {"nanorlhf": [], "transformers": []}

        def no_stop(logits, hidden, step):  # transformers' min_new_tokens does the same: no early EOS
            logits[:, tok.stop_ids] = float("-inf")
            return logits
        for r in range(args.repeats + 1):  # the first round is a warm-up
            ours_out = {}
            t_ours = timed(lambda: ours_out.update(g=generate(ours, prompts, n_new, [], tok.pad_id, temperature=0, logits_hook=no_stop)))
            with torch.no_grad():
                hf_out = {}
                t_hf = timed(lambda: hf_out.update(g=hf.generate(
                    input_ids=ids, attention_mask=mask, max_new_tokens=n_new, min_new_tokens=n_new,
                    do_sample=False, pad_token_id=tok.pad_id)))
            if r:
                runs["nanorlhf"].append(batch * n_new / t_ours)
                runs["transformers"].append(batch * n_new / t_hf)
            same_tokens &= ours_out["g"].ids == hf_out["g"][:, ids.shape[1]:].tolist()
        results[f"greedy tok/s batch {batch}"] = {k: statistics.median(v) for k, v in runs.items()}

    print(f"{'':26}{'nanorlhf':>12}{'transformers':>14}{'ratio':>8}")
    for name, r in results.items():
        ratio = r["transformers"] / r["nanorlhf"] if name.startswith("load") else r["nanorlhf"] / r["transformers"]
        print(f"{name:26}{r['nanorlhf']:12.2f}{r['transformers']:14.2f}{ratio:8.2f}x")
    print(f"identical greedy tokens: {same_tokens}")


if __name__ == "__main__":
    main()
