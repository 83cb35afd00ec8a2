"""PPO (and GRPO, RLOO) from a reward: sample, score, and push the policy toward what scores well.

    python train_ppo.py --model llama                    # SmolLM2-135M-Instruct, VADER sentiment reward, CPU
    python train_ppo.py --model llama --algo grpo        # G samples per prompt, group-relative advantages
    python train_ppo.py --model llama --reward pink      # -1 for mentioning the pink elephant, else 0
    python train_ppo.py --resume out/train_ppo/RUN       # continue an interrupted run exactly
    torchrun --nproc_per_node 2 train_ppo.py -- --model llama   # DDP (nanorlhf/scale.py flags apply)

RLHF with PPO as in Ziegler et al. 2019 and Stiennon et al. 2020, with the details of Huang et al. 2024
("The N+ Implementation Details of RLHF with PPO", cited below as N+). One step, top to bottom:

  rollout   --batch-size responses from the policy (temperature sampling only: no top-k / top-p, whose
            truncated distribution the trainer would not see - trl#417's negative-KL explosions).
            A response ends at its first EOS; what follows is padding. No EOS within --max-new-tokens:
            --missing-eos-penalty is added to its score (N+: the model learns to finish).
  score     --reward vader (VADER compound of the response), rm:PATH (a reward model) or pink (-1 when the
            response mentions the entity it was told to avoid, else 0); the score sits on the last real token.
  forward   π_old, V_old and π_ref on every token, with the *same* forward (layout, padding, minibatches)
            the training step uses, so the ratio π/π_old is exactly 1 on the first minibatch (N+).
  rewards   r_t = -β·KL_t (k1 = log π_old - log π_ref, or --kl-estimator k3) + score at the last token;
            --whiten-rewards rescales them over the batch (mean kept). GAE(γ, λ) -> advantages, whitened
            over the batch's real tokens; returns = advantages + values.
  update    --ppo-epochs passes over shuffled minibatches, one AdamW step each (warmup, then linear decay;
            gradients clipped): the clipped policy loss + --vf-coef · the clipped value loss.

--algo grpo (Shao et al. 2024): --group-size G samples per prompt, advantage (r - mean_G)/std_G on every
token of a sample (--dr-grpo: no std and a constant length normaliser, Liu et al. 2025), no critic, the KL
to π_ref as k3 in the loss. --algo rloo (Ahmadian et al. 2024): the leave-one-out mean of the other G-1
rewards as baseline, the KL (k1) in the reward. Both use the same rollouts, forwards and clipped update.

The critic (--critic): `separate` is N+'s default, a copy of the policy's backbone with its own scalar
head, so the value loss never moves the policy; `shared` puts the head on the policy's own last hidden
state, detached: one backbone for both (about half the training compute: the default here, where 2 CPU cores
are the budget), and still the value loss trains only the head. Either head starts at zero, so V = 0 at first
and the first advantages are the plain returns.

Evaluation, before and after training (and every --eval-every steps): --eval-n samples at temperature 1 for each
held-out prompt (the last --eval-prompts rows of --prompts; for pink, the held-out entity pairs), the mean reward
(and --gold's, when the reward is a proxy) ± its standard error and KL(π‖π₀) ≈ mean log π(y|x) - log π₀(y|x)
over those samples (Monte Carlo, y ~ π; nanorlhf/policy_eval.py, the protocol frontier.py compares with).
The math is in nanorlhf/ppo.py (pure functions, tested by hand), the networks in nanorlhf/actor_critic.py.
Outputs in RUN/: config.json, metrics.jsonl (one line per step), eval.json, training.svg, model/ (HF layout);
RUN/state/ (trainable weights, AdamW, RNG), swapped in atomically every --save-every steps, until the end.
"""

