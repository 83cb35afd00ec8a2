"""RL from verifiable rewards: GRPO and its 2025 variants, with a checker instead of a reward model.

    python data/build_verify.py                       # once: the problems (seeded, shipped)
    python train_grpo.py                              # SmolLM2-135M-Instruct on a + b, a, b in 1..9
    python train_grpo.py --loss-type grpo --epsilon-high 0.2 --beta 0.04   # DeepSeekMath's GRPO
    python train_grpo.py --advantage rloo --scale-rewards none             # RLOO's baseline
    python train_grpo.py --resume out/train_grpo/RUN  # continue an interrupted run exactly

One step, top to bottom:

  rollout   --prompts-per-step problems from data/verify_train.jsonl (--tasks), --group-size G
            replies to each from the current policy π_old at --temperature (no top-k / top-p: the
            trainer must see the distribution the replies were drawn from).
  reward    1 when the reply's last number equals the answer, else 0 (nanorlhf/tasks/verify.py
            states the rule). frac_reward_zero_std: the share of groups whose G rewards are all
            equal; their advantages are 0 (no signal); --filter-zero-std drops them from the update.
  advantage A_i = r_i - mean_G(r) (Shao et al. 2024), or --advantage rloo: r_i - the mean of the
            other G-1 (Ahmadian et al. 2024); then divided by the std of the group, of the whole
            batch, or not at all (--scale-rewards group | batch | none; none: Dr. GRPO's).
  update    --epochs passes over shuffled minibatches (one AdamW step each, accumulated over
            micro-batches): the clipped surrogate with clip-higher, ρ clipped to [1 - ε_low,
            1 + ε_high] (DAPO, Yu et al. 2025), plus β·k3 to the reference when --beta > 0 (β = 0
            loads no reference), reduced by --loss-type: grpo | dr_grpo | dapo (their functions).
            π_old of the first minibatch is its own forward (ρ = 1 exactly: ratio_dev_first); the
            others' come from a no-grad forward before the first update, in the same layout.

Evaluation, before and after training (and every --eval-every steps), on the held-out problems of
the same tasks: greedy accuracy, T = 1 pass@1 and pass@k (the unbiased estimator of Chen et al.
2021) from --eval-n samples per problem, each mean ± SE over problems, beside the mean reply length
and KL(π‖π₀) (the mean of log π(y|x) - log π₀(y|x) over the T = 1 samples; π₀ is loaded for it,
after training, when --beta 0 kept no reference). Outputs in RUN/: config.json, metrics.jsonl,
eval.json, training.svg, model/ (HF layout); RUN/state/ every --save-every steps until the end.
"""

import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from nanorlhf import lora
from nanorlhf.checkpoint import load_model, resolve_model, save_model
from nanorlhf.distributed import launched
from nanorlhf.errors import NonFiniteLogits, UserError, run_cli
from nanorlhf.run import (Run, THREADS_HELP, check_finite, choose_threads, exit_interrupted, flag,
                          load_state, parse_config, read_results, resume_run, run_dir,
                          save_state, seed_everything)
from nanorlhf.step import lr_at, response_logps_batched
from nanorlhf.model import autocast, device
from nanorlhf.sampling import SAMPLER_HELP, SAMPLERS, generate_batched, left_pad, sample_responses
from nanorlhf.svg import line_plots
from nanorlhf.tasks.stats import mean_se, pass_at_k
from nanorlhf.tasks.verify import HELDOUT_PATH, TRAIN_PATH, check, parse_tasks, read_problems
from nanorlhf.tokenizer import Tokenizer


