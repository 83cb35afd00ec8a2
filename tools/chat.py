"""Ask a model one question: python tools/chat.py --model llama "What is the capital of France?" """

import argparse
import time

import torch

from nanorlhf.checkpoint import load_model, resolve_model
from nanorlhf.errors import run_cli
from nanorlhf.sampling import generate
from nanorlhf.tokenizer import Tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("prompt", help="the user message")
    parser.add_argument("--model", default="llama",
                        help="checkpoint directory, local HF cache id, or 'llama' (embedded)")
    parser.add_argument("--system", default=None, help="system message (default: the model's own)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    model_dir = resolve_model(args.model)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_model(model_dir, device=device).eval(), Tokenizer(model_dir)
    prompt = tokenizer.chat_prompt(args.prompt, system=args.system)
    start = time.perf_counter()
    out = generate(model, [prompt], args.max_new_tokens, tokenizer.stop_ids, tokenizer.pad_id,
                   temperature=args.temperature, top_p=args.top_p, seed=args.seed, tokenizer=tokenizer)
    seconds = time.perf_counter() - start
    print(out.texts[0])
    print(f"[{len(out.ids[0])} tokens in {seconds:.1f}s]")


if __name__ == "__main__":
    run_cli(main)