import json
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from nanorlhf import distributed, lora, ppo, scale
from nanorlhf.actor_critic import ActorCritic, Critic, ref_logps, rollout_batch
from nanorlhf.checkpoint import load_model, resolve_model, save_model
from nanorlhf.run import Run, check_flags, flag, parse_config, run_dir, seed_everything
from nanorlhf.model import autocast, device
from nanorlhf.data import read_prompts
from nanorlhf.distributed import print0
from nanorlhf.errors import UserError, run_cli
from nanorlhf.tasks.pink import DATA_DIR, HELDOUT_PATH, eval_rows_from_pairs, judge, load_eval_rows, load_pairs
from nanorlhf.tasks.pink_eval import avoid_messages
from nanorlhf.sampling import SAMPLER_HELP, SAMPLERS, Sampler, generate_batched, sample_responses
from nanorlhf.tasks.policy_eval import evaluate_policy, paired_gain
from nanorlhf.resume import latest, load_train_state, metrics_upto, resumed_config, save_train_state
from nanorlhf.reward import make_gold_scorer
from nanorlhf.schedule import lr_at
from nanorlhf.svg import line_plots
from nanorlhf.tokenizer import Tokenizer


@dataclass
class Config(scale.ScaleConfig):  # + --lora-rank/--lora-alpha/--lora-targets/--grad-checkpointing (no --fsdp)
    fsdp_refused = "train_ppo samples from the policy between steps, which needs the whole model on every rank"
    model: str = flag("llama", "checkpoint dir, local HF cache id, or 'llama' (the embedded SmolLM2-135M)")
    reward: str = flag("vader", "vader (VADER sentiment) | rm:PATH[@TEMPLATE] (a reward model) | pink (-1 per pink mention)")
    prompts: str = flag(str(DATA_DIR / "rest_prompts.jsonl"), "vader/rm: jsonl of {\"prompt\"}, the last "
                        "--eval-prompts held out; pink: the train pairs of data/pink_elephant_pairs.json are used")
    gold: str = flag("", "also score the evaluations with this gold scorer (vader | rm:PATH), e.g. the RM the "
                              "--reward proxy learned from (frontier.py); default: none")
    out_dir: str = flag("out/train_ppo", "runs are written to OUT_DIR/RUN")
    run: str = flag("", "run name (default: a timestamp)")
    resume: str = flag("", "RUN_DIR of an interrupted run: continue it with its own config")
    algo: str = flag("ppo", "ppo (critic + GAE) | grpo (group-relative, KL in the loss) | rloo (leave-one-out)",
                     choices=("ppo", "grpo", "rloo"))
    steps: int = flag(12, "rollout + update rounds (CPU default: ~14 min on 2 cores with both evaluations)", min=1)
    batch_size: int = flag(16, "responses sampled per step (prompts x --group-size), over all torchrun ranks",
                           min=1)
    group_size: int = flag(1, "samples per prompt (grpo and rloo need >= 2)", min=1)
    minibatch_size: int = flag(8, "responses per optimizer step", min=1)
    ppo_epochs: int = flag(2, "passes over each batch of rollouts", min=1)
    max_new_tokens: int = flag(32, "response length cap", min=1)
    temperature: float = flag(1.0, "sampling temperature; the trainer's log-probs use the same", gt=0)
    missing_eos_penalty: float = flag(0.0, "added to the score of a response with no EOS within "
                                           "--max-new-tokens (N+ sets such scores to -1; 0 = off)", max=0)
    lr: float = flag(3e-5, "AdamW peak learning rate (policy and critic)", gt=0)
    weight_decay: float = flag(0.0, "AdamW weight decay", min=0)
    warmup_steps: int = flag(4, "optimizer steps of linear warmup, then linear decay to 0", min=0)
    grad_clip: float = flag(1.0, "max gradient norm", gt=0)
    kl_coef: float = flag(0.05, "β: weight of the KL to the reference (reward for ppo/rloo, loss for grpo)", min=0)
    kl_estimator: str = flag("k1", "per-token KL in the reward: k1 = log π/π_ref | k3 = (ρ-1) - log ρ "
                                   "(grpo always uses k3)", choices=("k1", "k3"))
    whiten_rewards: bool = flag(False, "ppo: rescale the per-token rewards to unit variance over the batch")
    gamma: float = flag(1.0, "GAE discount γ", min=0, max=1)
    lam: float = flag(0.95, "GAE λ", min=0, max=1)
    clip: float = flag(0.2, "PPO ratio clip ε", gt=0)
    value_clip: float = flag(0.2, "value clip ε_v", gt=0)
    vf_coef: float = flag(0.1, "weight of the value loss", min=0)
    critic: str = flag("shared", "separate (a backbone copy, N+'s default) | shared (a head on the policy's "
                                           "features, detached)",
                       choices=("separate", "shared"))
    dr_grpo: bool = flag(False, "grpo: no std scaling, tokens summed over a constant (Dr.GRPO)")
    eval_prompts: int = flag(24, "vader/rm: held-out prompts (the last rows of --prompts)", min=1)
    eval_n: int = flag(4, "samples per held-out prompt (4: half the variance of 2 for the before/after gain)", min=1)
    eval_every: int = flag(0, "also evaluate after every N steps (0 = before and after training only)", min=0)
    gen_batch_size: int = flag(48, "sampling batch size (evaluation)", min=1)
    sampler: str = flag("batch", SAMPLER_HELP, choices=SAMPLERS)
    save_every: int = flag(8, "write RUN/state every N steps (0 = never: a crash loses the run)", min=0)
    seed: int = flag(0, "seed for prompts, sampling, minibatch order and init")

    def check(self) -> None:
        """The rules between flags, before any work (parse_config calls this)."""
        scale.check(self)
        if self.reward not in ("vader", "pink") and not (self.reward.startswith("rm:") and len(self.reward) > 3):
            raise UserError(f"--reward {self.reward!r}: choose vader, pink or rm:PATH (a reward-model checkpoint)")
        if self.gold and self.gold != "vader" and not (self.gold.startswith("rm:") and len(self.gold) > 3):
            raise UserError(f"--gold {self.gold!r}: choose vader or rm:PATH (a reward-model checkpoint)")
        if self.algo in ("grpo", "rloo") and self.group_size < 2:
            raise UserError(f"--algo {self.algo} compares samples of one prompt: --group-size must be >= 2")
        if self.batch_size % self.group_size:
            raise UserError(f"--batch-size {self.batch_size}: must be a multiple of --group-size {self.group_size}")
        if self.dr_grpo and self.algo != "grpo":
            raise UserError("--dr-grpo applies to --algo grpo only")