@dataclass
class Config:
    model: str = flag("llama", "checkpoint dir, local HF cache id, or 'llama' (SmolLM2-135M)")
    tasks: str = flag("add1", "comma-separated problem families: add1, add2, add3, mul1, count1")
    train_problems: str = flag(str(TRAIN_PATH), "jsonl of training problems")
    heldout_problems: str = flag(str(HELDOUT_PATH), "jsonl of held-out problems (evaluation)")
    out_dir: str = flag("out/train_grpo", "runs are written to OUT_DIR/RUN")
    run: str = flag("", "run name (default: a timestamp)")
    resume: str = flag("", "RUN_DIR of an interrupted run: continue it with its own config")
    save_every: int = flag(10, "write RUN/state every N steps (0 = never)", min=0)
    steps: int = flag(8, "rollout + update rounds", min=1)
    prompts_per_step: int = flag(4, "problems per rollout", min=1)
    group_size: int = flag(8, "G: replies sampled per problem", min=2)
    minibatch_size: int = flag(16, "replies per optimizer step (0 = the whole rollout)", min=0)
    micro_batch_size: int = flag(8, "replies per forward/backward (gradients accumulate)", min=1)
    epochs: int = flag(1, "passes over each rollout (μ in GRPO's algorithm)", min=1)
    max_new_tokens: int = flag(16, "reply length cap (also Dr. GRPO's constant normaliser)", min=1)
    temperature: float = flag(1.0, "sampling temperature (the trainer's log-probs use it)", gt=0)
    loss_type: str = flag("dapo", "grpo: per-sequence mean, then mean | dr_grpo: sum / (B·max "
                          "tokens) | dapo: token mean over the accumulated batch",
                          choices=("grpo", "dr_grpo", "dapo"))
    advantage: str = flag("group", "group: r - mean of the group | rloo: r - mean of the others",
                          choices=("group", "rloo"))
    scale_rewards: str = flag("group", "divide advantages by the std of the group | batch | none",
                              choices=("group", "batch", "none"))
    filter_zero_std: bool = flag(False, "leave groups whose rewards all equal out of the update")
    epsilon_low: float = flag(0.2, "ρ clipped below at 1 - ε_low", gt=0, lt=1)
    epsilon_high: float = flag(0.28, "ρ clipped above at 1 + ε_high (clip-higher: > ε_low)", gt=0)
    beta: float = flag(0.0, "β: weight of k3 KL to the reference in the loss (0: no reference)",
                       min=0)
    lr: float = flag(2e-5, "AdamW peak learning rate", gt=0)
    weight_decay: float = flag(0.0, "AdamW weight decay", min=0)
    warmup_steps: int = flag(2, "rollout steps of linear warmup, then linear decay to 0", min=0)
    grad_clip: float = flag(1.0, "max gradient norm", gt=0)
    eval_n: int = flag(8, "T = 1 samples per held-out problem (pass@1, pass@k)", min=1)
    eval_k: int = flag(4, "k of the reported pass@k (<= --eval-n)", min=1)
    eval_problems: int = flag(0, "held-out problems evaluated (0 = all of --tasks)", min=0)
    eval_every: int = flag(0, "also evaluate every N steps (0 = before and after only)", min=0)
    eval_seed: int = flag(7, "sampling seed of every evaluation (the same samples for π₀)")
    sampler: str = flag("stream", SAMPLER_HELP, choices=SAMPLERS)
    gen_batch_size: int = flag(64, "rows sampled together", min=1)
    lora_rank: int = flag(0, "LoRA rank r: train adapters only (0 = full fine-tuning)", min=0)
    lora_alpha: float = flag(16.0, "LoRA α: the adapter update is scaled by α/r", gt=0)
    lora_targets: str = flag(",".join(lora.TARGETS), "comma-separated projections with adapters")
    grad_checkpointing: bool = flag(False, "recompute each block's activations in backward")
    onednn: bool = flag(False, "CPU matmuls through oneDNN with packed weights (not bit-equal)")
    threads: int = flag(0, THREADS_HELP, min=0)
    seed: int = flag(0, "seed for problems, sampling, minibatch order and LoRA init")

    def check(self) -> None:
        """The rules between flags, before any work (parse_config calls this)."""
        lora.parse_targets(self.lora_targets)
        parse_tasks(self.tasks)
        if self.epsilon_high < self.epsilon_low:
            raise UserError(f"--epsilon-high {self.epsilon_high}: must be >= --epsilon-low "
                            f"{self.epsilon_low} (clip-higher widens the upper side only)")
        if self.eval_k > self.eval_n:
            raise UserError(f"--eval-k {self.eval_k}: pass@k needs --eval-n >= k")


# --- the math: advantages, the clipped surrogate, the KL, the three reductions (pure functions) ---

