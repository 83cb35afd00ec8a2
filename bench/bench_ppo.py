"""PPO step cost on the embedded SmolLM2-135M: where a step's time goes, and tokens/s.

    python bench/bench_ppo.py [--model llama] [--steps 4] [--batch-size 16] [--minibatch-size 8]
                              [--ppo-epochs 2] [--max-new-tokens 40] [--critic shared] [--algo ppo]

Runs train_ppo.py's own pieces on the real prompts (VADER reward) and splits each step into
rollout (sampling with the KV cache), scoring, the no-grad forwards (π_old, V_old, π_ref) and the
update (the --ppo-epochs minibatch steps). Prints the median of the steps after the first (warm-up).
Not a test.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the scripts, from the repo root
import train_ppo  # noqa: E402
from nanorlhf.checkpoint import load_model, resolve_model  # noqa: E402
from nanorlhf.model import device  # noqa: E402
from nanorlhf.sampling import generate_batched  # noqa: E402
from nanorlhf.tokenizer import Tokenizer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama")
    parser.add_argument("--steps", type=int, default=4)
    defaults = train_ppo.Config()
    for name in ("batch_size", "minibatch_size", "ppo_epochs", "max_new_tokens", "group_size"):
        parser.add_argument("--" + name.replace("_", "-"), type=int,
                            default=getattr(defaults, name))
    parser.add_argument("--critic", default="shared", choices=("shared", "separate"))
    parser.add_argument("--algo", default="ppo", choices=("ppo", "grpo", "rloo"))
    args = parser.parse_args()
    cfg = train_ppo.Config(**{k: v for k, v in vars(args).items() if k not in ("model", "steps")})
    dev = device()
    model_dir = resolve_model(args.model)
    tok, policy = Tokenizer(model_dir), load_model(model_dir, device=dev).eval()
    backbone = policy.model if cfg.critic == "separate" else None
    critic = None
    if cfg.algo == "ppo":
        critic = train_ppo.Critic(backbone, policy.cfg.hidden_size).to(dev)
    ac = train_ppo.ActorCritic(policy, critic)
    ref = load_model(model_dir, device=dev).eval().requires_grad_(False)
    pool, _, scorers = train_ppo.make_task(cfg, dev)
    optimizer = torch.optim.AdamW([p for p in ac.parameters() if p.requires_grad], lr=1e-7)
    per_step = cfg.ppo_epochs * -(-cfg.batch_size // cfg.minibatch_size)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {k: [] for k in ("rollout", "score", "forward (no grad)",
                                                     "update")}
    tokens: dict[str, list[float]] = {"sampled": [], "trained": []}
    for step in range(args.steps):
        rows = train_ppo.step_rows(pool, step, cfg.batch_size // cfg.group_size, 0)
        t0 = time.perf_counter()
        scored = {}

        def timed_score(rs, texts):  # scoring runs inside rollout(), after sampling: note when
            scored["t"] = time.perf_counter()
            return scorers["reward"](rs, texts)

        batch = train_ppo.rollout(cfg, policy, tok, rows, timed_score, step, dev, generate_batched)
        sync()
        t1 = time.perf_counter()
        parts = [train_ppo.minibatches(cfg.batch_size, cfg.minibatch_size, f"0:{step}:{e}")
                 for e in range(cfg.ppo_epochs)]
        old = train_ppo.old_forward(cfg, ac, ref, batch, parts[0])
        sync()
        t2 = time.perf_counter()
        advantages, returns, _ = train_ppo.advantages_of(cfg, batch, old)
        train_ppo.update(cfg, ac, optimizer, batch, old, advantages, returns, parts,
                         step * per_step, args.steps * per_step)
        sync()
        t3 = time.perf_counter()
        for name, seconds in (("rollout", scored["t"] - t0), ("score", t1 - scored["t"]),
                              ("forward (no grad)", t2 - t1), ("update", t3 - t2)):
            times[name].append(seconds)
        tokens["sampled"].append(float(batch["mask"].sum()))
        tokens["trained"].append(float(batch["attn"].sum()) * cfg.ppo_epochs)
    median = {k: statistics.median(v[1:] or v) for k, v in times.items()}
    total = sum(median.values())
    sampled, trained = (statistics.median(v[1:] or v) for v in tokens.values())
    print(f"{dev}, torch {torch.__version__}, {torch.get_num_threads()} threads; {cfg.algo}, "
          f"critic {cfg.critic}, {cfg.batch_size} responses x <= {cfg.max_new_tokens} tokens, "
          f"minibatch {cfg.minibatch_size}, {cfg.ppo_epochs} epochs; medians of "
          f"{max(args.steps - 1, 1)} steps")
    print(f"step: {total:.1f} s")
    for name, seconds in median.items():
        print(f"  {name:20s} {seconds:7.2f} s  ({seconds / total:5.1%})")
    print(f"sampling: {sampled / median['rollout']:.0f} response tokens/s; update: "
          f"{trained / median['update']:.0f} prompt+response tokens/s (x {cfg.ppo_epochs} epochs)")


if __name__ == "__main__":
    main()