# --- the task: prompts and a reward ---

def make_task(cfg: Config, dev) -> tuple[list[dict], list[dict], dict[str, Callable[[list[dict], list[str]], list[float]]]]:
    """-> (train rows, held-out rows, {"reward": score(rows, texts) -> [float], "gold": the same for --gold}).
    A row has the chat `messages`."""
    gold = {"gold": prompt_scorer(cfg.gold, dev)} if cfg.gold else {}
    if cfg.reward == "pink":
        # the pink-elephant judge: -1 when the response mentions what it was told to avoid (aliases count)
        train = [{**r, "messages": avoid_messages(r)} for r in eval_rows_from_pairs(load_pairs(), "train")]
        held = [{**r, "messages": avoid_messages(r)} for r in load_eval_rows(HELDOUT_PATH)]
        return train, held, {"reward": lambda rows, texts: [-float(judge(t, r)["pink"]) for r, t in zip(rows, texts)],
                             **gold}
    prompts = read_prompts(cfg.prompts)
    if len(prompts) <= cfg.eval_prompts:
        raise UserError(f"{cfg.prompts}: {len(prompts)} prompts, but --eval-prompts {cfg.eval_prompts} holds out "
                        "that many")
    rows = [{"prompt": p, "messages": [{"role": "user", "content": p}]} for p in prompts]
    return rows[:-cfg.eval_prompts], rows[-cfg.eval_prompts:], {"reward": prompt_scorer(cfg.reward, dev), **gold}


def prompt_scorer(spec: str, dev) -> Callable[[list[dict], list[str]], list[float]]:
    """vader | rm:PATH -> score(rows, texts), each response scored with its row's prompt."""
    scorer = make_gold_scorer(spec, device=dev)
    return lambda rows, texts: scorer.score([r["prompt"] for r in rows], texts)


def step_rows(pool: list[dict], step: int, n: int, seed: int) -> list[dict]:
    """Step `step`'s n prompts: consecutive rows of the pool, reshuffled on every pass (seeded by the pass),
    so any step's prompts follow from its number alone (a resume needs nothing else)."""
    out = []
    for i in range(step * n, (step + 1) * n):
        order = list(range(len(pool)))
        random.Random(f"{seed}:pass{i // len(pool)}").shuffle(order)
        out.append(pool[order[i % len(pool)]])
    return out


def minibatches(B: int, size: int, seed: str) -> list[list[int]]:
    order = list(range(B))
    random.Random(seed).shuffle(order)
    return [order[i:i + size] for i in range(0, B, size)]


# --- one step: rollout, score, forward, advantages, update ---