def group_advantages(rewards: Tensor, scale: str, eps: float = 1e-4) -> Tensor:
    """GRPO's outcome advantage (Shao et al. 2024, §4.1.2): rewards (P, G) -> (P, G),

        A_i = (r_i - mean_G(r)) / (std + eps)

    std: of the group (scale "group", GRPO), of all P·G rewards ("batch", TRL's
    scale_rewards="batch"), or no division ("none": Dr. GRPO, Liu et al. 2025, whose point is that
    dividing by a group's std up-weights problems that are nearly always or nearly never solved).
    std is the unbiased sample std (torch.std), as TRL's."""
    centred = rewards - rewards.mean(-1, keepdim=True)
    return scale_advantages(centred, rewards, scale, eps)


def rloo_advantages(rewards: Tensor, scale: str, eps: float = 1e-4) -> Tensor:
    """RLOO (Ahmadian et al. 2024): rewards (P, G), G >= 2 -> (P, G),

        A_i = r_i - (Σ_j r_j - r_i) / (G - 1)      (= G/(G-1) · (r_i - mean_G(r)))

    the mean of the *other* replies as baseline (independent of reply i: an unbiased REINFORCE
    estimate), then scaled as `scale` says (group_advantages)."""
    G = rewards.shape[-1]
    loo = rewards - (rewards.sum(-1, keepdim=True) - rewards) / (G - 1)
    return scale_advantages(loo, rewards, scale, eps)


def scale_advantages(advantages: Tensor, rewards: Tensor, scale: str, eps: float) -> Tensor:
    """advantages (P, G) / (std of rewards + eps) over each group, the batch, or not at all."""
    if scale == "group":
        return advantages / (rewards.std(-1, keepdim=True) + eps)
    if scale == "batch":
        return advantages / (rewards.std() + eps)
    return advantages


