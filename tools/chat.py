"""Ask a model one question.

    python tools/chat.py --model llama "What is the capital of France?"
"""

import time
from dataclasses import dataclass

from nanorlhf.checkpoint import load_model, resolve_model
from nanorlhf.data import fit_prompts
from nanorlhf.errors import run_cli
from nanorlhf.run import THREADS_HELP, choose_threads, flag, parse_config, positional
from nanorlhf.model import device
from nanorlhf.sampling import generate
from nanorlhf.tokenizer import Tokenizer


@dataclass
class Config:
    prompt: str = positional("the user message")
    model: str = flag("llama", "checkpoint directory, local HF cache id, or 'llama' (embedded)")
    system: str = flag("", "system message (empty: the model's own)")
    max_new_tokens: int = flag(128, "answer length cap, in tokens", min=1)
    temperature: float = flag(0.0, "sampling temperature (0: greedy)", min=0)
    top_p: float = flag(1.0, "nucleus sampling (1: off)", gt=0, max=1)
    seed: int = flag(0, "sampling seed")
    threads: int = flag(0, THREADS_HELP, min=0)


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(Config, __doc__, argv, prog="python tools/chat.py")
    threads = choose_threads(cfg.threads)
    model_dir = resolve_model(cfg.model)
    model, tokenizer = load_model(model_dir, device=device()).eval(), Tokenizer(model_dir)
    prompt = tokenizer.chat_prompt(cfg.prompt, system=cfg.system or None)
    # a prompt longer than the model's context allows keeps its last tokens (the one rule)
    prompt = fit_prompts([prompt], model.cfg.max_position_embeddings, cfg.max_new_tokens)[0]
    start = time.perf_counter()
    out = generate(model, [prompt], cfg.max_new_tokens, tokenizer.stop_ids, tokenizer.pad_id,
                   temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed, tokenizer=tokenizer)
    seconds = time.perf_counter() - start
    print(out.texts[0])
    print(f"[{len(out.ids[0])} tokens in {seconds:.1f}s, torch threads: {threads}]")


if __name__ == "__main__":
    run_cli(main)