@torch.no_grad()
def rollout(cfg: Config, policy, tok: Tokenizer, rows: list[dict], score, seed: int, dev,
            sampler: Sampler) -> dict:
    """Sample --group-size responses per row; score them; -> the batch, scores (B,) and what to log."""
    prompts, responses, texts = sample_responses(policy, tok, [r["messages"] for r in rows], cfg.group_size,
                                                 cfg.temperature, seed, cfg.max_new_tokens, len(rows) * cfg.group_size,
                                                 desc="rollout", sampler=sampler)
    ended = torch.tensor([r[-1] in tok.stop_ids for r in responses], dtype=torch.float32)
    raw = torch.tensor(score([r for r in rows for _ in range(cfg.group_size)], texts), dtype=torch.float32)
    scores = raw + cfg.missing_eos_penalty * (1 - ended)  # N+: a response cut by the cap is penalised
    batch = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in rollout_batch(prompts, responses, tok.pad_id).items()}
    return {**batch, "scores": scores.to(dev), "raw_scores": raw, "ended": ended, "texts": texts}


@torch.no_grad()
def old_forward(cfg: Config, ac: ActorCritic, ref, batch: dict, parts: list[list[int]]) -> dict[str, Tensor]:
    """π_old, V_old, π_ref on every response token, (B, L) each, computed minibatch by minibatch in the first
    epoch's order and on this rank's shard of each: the exact forwards the first update repeats with grad,
    so its ratio is 1 to the last bit. Each rank fills its rows; a sum over ranks assembles the batch."""
    B, L = batch["mask"].shape
    out = {k: torch.zeros(B, L, device=batch["ids"].device) for k in ("logp", "values", "ref_logp")}
    for part in parts:
        rows, real = distributed.shard(part)
        if not real:
            continue
        ids, attn = batch["ids"][rows], batch["attn"][rows]
        with autocast(ids.device):
            logp, values, _ = ac(ids, attn, batch["P"], cfg.temperature)
            with lora.disabled(ac.policy):  # with LoRA the reference is the base network itself
                out["ref_logp"][rows] = ref_logps(ref, ids, attn, batch["P"], cfg.temperature)
        out["logp"][rows] = logp
        if values is not None:
            out["values"][rows] = values
    return {k: distributed.all_reduce_sum(v) for k, v in out.items()}


def advantages_of(cfg: Config, batch: dict, old: dict) -> tuple[Tensor, Tensor, dict]:
    """-> advantages (B, L), returns (B, L) (ppo) and statistics. Identical on every rank."""
    mask, scores = batch["mask"], batch["scores"]
    kl = ppo.kl_estimate(old["logp"], old["ref_logp"], cfg.kl_estimator) * mask  # (B, L)
    stats = {"kl": (kl.sum(-1)).mean().item()}  # per response, summed over its tokens
    if cfg.algo == "ppo":
        rewards = ppo.per_token_rewards(scores, kl, mask, cfg.kl_coef)
        if cfg.whiten_rewards:  # N+ / TRL: a scale for the rewards, the mean (and so a penalty's sign) kept
            rewards = ppo.masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = ppo.gae(rewards, old["values"], mask, cfg.gamma, cfg.lam)
        stats.update(value=ppo.masked_mean(old["values"], mask).item(), returns=ppo.masked_mean(returns, mask).item())
        return ppo.masked_whiten(advantages, mask), returns, stats  # N+: advantages whitened over the batch
    groups = scores.view(-1, cfg.group_size)  # (prompts, G): the samples of a prompt are contiguous
    if cfg.algo == "rloo":  # the KL goes into the reward of the whole sequence, k1 summed (Ahmadian et al.)
        groups = groups - cfg.kl_coef * kl.sum(-1).view(-1, cfg.group_size)
        adv = ppo.rloo_advantages(groups)
    else:
        adv = ppo.group_advantages(groups, scale_by_std=not cfg.dr_grpo)
    return adv.reshape(-1, 1) * mask, None, stats  # the sequence's advantage on each of its tokens