def clipped_surrogate(logp: Tensor, old_logp: Tensor, advantages: Tensor, eps_low: float,
                      eps_high: float) -> tuple[Tensor, Tensor, Tensor]:
    """PPO's clipped objective with clip-higher (DAPO, Yu et al. 2025, §3.1), as a loss per token:
    logp, old_logp (b, L), advantages (b,) -> loss (b, L) and where the clip is active (low, high):

        L_{i,t} = -min(ρ_{i,t}·A_i, clip(ρ_{i,t}, 1 - ε_low, 1 + ε_high)·A_i),
        ρ_{i,t} = π_θ(o_{i,t} | q, o_{i,<t}) / π_old(o_{i,t} | q, o_{i,<t})

    ε_high > ε_low lets an unlikely token that earned a positive advantage grow further before its
    gradient stops (DAPO: against entropy collapse). old_logp and advantages are constants. The clip
    is active (gradient 0) where ρ < 1 - ε_low with A < 0, or ρ > 1 + ε_high with A > 0 (TRL's
    is_low_clipped / is_high_clipped)."""
    advantages = advantages.detach()[:, None]  # (b, 1): one advantage for every token of a reply
    ratio = torch.exp(logp - old_logp.detach())
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    loss = -torch.minimum(ratio * advantages, clipped * advantages)
    with torch.no_grad():
        low = (ratio < 1 - eps_low) & (advantages < 0)
        high = (ratio > 1 + eps_high) & (advantages > 0)
    return loss, low, high


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Schulman's k3 per token, (b, L) -> (b, L): with ρ = π_ref/π_θ, k3 = ρ - 1 - log ρ >= 0, an
    unbiased estimate of KL(π_θ‖π_ref) on tokens drawn from π_θ (DeepSeekMath eq. 4)."""
    log_rho = ref_logp.detach() - logp
    return torch.expm1(log_rho) - log_rho  # expm1: exact near ρ = 1, where ρ - 1 would cancel


def grpo_loss(token_loss: Tensor, mask: Tensor, num_sequences: int) -> Tensor:
    """GRPO's reduction (Shao et al. 2024, eq. 3): a mean over each reply's tokens, then replies,

        L = 1/B · Σ_i 1/|o_i| · Σ_t L_{i,t}

    token_loss, mask (b, L) -> this micro-batch's share of the mean over the B = num_sequences
    replies of the optimizer step (shares of all its micro-batches add up to L). A token of a long
    reply weighs less than one of a short reply: the length bias Dr. GRPO points out."""
    mask = mask.to(token_loss.dtype)
    per_reply = (token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # (b,)
    return per_reply.sum() / num_sequences


def dr_grpo_loss(token_loss: Tensor, mask: Tensor, num_sequences: int, max_tokens: int) -> Tensor:
    """Dr. GRPO's reduction (Liu et al. 2025, "Understanding R1-Zero-like training"): every
    token summed, over a constant,

        L = 1/(B · L_max) · Σ_i Σ_t L_{i,t}

    with B = num_sequences replies in the optimizer step and L_max = max_tokens (--max-new-tokens,
    the cap, not the batch's longest: a constant, as in TRL). token_loss, mask (b, L) -> this
    micro-batch's share."""
    mask = mask.to(token_loss.dtype)
    return (token_loss * mask).sum() / (num_sequences * max_tokens)


def dapo_loss(token_loss: Tensor, mask: Tensor, num_tokens: int) -> Tensor:
    """DAPO's token-level reduction (Yu et al. 2025, §3.3): a mean over every token of the whole
    accumulated batch,

        L = 1/(Σ_i |o_i|) · Σ_i Σ_t L_{i,t}

    num_tokens = Σ_i |o_i| over all replies of the optimizer step (every micro-batch), so the loss
    does not depend on how the batch is split (TRL: num_items_in_batch). token_loss, mask (b, L)
    -> this micro-batch's share."""
    mask = mask.to(token_loss.dtype)
    return (token_loss * mask).sum() / num_tokens


ADVANTAGES = {"group": group_advantages, "rloo": rloo_advantages}


def reduce_loss(loss_type: str, token_loss: Tensor, mask: Tensor, num_sequences: int,
                num_tokens: int, max_tokens: int) -> Tensor:
    if loss_type == "grpo":
        return grpo_loss(token_loss, mask, num_sequences)
    if loss_type == "dr_grpo":
        return dr_grpo_loss(token_loss, mask, num_sequences, max_tokens)
    return dapo_loss(token_loss, mask, num_tokens)


# --- the data of a step: problems, the batch layout, log-probs ---

def conversation(problem: dict) -> list[dict]:
    return [{"role": "user", "content": problem["prompt"]}]


def step_rows(pool: list[dict], step: int, n: int, seed: int) -> list[dict]:
    """Step `step`'s n problems: consecutive rows of the pool, reshuffled on every pass (seeded by
    the pass), so any step's problems follow from its number alone (a resume needs nothing else)."""
    out = []
    for i in range(step * n, (step + 1) * n):
        order = list(range(len(pool)))
        random.Random(f"{seed}:pass{i // len(pool)}").shuffle(order)
        out.append(pool[order[i % len(pool)]])
    return out


def rollout_batch(prompts: list[list[int]], responses: list[list[int]], pad_id: int, dev
                  ) -> dict[str, Tensor]:
    """Left-padded prompts (P columns) + right-padded replies (L columns) -> ids, attn (B, P+L),
    mask (B, L) on reply tokens: reply token j sits in column P+j, predicted by column P+j-1."""
    prompt_ids, prompt_attn = left_pad(prompts, pad_id)
    L = max(map(len, responses))
    reply = torch.full((len(responses), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(responses), L), dtype=torch.long)
    for i, r in enumerate(responses):
        reply[i, :len(r)], mask[i, :len(r)] = torch.tensor(r, dtype=torch.long), 1
    return {"ids": torch.cat([prompt_ids, reply], 1).to(dev), "mask": mask.to(dev),
            "attn": torch.cat([prompt_attn, mask], 1).to(dev), "P": prompt_ids.shape[1]}


def token_logps(net, batch: dict, rows: list[int], temperature: float) -> tuple[Tensor, Tensor]:
    """log π(o_t | q, o_<t) of the reply tokens of `rows`, (b, L) fp32, at the sampling temperature,
    and the entropy of each of those next-token distributions (b, L), without gradient. The
    vocabulary projection runs on reply positions only (one call of the model's forward)."""
    ids, attn, P = batch["ids"][rows], batch["attn"][rows], batch["P"]
    at = torch.zeros_like(ids, dtype=torch.bool)
    at[:, P - 1:-1] = True  # the positions that predict reply tokens
    with autocast(ids.device):
        logits = net(ids, attn, logits_at=at)  # (b·L, V)
    logits = logits.float().view(len(rows), ids.shape[1] - P, -1) / temperature  # (b, L, V)
    logps = logits.log_softmax(-1)
    with torch.no_grad():
        entropy = -(logps.exp() * logps).sum(-1)
    return logps.gather(-1, ids[:, P:, None]).squeeze(-1), entropy


def micro_batches(rows: list[int], size: int) -> list[list[int]]:
    return [rows[i:i + size] for i in range(0, len(rows), size)]


def minibatches(rows: list[int], size: int, epochs: int, seed: str) -> list[list[list[int]]]:
    """--epochs shuffles of `rows` cut into minibatches of `size` (0: all): [epoch][minibatch]."""
    out = []
    for epoch in range(epochs):
        order = list(rows)
        random.Random(f"{seed}:{epoch}").shuffle(order)
        out.append(micro_batches(order, size or len(order) or 1) if order else [])
    return out


# --- one step: rollout, reward, advantages, update ---

@torch.no_grad()
def logps_of(model, batch: dict, parts: list[list[int]], cfg: Config) -> Tensor:
    """log-probs (B, L) of `model` on the rows of `parts`, micro-batch by micro-batch, in the layout
    the update uses (so π_old computed here is the update's π_θ to the last bit before any step)."""
    out = torch.zeros(batch["mask"].shape, device=batch["mask"].device)
    for rows in parts:
        for micro in micro_batches(rows, cfg.micro_batch_size):
            out[micro] = token_logps(model, batch, micro, cfg.temperature)[0]
    return out


def update(cfg: Config, net, optimizer, params: list[Tensor], batch: dict, advantages: Tensor,
           old: Tensor, ref_logp: Tensor | None, epochs: list[list[list[int]]], step: int
           ) -> dict[str, float]:
    """--epochs passes of minibatch steps of rollout step `step` (1-based); -> the mean of each
    statistic over the minibatches."""
    logs: dict[str, list[float]] = {}
    for epoch, parts in enumerate(epochs):
        for index, rows in enumerate(parts):
            mask = batch["mask"][rows]
            # the normalisers count the whole minibatch: accumulated, the loss of one big batch
            num_sequences, num_tokens = len(rows), int(mask.sum())
            sums, ratio_dev = torch.zeros(5, dtype=torch.float64), 0.0
            for micro in micro_batches(rows, cfg.micro_batch_size):
                logp, entropy = token_logps(net, batch, micro, cfg.temperature)
                if epoch == 0 and index == 0:  # before any step π_old is π_θ: this very forward
                    old[micro] = logp.detach()
                token_loss, low, high = clipped_surrogate(logp, old[micro], advantages[micro],
                                                          cfg.epsilon_low, cfg.epsilon_high)
                kl = torch.zeros_like(logp)
                if cfg.beta > 0:  # GRPO's KL penalty sits in the loss, per token (eq. 3)
                    kl = kl_k3(logp, ref_logp[micro])
                    token_loss = token_loss + cfg.beta * kl
                loss = reduce_loss(cfg.loss_type, token_loss, batch["mask"][micro], num_sequences,
                                   num_tokens, cfg.max_new_tokens)
                loss.backward()  # gradients add up over the micro-batches
                m = batch["mask"][micro].bool()
                ratio_dev = max(ratio_dev, float((logp - old[micro]).detach().abs()[m].max()))
                sums += torch.tensor([loss.item(), low[m].sum(), high[m].sum(), entropy[m].sum(),
                                      kl.detach()[m].sum()], dtype=torch.float64)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
            # a NaN or inf stops the run here, before the weights step on it: the last state stays
            check_finite(step, "lower --lr", grad_norm=grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            n = max(num_tokens, 1)
            named = {"loss": sums[0], "clip_low": sums[1] / n, "clip_high": sums[2] / n,
                     "entropy": sums[3] / n, "grad_norm": grad_norm}
            if cfg.beta > 0:
                named["kl"] = sums[4] / n  # k3 per token, the penalty's own estimate
            for key, value in named.items():
                logs.setdefault(key, []).append(float(value))
            if epoch == 0 and index == 0:  # N+: the ratio of the first minibatch is exactly 1
                logs["ratio_dev_first"] = [ratio_dev]
    return {k: sum(v) / len(v) for k, v in logs.items()}


def train(cfg: Config, policy, net, ref, optimizer, sample: Callable, pool: list[dict], tok,
          run: Run, start: int, history: list[dict], evaluate_at: Callable[[int], None]) -> None:
    params = [p for p in policy.parameters() if p.requires_grad]
    dev, G = next(policy.parameters()).device, cfg.group_size
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        # every seed follows from (--seed, step): a resumed run draws what the straight one drew
        problems = step_rows(pool, step, cfg.prompts_per_step, cfg.seed)
        policy.eval()
        prompts, responses, texts = sample(policy, [conversation(p) for p in problems], G,
                                           cfg.temperature, cfg.seed * 100_003 + step, "rollout")
        # the verifiable reward: the checker, nothing learned
        rewards = torch.tensor([float(check(t, problems[i // G]["answer"]))
                                for i, t in enumerate(texts)]).view(-1, G)  # (P, G)
        advantages = ADVANTAGES[cfg.advantage](rewards, cfg.scale_rewards).flatten().to(dev)
        zero_std = (rewards.std(-1) == 0).repeat_interleave(G)  # (B,): groups without signal
        rows = [i for i in range(len(texts)) if not (cfg.filter_zero_std and zero_std[i])]
        batch = rollout_batch(prompts, responses, tok.pad_id, dev)
        epochs = minibatches(rows, cfg.minibatch_size, cfg.epochs, f"{cfg.seed}:{step}")
        t1 = time.perf_counter()
        # π_old of every minibatch after the first, before the first step changes π_θ
        old = logps_of(policy, batch, epochs[0][1:] if epochs else [], cfg)
        ref_logp = logps_of(ref, batch, [rows], cfg) if cfg.beta > 0 else None
        for group in optimizer.param_groups:  # the schedule follows the rollout step (resumable)
            group["lr"] = cfg.lr * lr_at(step, cfg.steps, cfg.warmup_steps)
        policy.train()  # no dropout in the model: train() changes nothing numerically
        stats = update(cfg, net, optimizer, params, batch, advantages, old, ref_logp, epochs,
                       step + 1)
        lengths = batch["mask"].sum(-1).float()
        metrics = {"step": step + 1, "reward": rewards.mean().item(),
                   "frac_reward_zero_std": zero_std.float().mean().item(),
                   "response_tokens": lengths.mean().item(),
                   "eos_rate": sum(r[-1] in tok.stop_ids for r in responses) / len(responses),
                   "completions": (step + 1) * len(texts), **stats,
                   "lr": optimizer.param_groups[0]["lr"],
                   "rollout_s": t1 - t0, "train_s": time.perf_counter() - t1}
        run.log(**metrics)
        history.append(metrics)
        print(f"step {step + 1}/{cfg.steps}: reward {metrics['reward']:.3f}, "
              f"{metrics['response_tokens']:.1f} tokens, zero-std groups "
              f"{metrics['frac_reward_zero_std']:.2f}, {time.perf_counter() - t0:.1f}s")
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
            evaluate_at(step + 1)  # before the state is saved: a resume from here never repeats it
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            save_state(run.dir, step + 1, trainable_tensors(policy), optimizer)


def trainable_tensors(policy) -> dict[str, Tensor]:
    """Only what trains: everything, or with LoRA the adapters (a tied head is listed once)."""
    return {k: p for k, p in policy.named_parameters() if p.requires_grad}


# --- evaluation ---

@torch.no_grad()
def evaluate(policy, base: Callable | None, sample: Callable, problems: list[dict], tok, n: int,
             k: int, seed: int, desc: str) -> dict:
    """Greedy accuracy, T = 1 pass@1 and pass@k (n samples per problem), each mean ± SE over the
    problems; mean reply length; KL(π‖π₀) ± SE over the T = 1 samples. base() -> π₀ (None: the
    policy is π₀)."""
    conversations = [conversation(p) for p in problems]
    _, _, greedy = sample(policy, conversations, 1, 0.0, seed, desc=f"{desc} greedy")
    prompts, responses, texts = sample(policy, conversations, n, 1.0, seed, desc=f"{desc} T=1")
    correct = [sum(check(texts[i * n + j], p["answer"]) for j in range(n))
               for i, p in enumerate(problems)]
    out = {}
    greedy_correct = [float(check(t, p["answer"])) for t, p in zip(greedy, problems)]
    for name, values in (("greedy", greedy_correct), ("pass1", [c / n for c in correct]),
                         (f"pass{k}", [pass_at_k(n, c, k) for c in correct])):
        out[name], out[f"{name}_se"] = mean_se(values)
        out[f"{name}_by_problem"] = values  # two evaluations compare problem by problem
    if base is None:  # the policy is π₀ itself (step 0): KL 0 exactly, no forward needed
        out["kl"], out["kl_se"] = 0.0, 0.0
    else:
        logp = response_logps_batched(policy, prompts, responses, tok.pad_id)
        base_logp = response_logps_batched(base(), prompts, responses, tok.pad_id)
        out["kl"], out["kl_se"] = mean_se([a - b for a, b in zip(logp, base_logp)])
    out["mean_tokens"], out["mean_tokens_se"] = mean_se([float(len(r)) for r in responses])
    out["eos_rate"] = sum(bool(r) and r[-1] in tok.stop_ids for r in responses) / len(responses)
    out.update(problems=len(problems), samples=len(texts), k=k,
               examples=[{"prompt": p["prompt"], "greedy": g, "sample": texts[i * n]}
                         for i, (p, g) in enumerate(zip(problems, greedy))][:8])
    return out


def paired_gain(before: list[float], after: list[float]) -> tuple[float, float]:
    """Per-problem values of two evaluations of the same problems -> (gain, SE over problems)."""
    return mean_se([a - b for a, b in zip(after, before, strict=True)])


# --- the run ---

def main() -> None:
    cfg, history, start = parse_config(Config, __doc__), [], 0  # every flag checked first
    if launched():
        raise UserError("train_grpo runs in one process (no torchrun): ranks would sample alike")
    if cfg.resume:  # the interrupted run's own config and its metrics up to the saved state
        cfg, start, history = resume_run(Config, cfg.resume, "train_grpo")
    else:
        run_dir(cfg.out_dir, cfg.run)  # refuse a used --run now, not after the model has loaded
    threads = choose_threads(cfg.threads)
    sampler = generate_batched
    if cfg.sampler == "stream":  # continuous batching, the optional fast layer: only when asked
        from nanorlhf.fast.decode import generate_streamed as sampler
    seed_everything(cfg.seed)
    started, dev = time.perf_counter(), device()
    tasks = parse_tasks(cfg.tasks)
    pool = read_problems(cfg.train_problems, tasks)
    held_out = read_problems(cfg.heldout_problems, tasks)
    held_out = held_out[:cfg.eval_problems] if cfg.eval_problems else held_out
    model_dir = resolve_model(cfg.model)
    tok, policy = Tokenizer(model_dir), load_model(model_dir, device=dev).eval()
    lora.adapt(policy, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.seed)  # rank 0: no-op
    policy.model.grad_checkpointing = cfg.grad_checkpointing
    if cfg.onednn:  # the optional speed layer, imported only where its flag is read
        from nanorlhf.fast.packed import pack_linears
        pack_linears(policy)
    # π_ref: none at β = 0 (nothing to load); with LoRA the base network itself (adapters off)
    ref = None
    if cfg.beta > 0:
        ref = lora.BaseView(policy) if cfg.lora_rank else \
            load_model(model_dir, device=dev).eval().requires_grad_(False)

    def base():  # π₀ for the evaluation's KL: the reference, or loaded for the occasion
        return ref if ref is not None else lora.BaseView(policy) if cfg.lora_rank else \
            load_model(model_dir, device=dev).eval()

    def sample(model, conversations: list[list[dict]], n: int, temperature: float, seed: int,
               desc: str):  # -> (prompt ids, reply ids, reply texts), n per conversation
        return sample_responses(model, tok, conversations, n, temperature, seed, cfg.max_new_tokens,
                                cfg.gen_batch_size, desc=desc, sampler=sampler)

    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    run = Run("train_grpo", cfg.out_dir, cfg.run, cfg, resume=bool(cfg.resume))
    if cfg.resume:
        start, tensors, _ = load_state(run.dir, optimizer)
        with torch.no_grad():
            for name, p in trainable_tensors(policy).items():
                p.copy_(tensors[name])
        run.rewrite(history)  # metrics.jsonl back to the saved state's step
        print(f"resuming {run.dir} after step {start}")
    print(f"GRPO ({cfg.loss_type}, {cfg.advantage} advantages, scale {cfg.scale_rewards}, "
          f"β {cfg.beta}): {cfg.steps} steps x {cfg.prompts_per_step} problems x {cfg.group_size}, "
          f"tasks {cfg.tasks}: {len(pool)} train, {len(held_out)} held out x {cfg.eval_n}; "
          f"{sum(p.numel() for p in params):,} trainable parameters; torch threads: {threads}")

    results = read_results(run.dir) if cfg.resume else {}  # a resumed run keeps the evaluations it already made

    def evaluate_at(step: int, name: str = "") -> None:
        # at step 0 the policy is π₀ itself (KL 0 exactly, nothing to load)
        results.setdefault("steps", {})[str(step)] = evaluate(
            policy, base if step else None, sample, held_out, tok, cfg.eval_n, cfg.eval_k,
            cfg.eval_seed, f"eval step {step}")
        results.update({name: results["steps"][str(step)]} if name else {})
        run.write_json("eval.json", results)

    if "before" not in results:
        evaluate_at(0, "before")
    try:
        train(cfg, policy, policy, ref, optimizer, sample, pool, tok, run, start, history,
              evaluate_at)
    except NonFiniteLogits as e:  # the last step's update overflowed the weights: nothing saved
        raise UserError(f"step {len(history) + 1}: {e} — lower --lr") from None
    except KeyboardInterrupt:  # Ctrl-C: what the finished steps learned is saved; one line, 130
        exit_interrupted(run, len(history), "model",  # LoRA: merged
                         lambda: save_model(policy, run.dir / "model", copy_from=model_dir))
    save_model(policy, run.dir / "model", copy_from=model_dir)
    shutil.rmtree(run.dir / "state", ignore_errors=True)  # complete: model/ is the final state
    evaluate_at(cfg.steps, "after")
    results["wall_s"] = time.perf_counter() - started
    run.write_json("eval.json", results)
    series = lambda *keys: {k: [(m["step"], m[k]) for m in history if k in m] for k in keys}
    line_plots([("training reward (mean) and zero-std groups", series("reward",
                                                                      "frac_reward_zero_std")),
                ("reply tokens (mean)", series("response_tokens")),
                ("clipped fractions, entropy, k3 KL", series("clip_low", "clip_high", "entropy",
                                                             "kl"))], run.dir / "training.svg")
    report(cfg, results, len(held_out))
    print(f"policy, metrics and plots in {run.dir} ({results['wall_s'] / 60:.1f} min)")


def report(cfg: Config, results: dict, problems: int) -> None:
    b, a, k = results["before"], results["after"], cfg.eval_k
    print(f"\nheld-out {cfg.tasks}: {problems} problems, {cfg.eval_n} samples each at T = 1")
    print(f"| policy | greedy ± SE | pass@1 ± SE | pass@{k} ± SE | KL(π‖π₀) ± SE | tokens |")
    print("|---|---|---|---|---|---|")
    for name, r in (("π₀", b), (f"{cfg.loss_type}, {cfg.advantage}", a)):
        print(f"| {name} | {r['greedy']:.3f} ± {r['greedy_se']:.3f} | {r['pass1']:.3f} ± "
              f"{r['pass1_se']:.3f} | {r[f'pass{k}']:.3f} ± {r[f'pass{k}_se']:.3f} | "
              f"{r['kl']:.3f} ± {r['kl_se']:.3f} | {r['mean_tokens']:.1f} |")
    for name in ("greedy", "pass1", f"pass{k}"):
        gain, se = paired_gain(b[f"{name}_by_problem"], a[f"{name}_by_problem"])
        print(f"{name} gain {gain:+.3f} ± {se:.3f} (SE over problems, paired)")


if __name__ == "__main__":
    run_cli(main)
