"""Pink-elephant evaluation of saved models, side by side: how often does each mention what it was
told not to? (nanorlhf/tasks/pink.py)

    python tools/pink_eval.py --model llama --model out/train_dpo/run1/model [--data rows.jsonl]

A trained ILQL run's steered decoding: python train_ilql.py --evaluate out/train_ilql/RUN
"""

import json
from dataclasses import dataclass

from nanorlhf.atomic import atomic_write_text
from nanorlhf.checkpoint import load_model, resolve_model
from nanorlhf.errors import run_cli
from nanorlhf.model import device
from nanorlhf.run import flag, parse_config
from nanorlhf.tasks.pink import HELDOUT_PATH, format_table, load_eval_rows, sample_eval, score_nll
from nanorlhf.tokenizer import Tokenizer


@dataclass
class Config:
    model: tuple[str, ...] = flag(("llama",), "model to evaluate (repeat the flag to compare); the "
                                  "first one is the base for the NLL")
    data: str = flag(str(HELDOUT_PATH), "jsonl of {pink, grey, prompt} rows")
    n: int = flag(4, "samples per prompt", min=1)
    temperature: float = flag(0.7, "sampling temperature (0 = greedy)", min=0.0)
    max_new_tokens: int = flag(96, "response length cap", min=1)
    batch_size: int = flag(32, "generation batch size", min=1)
    seed: int = flag(0, "sampling seed")
    out: str = flag("", "write all results and samples to this json file")


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(Config, __doc__, argv, prog="python tools/pink_eval.py")
    rows = load_eval_rows(cfg.data)
    dirs = [resolve_model(m) for m in cfg.model]
    tok, dev = Tokenizer(dirs[0]), device()  # on CUDA, sampling and the NLL run under bf16 autocast

    # One model resident at a time: each samples and is freed (its last reference goes when the
    # sampling returns), then the base scores every model's samples.
    sampled = {name: sample_eval(load_model(d, device=dev).eval(), tok, rows, cfg.n,
                                 cfg.temperature, cfg.seed, cfg.max_new_tokens, cfg.batch_size,
                                 desc=name)
               for name, d in zip(cfg.model, dirs)}
    base = load_model(dirs[0], device=dev).eval()
    results = {name: score_nll(r, base, prompts, responses, tok.pad_id)
               for name, (r, prompts, responses) in sampled.items()}
    print(f"{len(rows)} prompts x {cfg.n} samples, temperature {cfg.temperature}, seed {cfg.seed}")
    print(format_table(results))
    if cfg.out:
        atomic_write_text(cfg.out, json.dumps(results, indent=1))


if __name__ == "__main__":
    run_cli(main)