def token_weights(cfg: Config, mask: Tensor) -> Tensor:
    """(b, L) -> the weight of each token in the minibatch's loss (Σ over the minibatch = one mean).

    ppo, rloo: a mean over all real tokens. grpo: a mean over each sequence's tokens, then over sequences
    (DeepSeekMath eq. 3); Dr.GRPO: every token weighs 1/(b · max_new_tokens), so long answers are not
    down-weighted per token."""
    mask = mask.float()
    if cfg.algo == "grpo" and cfg.dr_grpo:
        return mask / (mask.shape[0] * cfg.max_new_tokens)
    if cfg.algo == "grpo":
        return mask / (mask.sum(-1, keepdim=True).clamp(min=1) * mask.shape[0])
    return mask / mask.sum().clamp(min=1)


def update(cfg: Config, net, ac: ActorCritic, optimizer, batch: dict, old: dict, advantages: Tensor,
           returns: Tensor | None, parts_of_epoch: list, update_index: int, total_updates: int) -> dict:
    """--ppo-epochs of minibatch steps; -> means of the per-step statistics. Every rank takes the same
    minibatches and trains on its shard of each; the weights make each step's loss the minibatch's mean."""
    logs: dict[str, list[float]] = {}
    first = update_index
    for parts in parts_of_epoch:
        for part in parts:
            lr = cfg.lr * lr_at(update_index, total_updates, cfg.warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            weights = token_weights(cfg, batch["mask"][part])  # over the whole minibatch, all ranks
            rows, real = distributed.shard(part)
            w = weights[[part.index(r) for r in rows]] * (real * distributed.world_size())  # DDP averages ranks
            ids, attn, mask = batch["ids"][rows], batch["attn"][rows], batch["mask"][rows]
            with autocast(ids.device):
                logp, values, logits = net(ids, attn, batch["P"], cfg.temperature)
            pg, clipped, approx_kl = ppo.policy_loss(logp, old["logp"][rows], advantages[rows], cfg.clip)
            loss, named = pg, {"loss/policy": pg, "clipfrac": clipped, "approx_kl": approx_kl,
                               "ratio": torch.exp(logp - old["logp"][rows]).detach(),
                               "entropy": ppo.entropy_from_logits(logits.detach())}
            if cfg.algo == "grpo":  # GRPO's KL is in the loss, k3 of the current π against π_ref (eq. 3)
                kl = ppo.kl_k3(logp, old["ref_logp"][rows])
                loss, named["loss/kl"] = loss + cfg.kl_coef * kl, kl.detach()
            if values is not None:
                vf, vf_clipped = ppo.value_loss(values, old["values"][rows], returns[rows], cfg.value_clip)
                loss, named["loss/value"], named["vf_clipfrac"] = loss + cfg.vf_coef * vf, vf.detach(), vf_clipped
            if update_index == first:  # N+: π_old came from this very forward, so ρ = 1 here, exactly
                named["ratio_dev_first"] = (named["ratio"] - 1).abs().amax().expand_as(mask)
            (loss * w).sum().backward()
            grad_norm = distributed.clip_grad_norm(scale.trainable(ac), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            update_index += 1
            # minibatch means of each statistic over its real tokens, summed over ranks in float64
            sums = torch.tensor([float((v.detach() * mask).sum()) for v in named.values()] + [float(mask.sum())],
                                dtype=torch.float64) * real
            sums = distributed.all_reduce_sum(sums)
            for k, v in zip(named, (sums[:-1] / sums[-1]).tolist()):
                logs.setdefault(k, []).append(v)
            logs.setdefault("grad_norm", []).append(grad_norm)
            logs.setdefault("lr", []).append(lr)
    return {k: sum(v) / len(v) for k, v in logs.items()}


# --- evaluation ---

def evaluate(cfg: Config, policy, ref, tok: Tokenizer, rows: list[dict], scorers: dict, desc: str,
             sampler: Sampler) -> dict:
    """Held-out reward (and --gold) ± standard error and KL(π‖π₀) on --eval-n samples per row at temperature 1
    (nanorlhf/policy_eval.py: the protocol frontier.py compares every method with)."""
    return evaluate_policy(policy, ref, tok, rows, scorers, cfg.eval_n, cfg.seed + 7, cfg.max_new_tokens,
                           cfg.gen_batch_size, desc, sampler)


# --- resumable state: the trainable tensors, AdamW and the RNG (nanorlhf/resume.py) ---

def state_dir(run_dir: Path) -> Path:
    if (found := latest(run_dir, "state", "state.json")) is None:
        raise UserError(f"--resume {run_dir}: no resumable state (state/state.json) in that directory")
    return found


def trainable_tensors(ac: ActorCritic) -> dict[str, Tensor]:
    """Only what trains: with LoRA the adapters and the head; a tied lm_head is the embedding (listed once)."""
    return {k: p for k, p in ac.named_parameters() if p.requires_grad}


# --- the run ---

def train(cfg: Config, ac: ActorCritic, ref, tok: Tokenizer, pool: list[dict], score, run: Run, dev,
          history: list[dict], evaluate_at: Callable[[int], None], sampler: Sampler) -> list[dict]:
    net = distributed.wrap(ac)  # DDP under torchrun (every rank samples the same rollouts), else ac itself
    optimizer = torch.optim.AdamW(scale.trainable(ac), lr=cfg.lr, weight_decay=cfg.weight_decay)
    per_step = cfg.ppo_epochs * math.ceil(cfg.batch_size / cfg.minibatch_size)
    start = 0
    if cfg.resume:
        start, tensors = load_train_state(state_dir(run.dir), optimizer)
        with torch.no_grad():
            for k, p in trainable_tensors(ac).items():
                p.copy_(tensors[k])
    bar = distributed.bar(total=cfg.steps, initial=start, desc=cfg.algo.upper(), unit="step")
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        # every seed follows from (--seed, step): a resumed run draws what the uninterrupted one drew
        rows = step_rows(pool, step, cfg.batch_size // cfg.group_size, cfg.seed)
        batch = rollout(cfg, ac.policy.eval(), tok, rows, score, cfg.seed * 100_003 + step, dev, sampler)
        t1 = time.perf_counter()
        parts = [minibatches(cfg.batch_size, cfg.minibatch_size, f"{cfg.seed}:{step}:{e}")
                 for e in range(cfg.ppo_epochs)]
        old = old_forward(cfg, ac, ref, batch, parts[0])
        advantages, returns, stats = advantages_of(cfg, batch, old)
        ac.train()  # no dropout in the model: train() changes nothing numerically (N+)
        stats.update(update(cfg, net, ac, optimizer, batch, old, advantages, returns, parts, step * per_step,
                            cfg.steps * per_step))
        ac.eval()
        lengths = batch["mask"].sum(-1).float()
        metrics = {"step": step + 1, "score": batch["raw_scores"].mean().item(),
                   "score_std": batch["raw_scores"].std().item() if cfg.batch_size > 1 else 0.0,
                   "eos_rate": batch["ended"].mean().item(), "response_tokens": lengths.mean().item(),
                   **stats, "rollout_s": t1 - t0, "train_s": time.perf_counter() - t1}
        run.log(**metrics)
        history.append(metrics)
        bar.set_postfix(score=f"{metrics['score']:+.3f}", kl=f"{metrics['kl']:.3f}",
                        clip=f"{metrics['clipfrac']:.2f}")
        bar.update()
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps and distributed.is_main():
            evaluate_at(step + 1)  # before the state is saved: a resume from here never repeats it
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps and distributed.is_main():
            save_train_state(run.dir / "state", step + 1, trainable_tensors(ac), optimizer)
    bar.close()
    return history


def main() -> None:
    cfg, history = parse_config(Config, __doc__), []  # every flag checked before any work
    if not cfg.resume:
        run_dir(cfg.out_dir, cfg.run)  # refuse a used --run now, not after the model has loaded
    distributed.init()  # torchrun: every rank samples and scores alike; updates are sharded
    if cfg.resume:  # the interrupted run's own config and its metrics up to the saved state
        step = json.loads((state_dir(Path(cfg.resume)) / "state.json").read_text())["step"]
        cfg, history = resumed_config(Config, cfg.resume, "train_ppo"), metrics_upto(Path(cfg.resume), step)
        check_flags(cfg)
        print0(f"resuming {cfg.resume} after step {step}")
    sampler = generate_batched
    if cfg.sampler == "stream":  # continuous batching, the optional fast layer: imported only when asked
        from nanorlhf.fast.stream import generate_streamed as sampler
    seed_everything(cfg.seed)
    started, dev = time.perf_counter(), device()
    pool, held_out, scorers = make_task(cfg, dev)  # every input validated before any work
    score = scorers["reward"]
    model_dir = resolve_model(cfg.model)
    tok, policy = Tokenizer(model_dir), load_model(model_dir, device=dev).eval()
    critic = None if cfg.algo != "ppo" else Critic(policy.model if cfg.critic == "separate" else None,
                                                   policy.cfg.hidden_size).to(dev)
    scale.prepare(policy, cfg, cfg.seed)  # LoRA adapters (everything else frozen), gradient checkpointing
    if critic is not None and critic.model is not None:
        scale.prepare(critic, cfg, f"{cfg.seed}:critic")
    if critic is not None:
        critic.head.requires_grad_(True)  # the head is new: it always trains whole
    ac = ActorCritic(policy, critic)
    if cfg.lora_rank:
        ref = policy  # the reference is the base network: adapters off (old_forward, evaluate), no copy
    else:
        ref = load_model(model_dir, device=dev).eval().requires_grad_(False)  # π_ref = π₀, frozen
    ref_view = lora.BaseView(policy) if cfg.lora_rank else ref
    run = Run("train_ppo", cfg.out_dir, cfg.run, cfg, resume=bool(cfg.resume))
    if cfg.resume:
        run.rewrite(history)  # metrics.jsonl back to the saved state's step
    print0(f"{cfg.algo}: {cfg.steps} steps x {cfg.batch_size} responses ({cfg.group_size} per prompt), "
           f"reward {cfg.reward}, {len(pool)} train prompts, {len(held_out)} held out x {cfg.eval_n}; "
           f"{sum(p.numel() for p in scale.trainable(ac)):,} trainable parameters")

    saved = run.dir / "eval.json"  # a resumed run keeps the evaluations it already made
    results = json.loads(saved.read_text()) if cfg.resume and saved.is_file() else {}

    def evaluate_at(step: int, name: str = "") -> None:  # rank 0 only: the others wait at their next collective
        results.setdefault("steps", {})[str(step)] = evaluate(cfg, policy, ref_view, tok, held_out, scorers,
                                                              f"eval step {step}", sampler)
        results.update({name: results["steps"][str(step)]} if name else {})
        run.write_json("eval.json", results)

    if distributed.is_main() and "before" not in results:
        evaluate_at(0, "before")
    history = train(cfg, ac, ref, tok, pool, score, run, dev, history, evaluate_at, sampler)
    save_model(policy, run.dir / "model", copy_from=model_dir)  # every rank calls it; rank 0 writes (merged)
    if not distributed.is_main():
        return
    shutil.rmtree(run.dir / "state", ignore_errors=True)  # complete: model/ is the final state
    evaluate_at(cfg.steps, "after")
    series = lambda *keys: {k: [(m["step"], m[k]) for m in history if k in m] for k in keys}
    line_plots([("training reward (raw score, mean)", series("score")),
                ("KL to the reference (per response)", series("kl")),
                ("losses", series("loss/policy", "loss/value", "loss/kl")),
                ("clip fraction, approx KL(π_old‖π), entropy", series("clipfrac", "approx_kl", "entropy"))],
               run.dir / "training.svg")
    b, a = results["before"], results["after"]
    print(f"\nheld-out: {b['samples']} samples (temperature 1, seed {cfg.seed + 7}), reward {cfg.reward}")
    gold_col = f" gold ({cfg.gold}) ± SE |" if cfg.gold else ""
    print(f"| policy | reward ± SE |{gold_col} KL(π‖π₀) ± SE | EOS rate | tokens |\n|---|---|---|---|---|{'---|' * bool(cfg.gold)}")
    for name, r in (("π₀", b), (cfg.algo, a)):
        gold = f" {r['gold']:+.3f} ± {r['gold_se']:.3f} |" if cfg.gold else ""
        print(f"| {name} | {r['reward']:+.3f} ± {r['reward_se']:.3f} |{gold} {r['kl']:.3f} ± {r['kl_se']:.3f} | "
              f"{r['eos_rate']:.2f} | {r['mean_tokens']:.1f} |")
    for name in ("reward", "gold") if cfg.gold else ("reward",):
        gain, se = paired_gain(b[f"{name}_by_prompt"], a[f"{name}_by_prompt"])
        print(f"{name} gain {gain:+.3f} ± {se:.3f} (SE over the {len(held_out)} prompts, paired by prompt)")
    print(f"policy, metrics and plots in {run.dir} ({(time.perf_counter() - started) / 60:.1f} min)")


if __name__ == "__main__":
    run_cli(main)
