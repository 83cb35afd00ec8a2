"""ILQL on the pink-elephant task: offline Q-learning from the chosen/rejected answers of the DPO pairs.

    python train_ilql.py --model llama                   # the embedded SmolLM2-135M-Instruct, CPU
    python train_ilql.py --resume out/train_ilql/RUN     # continue an interrupted run

Implicit Language Q-Learning (Snell et al. 2022, arXiv 2206.11871): every token is an action, the prefix
is the state. A V head, two Q heads and Polyak-averaged target Q heads read the LM's last hidden state;
the loss is four pure functions of tensors (ilql_loss), means over the real actions:
    L_Q    = Σ_heads mean (Q_i(s_t,a_t) - r_t - γ·V(s_t+1)·[s_t+1 not terminal])²      V detached
    L_V    = mean |τ - 1(Q̂ < V)|·(Q̂(s_t,a_t) - V(s_t))²      Q̂ = min of the target heads (expectile)
    L_CQL  = Σ_heads mean CE(Q_i(s_t,·), a_t)                   keeps Q low on tokens not in the data
    L_AWAC = mean exp(β_awac·(Q̂ - V))·CE(LM logits, a_t)        β_awac = 0: SFT on the responses
    L = L_Q + L_V + cql_scale·L_CQL + awac_scale·L_AWAC
After every optimizer step target ← α·online + (1-α)·target (trlX syncs once per epoch at most, so its
targets often never move: research notes §3.4).

The LM. --train-lm false (default): π_β is the base model, frozen, as Snell recommends; its hidden states
are computed once, the heads train on them for several epochs, L_AWAC is dropped and β = 0 is the base
policy exactly. --train-lm true: trlX's shared trunk, trained by every term (with β_awac = 0 its L_AWAC
clones the chosen AND the rejected answers).

Data: a pair gives two samples, chosen (+1) and rejected (-1), the reward on the action that predicts
the end-of-turn token (the hackathon's setting). Action t sits at the hidden state before response token
t; the states are the actions plus the last position (terminal). --reward shaped also puts -penalty on
the first token of every mention of the row's "pink" entity or its aliases, so credit lands on the token
that commits to the name instead of arriving γ^T-discounted at the end. --normalize-rewards z-scores the
terminal rewards as trlX does.

Heads and decoding (nanorlhf/ilql_heads.py): low-rank Q heads into the LM's own output matrix, 0.94M
parameters instead of trlX's 229M; sampling from π_β(a|s)·exp(β·(Q̂ - V)) through generate()'s logits
hook, β swept by --eval-betas.

Resume: every --save-every steps RUN/resume/ gets the heads, targets, AdamW moments, RNG (and the LM
when it trains), swapped in atomically; --resume RUN ends with the same metrics as an unbroken run.
"""

import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm import tqdm

from nanorlhf import distributed, scale
from nanorlhf.checkpoint import load_model, resolve_model, save_model
from nanorlhf.cli import Run, autocast, device, parse_config, seed_everything
from nanorlhf.data import check_vocab, collate, fit_to_length, read_preferences
from nanorlhf.errors import UserError, run_cli
from nanorlhf.ilql_heads import ILQLHeads, ilql_logits_hook, save_heads
from nanorlhf.pink import PAIRS_PATH, load_eval_rows, load_pairs, mention_starts
from nanorlhf.pink_eval import EvalConfig, evaluate_as, format_table
from nanorlhf.resume import latest, load_train_state, metrics_upto, resumed_config, save_train_state
from nanorlhf.schedule import lr_at
from nanorlhf.svg import line_plots
from nanorlhf.tokenizer import Tokenizer


@dataclass
class Config(EvalConfig, scale.ScaleConfig):  # + --eval-*; --lora-rank, --grad-checkpointing (--train-lm true)
    model: str = field(default="llama", metadata={"help": "checkpoint dir, local HF cache id, or 'llama' (embedded SmolLM2-135M-Instruct)"})
    data: str = field(default="data/pink_dpo_train.jsonl", metadata={"help": "TRL preference jsonl: prompt, chosen (+1), rejected (-1)"})
    out_dir: str = field(default="out/train_ilql", metadata={"help": "runs are written to OUT_DIR/RUN"})
    run: str = field(default="", metadata={"help": "run name (default: a timestamp)"})
    resume: str = field(default="", metadata={"help": "RUN_DIR of an interrupted run: continue it with its own config"})
    train_lm: bool = field(default=False, metadata={"help": "false: the LM is frozen (π_β = base), only the heads train | true: shared trunk (trlX)"})
    reward: str = field(default="shaped", metadata={"help": "terminal (±1 on the end-of-turn action) | shaped (also -penalty where pink is named)"})
    shaped_penalty: float = field(default=1.0, metadata={"help": "--reward shaped: reward on the first token of each pink mention is -this"})
    normalize_rewards: bool = field(default=False, metadata={"help": "z-score the terminal rewards over the dataset (trlX)"})
    gamma: float = field(default=0.99, metadata={"help": "discount"})
    tau: float = field(default=0.7, metadata={"help": "expectile of the V loss (0.5 = MSE)"})
    cql_scale: float = field(default=0.1, metadata={"help": "weight of the CQL term"})
    awac_scale: float = field(default=1.0, metadata={"help": "weight of the AWAC/BC term on the LM (--train-lm true only)"})
    awac_beta: float = field(default=0.0, metadata={"help": "AWAC weights exp(beta*(Q-V)); 0 = plain SFT on the responses"})
    alpha: float = field(default=0.05, metadata={"help": "Polyak weight on the online heads: target <- a*online + (1-a)*target"})
    target_sync_every: int = field(default=1, metadata={"help": "optimizer steps between target-head syncs"})
    two_qs: bool = field(default=True, metadata={"help": "two Q heads (min of the targets) instead of one"})
    head_rank: int = field(default=0, metadata={"help": "inner width of the heads (0 = hidden/4)"})
    lr: float = field(default=2e-5, metadata={"help": "AdamW peak learning rate of the LM (--train-lm true)"})
    head_lr: float = field(default=1e-3, metadata={"help": "AdamW peak learning rate of the V and Q heads"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    warmup_steps: int = field(default=4, metadata={"help": "linear warmup steps, then linear decay to 0"})
    epochs: int = field(default=2, metadata={"help": "passes over the samples (2 per pair)"})
    batch_size: int = field(default=16, metadata={"help": "samples per forward pass"})
    grad_accum: int = field(default=1, metadata={"help": "forward passes per optimizer step"})
    max_pairs: int = field(default=0, metadata={"help": "use only the first N pairs (0 = all)"})
    max_len: int = field(default=192, metadata={"help": "max prompt+response tokens (see data.fit_to_length)"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm (LM and heads together)"})
    save_every: int = field(default=50, metadata={"help": "write a resumable checkpoint every N steps (0 = only at the end)"})
    eval_betas: str = field(default="0,4,8,16", metadata={"help": "comma-separated decoding betas to evaluate after training"})
    gen_style: str = field(default="snell", metadata={"help": "snell: softmax(logits/T + b*adv) | trlx: softmax((logp + b*adv)/T)"})
    eval_top_k: int = field(default=0, metadata={"help": "top-k on the combined score during ILQL eval (0 = off; trlX uses 20)"})
    seed: int = field(default=0, metadata={"help": "seed for shuffling, init and sampling"})


# --- the loss: pure functions of tensors. Shapes: B rows, A actions (padded), V vocabulary ---

def masked_mean(x: Tensor, mask: Tensor, n: float | Tensor | None = None) -> Tensor:
    """Σ x·mask / n, n = Σ mask (at least 1) unless given. where(), so padding garbage (even inf) never leaks."""
    return torch.where(mask > 0, x, 0.0).sum() / (mask.sum().clamp(min=1) if n is None else n)


def taken(values: Tensor, actions: Tensor) -> Tensor:
    """(B, A, V) values, (B, A) action ids -> (B, A) values of the actions taken."""
    return values.gather(-1, actions.unsqueeze(-1)).squeeze(-1)


def q_loss(qs: list[Tensor], vs: Tensor, actions: Tensor, rewards: Tensor, next_nonterminal: Tensor, mask: Tensor,
           gamma: float, n=None) -> Tensor:
    """Σ over the Q heads of the squared one-step error against r + γ·V(s') (V detached, 0 if s' is terminal).
    vs (B, A+1) at the states; next_nonterminal (B, A) is 1 where the state after action t is not terminal."""
    target = rewards + gamma * torch.where(next_nonterminal > 0, vs[:, 1:].detach(), 0.0)
    return sum(masked_mean((taken(q, actions) - target) ** 2, mask, n) for q in qs)


def expectile_loss(q_hat: Tensor, v: Tensor, tau: float, mask: Tensor, n=None) -> Tensor:
    """V toward the τ-expectile of the target Q: weight τ where Q̂ ≥ V, 1-τ below (trlX's ≥)."""
    diff = q_hat.detach() - v
    return masked_mean(torch.where(diff >= 0, tau, 1 - tau) * diff ** 2, mask, n)


def cql_loss(qs: list[Tensor], actions: Tensor, mask: Tensor, n=None) -> Tensor:
    """Σ over the Q heads of CE(Q(s,·) as logits, dataset token): logsumexp Q - Q(s,a)."""
    return sum(masked_mean(q.logsumexp(-1) - taken(q, actions), mask, n) for q in qs)


def awac_loss(logits: Tensor, actions: Tensor, adv: Tensor, beta: float, mask: Tensor, n=None) -> tuple[Tensor, Tensor]:
    """Advantage-weighted NLL of the dataset tokens under the LM; the weights exp(β·adv) get no gradient."""
    weights = torch.where(mask > 0, beta * adv.detach(), 0.0).exp()
    return masked_mean(weights * (logits.logsumexp(-1) - taken(logits, actions)), mask, n), weights


def ilql_loss(qs: list[Tensor], target_qs: list[Tensor], vs: Tensor, logits: Tensor | None, actions: Tensor, rewards: Tensor,
              next_nonterminal: Tensor, mask: Tensor, gamma: float = 0.99, tau: float = 0.7, cql_scale: float = 0.1,
              awac_scale: float = 1.0, awac_beta: float = 0.0, n=None) -> tuple[Tensor, dict[str, float], Tensor]:
    """-> (loss, stats, advantage Q̂-V (B, A), detached). qs/target_qs: per head (B, A, V) at the action
    positions; vs (B, A+1) at the states; logits (B, A, V) of the LM at the actions (None: no AWAC); mask (B, A) 1 on real
    actions. `n` overrides the normaliser (the step's action count under gradient accumulation)."""
    qs, vs = [q.float() for q in qs], vs.float()
    q_hat = torch.stack([taken(t.float(), actions) for t in target_qs]).min(0).values.detach()
    v = vs[:, :-1]
    l_q = q_loss(qs, vs, actions, rewards, next_nonterminal, mask, gamma, n)
    l_v = expectile_loss(q_hat, v, tau, mask, n)
    l_cql = cql_loss(qs, actions, mask, n)
    if logits is None:  # a frozen LM: nothing for the AWAC term to train
        l_awac, weights = vs.new_zeros(()), torch.ones_like(v)
    else:
        l_awac, weights = awac_loss(logits.float(), actions, q_hat - v, awac_beta, mask, n)
    loss = l_q + l_v + cql_scale * l_cql + awac_scale * l_awac
    stats = {"loss": loss, "loss/q": l_q, "loss/v": l_v, "loss/cql": l_cql, "loss/awac": l_awac,
             "v": masked_mean(v.detach(), mask, n), "q_hat": masked_mean(q_hat, mask, n),
             "q": masked_mean(taken(qs[0].detach(), actions), mask, n), "awac_weight": masked_mean(weights, mask, n)}
    return loss, {k: float(val.detach()) for k, val in stats.items()}, (q_hat - v).detach()


STATS = ("loss", "loss/q", "loss/v", "loss/cql", "loss/awac", "v", "q_hat", "q", "awac_weight")  # ilql_loss's


# --- data: pairs -> samples with action/state indices and rewards ---

def ilql_indices(lengths: list[int]) -> tuple[list[int], list[int], list[int]]:
    """Lengths [prompt_1, output_1, prompt_2, output_2, ...] -> (actions_ixs, states_ixs, next_nonterminal).

    The action for the output token at position p sits at p-1, the hidden state that predicts it.
    Prompt tokens are never actions; the state after an output turn is the next prompt's last token,
    which has seen them. states = actions + [last position]; next_nonterminal (trlX's dones[1:]) is 0
    only after the last action."""
    if not lengths or len(lengths) % 2 or lengths[0] < 1 or min(lengths[1::2]) < 1 or min(lengths) < 0:
        raise ValueError(f"need [prompt, output, ...] lengths with a non-empty first prompt, got {lengths}")
    actions, offset = [], 0
    for i, n in enumerate(lengths):
        if i % 2:
            actions += range(offset - 1, offset + n - 1)
        offset += n
    return actions, actions + [offset - 1], [1] * (len(actions) - 1) + [0]


def normalize_rewards(values: list[float]) -> list[float]:
    """trlX: (R - mean) / (unbiased std + float64 eps); one sample has a NaN std and trlX skips the division."""
    r = torch.tensor(values, dtype=torch.float64)
    r = r - r.mean()
    return (r / (r.std() + torch.finfo(torch.float64).eps) if len(r) > 1 else r).tolist()


def make_samples(rows: list[dict], tok: Tokenizer, cfg: Config, vocab_size: int) -> tuple[list[dict], int]:
    """Each pair -> two samples {prompt, response, actions/states/next_nonterminal, rewards, label}."""
    aliases = {}
    if cfg.reward == "shaped" and PAIRS_PATH.is_file():
        aliases = {p["pink"]: p.get("pink_aliases", []) for p in load_pairs(PAIRS_PATH)}
    samples, truncated = [], 0
    for row in rows:
        if cfg.reward == "shaped" and not (isinstance(row.get("pink"), str) and row["pink"].strip()):
            raise UserError(f"{row['where']}: --reward shaped needs a non-empty 'pink' field (the entity to avoid)")
        prompt = tok.chat_prompt(row["prompt"])
        for text, label in ((row["chosen"], 1.0), (row["rejected"], -1.0)):
            response = tok.response_ids(text)
            check_vocab(prompt + response, vocab_size, row["where"])
            cut_prompt, response, was_cut = fit_to_length(prompt, response, cfg.max_len)
            truncated += was_cut
            actions, states, next_nonterminal = ilql_indices([len(cut_prompt), len(response)])
            shaping = [0.0] * len(actions)  # per action; action k predicts response token k
            if cfg.reward == "shaped":
                for k in mention_starts(tok, text, [row["pink"], *aliases.get(row["pink"], [])]):
                    if k < len(shaping):
                        shaping[k] -= cfg.shaped_penalty
            samples.append({"prompt": cut_prompt, "response": response, "actions_ixs": actions, "states_ixs": states,
                            "next_nonterminal": next_nonterminal, "shaping": shaping, "label": label})
    terminal = [s["label"] for s in samples]
    for s, r in zip(samples, normalize_rewards(terminal) if cfg.normalize_rewards else terminal):
        s["rewards"] = s["shaping"][:-1] + [s["shaping"][-1] + r]  # the terminal reward on the last action
    return samples, truncated


def ilql_batch(samples: list[dict], pad_id: int) -> dict[str, Tensor]:
    """Right-padded tokens (real pad id) plus (B, A) action tensors and (B, A+1) state indices; padding is 0."""
    batch = collate([s["prompt"] for s in samples], [s["response"] for s in samples], pad_id)
    A = max(len(s["actions_ixs"]) for s in samples)
    fields = {"actions_ixs": (A, torch.long), "states_ixs": (A + 1, torch.long), "action_mask": (A, torch.float),
              "next_nonterminal": (A, torch.float), "rewards": (A, torch.float)}
    for name, (width, dtype) in fields.items():
        batch[name] = torch.zeros(len(samples), width, dtype=dtype)
        for row, s in enumerate(samples):
            values = [1.0] * len(s["actions_ixs"]) if name == "action_mask" else s[name]
            batch[name][row, :len(values)] = torch.tensor(values, dtype=dtype)
    batch["label"] = torch.tensor([s["label"] for s in samples])
    if "h_states" in samples[0]:  # cached features of a frozen LM: (B, A+1, H)
        batch["h_states"] = nn.utils.rnn.pad_sequence([s["h_states"] for s in samples], batch_first=True)
    return batch


def state_hidden(model, batch: dict[str, Tensor]) -> Tensor:
    """(B, A+1, H): the LM's last hidden state at every state of every row; cached ones when the batch has them."""
    if "h_states" in batch:
        return batch["h_states"]
    hidden = model.model(batch["input_ids"], batch["attention_mask"])  # (B, T, H)
    return hidden.gather(1, batch["states_ixs"].unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))


@torch.no_grad()
def cache_features(model, samples: list[dict], pad_id: int, batch_size: int, dev) -> None:
    """A frozen LM's last hidden states at each sample's states, computed once: s["h_states"] (A+1, H)."""
    for i in tqdm(range(0, len(samples), batch_size), desc="features", unit="batch"):
        chunk = samples[i:i + batch_size]
        batch = {k: v.to(dev) for k, v in ilql_batch(chunk, pad_id).items()}
        with autocast(dev):
            h_states = state_hidden(model, batch).float()
        for row, s in enumerate(chunk):
            s["h_states"] = h_states[row, :len(s["states_ixs"])].clone()


class ILQLNet(nn.Module):
    """The LM and its heads as one module: what DDP wraps, so it sees every parameter the loss reaches."""

    def __init__(self, model, heads: ILQLHeads):
        super().__init__()
        self.lm, self.heads = model, heads

    def forward(self, batch: dict[str, Tensor], lm_logits: bool):
        return forward(self.lm, self.heads, batch, lm_logits)


def forward(model, heads: ILQLHeads, batch: dict[str, Tensor], lm_logits: bool = True):
    """-> qs, target_qs (B, A, V), vs (B, A+1), LM logits (B, A, V) or None, actions (B, A).
    The heads see the gathered states only; the actions are the states but the last (ilql_indices)."""
    h_states = state_hidden(model, batch)
    h_actions = h_states[:, :-1]  # padded rows: their extra "actions" are masked out by action_mask
    with torch.no_grad():
        target_qs = heads.qs(h_actions, target=True)
    actions = batch["input_ids"].gather(1, batch["actions_ixs"] + 1)  # the token each action emitted
    return (heads.qs(h_actions), target_qs, heads.v(h_states), model.lm_head(h_actions) if lm_logits else None,
            actions)


# --- resumable checkpoints: safetensors + json, never pickle ---

def save_resume(path: Path, step: int, model, heads: ILQLHeads, optimizer, train_lm: bool) -> None:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()  # a frozen LM is the base: not stored
               if train_lm and not (model.cfg.tie_word_embeddings and k == "lm_head.weight")}  # tied: stored once
    save_train_state(path, step, {**tensors, **{f"heads.{k}": v for k, v in heads.state_dict().items()}}, optimizer)


def resume_dir(run_dir: Path) -> Path:
    if (found := latest(run_dir, "resume", "state.json")) is None:
        raise UserError(f"--resume {run_dir}: no resumable checkpoint (resume/state.json) in that directory")
    return found


def load_resume(path: Path, model, heads: ILQLHeads, optimizer) -> int:
    step, tensors = load_train_state(path, optimizer)
    part = lambda prefix: {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    if weights := part("model."):
        if model.cfg.tie_word_embeddings:
            weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
        model.load_state_dict(weights)  # copies in place: heads.unembed still shares the LM's storage
    heads.load_state_dict(part("heads."))
    return step


# --- the run ---

def train(cfg: Config, model, heads: ILQLHeads, samples: list[dict], pad_id: int, dev, run: Run, history=()) -> list[dict]:
    """ILQL steps. Under torchrun every rank builds the same micro-batches and trains on its shard of each."""
    model.train(cfg.train_lm)
    rng = random.Random(cfg.seed)  # the same order on every (re)start: the step number is all a resume needs
    micro_batches = []
    for _ in range(cfg.epochs):
        order = samples[:]
        rng.shuffle(order)
        micro_batches += [order[i:i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
    shards = [distributed.shard(b) for b in micro_batches]  # [(this rank's samples, real?)]
    if not cfg.train_lm:  # the LM never changes: its features once, then only the small heads run
        model.requires_grad_(False)
        mine = list({id(s): s for b, _ in shards for s in b}.values())
        cache_features(model, mine, pad_id, cfg.batch_size * cfg.grad_accum, dev)
    net = distributed.wrap(ILQLNet(model, heads))  # DDP under torchrun, else itself
    groups = [{"params": [p for p in heads.parameters() if p.requires_grad], "lr": cfg.head_lr, "peak_lr": cfg.head_lr}]
    if cfg.train_lm:  # with LoRA: the adapters
        groups.append({"params": scale.trainable(model), "lr": cfg.lr, "peak_lr": cfg.lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    total_steps = math.ceil(len(micro_batches) / cfg.grad_accum)
    start = load_resume(resume_dir(run.dir), model, heads, optimizer) if cfg.resume else 0
    history, syncs = list(history), start // cfg.target_sync_every
    bar = tqdm(total=total_steps, initial=start, desc="ILQL", unit="step")
    for step in range(start, total_steps):
        for group in optimizer.param_groups:
            group["lr"] = group["peak_lr"] * lr_at(step, total_steps, cfg.warmup_steps)
        part = slice(step * cfg.grad_accum, (step + 1) * cfg.grad_accum)
        n = sum(len(s["actions_ixs"]) for b in micro_batches[part] for s in b)  # all ranks' actions: the mean's n
        sums = torch.zeros(len(STATS) + 4, dtype=torch.float64)  # the stats, then adv sums and counts
        for i, (samples_i, real) in enumerate(shards[part]):
            batch = {k: v.to(dev) for k, v in ilql_batch(samples_i, pad_id).items()}
            with distributed.no_sync(net, skip=i < len(shards[part]) - 1):  # DDP: one all-reduce per step
                with autocast(dev):
                    qs, target_qs, vs, logits, actions = net(batch, cfg.train_lm)
                loss, stats, adv = ilql_loss(qs, target_qs, vs, logits, actions, batch["rewards"],
                                             batch["next_nonterminal"], batch["action_mask"], cfg.gamma, cfg.tau,
                                             cfg.cql_scale, cfg.awac_scale, cfg.awac_beta, n)
                (loss * (real * distributed.world_size())).backward()  # DDP averages over ranks; a dummy weighs 0
            chosen = batch["action_mask"] * (batch["label"] > 0)[:, None]
            rejected = batch["action_mask"] * (batch["label"] < 0)[:, None]
            sums += real * torch.tensor([stats[k] for k in STATS] + [float((adv * chosen).sum()), float(chosen.sum()),
                                                                     float((adv * rejected).sum()), float(rejected.sum())],
                                        dtype=torch.float64)
        grad_norm = distributed.clip_grad_norm([p for g in optimizer.param_groups for p in g["params"]], cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % cfg.target_sync_every == 0:
            heads.sync_targets(cfg.alpha)
            syncs += 1
        sums = distributed.all_reduce_sum(sums).tolist()  # each stat is already a share of the step's mean
        metrics = dict(zip(STATS, sums))
        metrics.update({"adv/chosen": sums[-4] / max(sums[-3], 1), "adv/rejected": sums[-2] / max(sums[-1], 1)})
        metrics.update(step=step + 1, grad_norm=grad_norm, lr=optimizer.param_groups[0]["lr"],
                       target_syncs=syncs, target_gap=heads.target_gap())
        run.log(**metrics)
        history.append(metrics)
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", adv_gap=f"{metrics['adv/chosen'] - metrics['adv/rejected']:.3f}")
        bar.update()
        if distributed.is_main() and (step + 1 == total_steps or (cfg.save_every and (step + 1) % cfg.save_every == 0)):
            save_resume(run.dir / "resume", step + 1, model, heads, optimizer, cfg.train_lm)
    bar.close()
    model.eval()
    return history


def parse_betas(text: str) -> list[float]:
    try:
        betas = [float(b) for b in text.split(",") if b.strip()]
    except ValueError:
        betas = []
    if not betas or any(b < 0 or not math.isfinite(b) for b in betas):
        raise UserError(f"--eval-betas {text!r}: expected comma-separated numbers >= 0, e.g. 0,1,4")
    return betas


def resume_run(run_dir: str) -> tuple[Config, list[dict]]:
    """The interrupted run's config and its metrics up to the checkpoint (metrics.jsonl is cut back to them)."""
    step = json.loads((resume_dir(Path(run_dir)) / "state.json").read_text())["step"]
    print(f"resuming {run_dir} at step {step}")
    return resumed_config(Config, run_dir, "train_ilql"), metrics_upto(Path(run_dir), step)


def main() -> None:
    cfg, history = parse_config(Config, __doc__), []
    distributed.init()  # torchrun: join the process group (a no-op otherwise)
    if cfg.resume:
        cfg, history = resume_run(cfg.resume)
    if cfg.reward not in ("terminal", "shaped"):
        raise UserError(f"--reward {cfg.reward!r}: choose terminal or shaped")
    if cfg.gen_style not in ("snell", "trlx"):
        raise UserError(f"--gen-style {cfg.gen_style!r}: choose snell or trlx")
    if cfg.target_sync_every < 1:
        raise UserError(f"--target-sync-every {cfg.target_sync_every}: must be >= 1")
    scale.check(cfg)
    if (cfg.lora_rank or cfg.grad_checkpointing) and not cfg.train_lm:
        raise UserError("--lora-rank / --grad-checkpointing train the LM, which is frozen: add --train-lm true")
    if cfg.fsdp:  # the heads read lm_head.weight directly, which FSDP would shard underneath them
        raise UserError("--fsdp: train_ilql.py runs under torchrun with DDP only; drop --fsdp")
    betas = parse_betas(cfg.eval_betas)
    seed_everything(cfg.seed)
    started, dev = time.perf_counter(), device()
    rows = read_preferences(cfg.data)[:cfg.max_pairs or None]
    eval_rows = load_eval_rows(cfg.eval_data) if cfg.eval_data else []  # validate inputs before any work
    eval_rows = eval_rows if distributed.is_main() else []  # rank 0 evaluates
    model_dir = resolve_model(cfg.model)
    tok, model = Tokenizer(model_dir), load_model(model_dir, device=dev).eval()
    if cfg.train_lm:
        scale.prepare(model, cfg, cfg.seed)  # LoRA adapters, gradient checkpointing
    samples, truncated = make_samples(rows, tok, cfg, model.cfg.vocab_size)
    heads = ILQLHeads(model.cfg.hidden_size, model.lm_head.weight, cfg.head_rank, cfg.two_qs).to(dev)
    print(f"{len(samples)} samples ({len(rows)} pairs) from {cfg.data}; {truncated} truncated to {cfg.max_len} tokens; "
          f"heads: {sum(p.numel() for p in heads.parameters() if p.requires_grad):,} trainable parameters; "
          f"LM {'trained' if cfg.train_lm else 'frozen'}")
    run = Run("train_ilql", cfg.out_dir, cfg.run, cfg)
    if cfg.resume:
        run.rewrite(history)  # metrics.jsonl back to the checkpoint's step

    saved = run.dir / "eval.json"  # a resumed run keeps the base evaluation it already has
    results = json.loads(saved.read_text()) if cfg.resume and saved.is_file() else {}
    if eval_rows and "base" not in results:  # the policy before its first step (the heads are still 0)
        results["base"] = evaluate_as(cfg, cfg.seed, model, tok, eval_rows, desc="eval base")
        run.write_json("eval.json", results)
    history = train(cfg, model, heads, samples, tok.pad_id, dev, run, history)
    if cfg.train_lm:
        save_model(model, run.dir / "model", copy_from=model_dir)  # every rank calls it; rank 0 writes (merged LoRA)
    if not distributed.is_main():
        return
    save_heads(heads, run.dir / "ilql_heads.safetensors", base_model="" if cfg.train_lm else str(model_dir))
    series = lambda *keys: {k: [(m["step"], m[k]) for m in history] for k in keys}
    line_plots([("ILQL loss terms", series("loss/q", "loss/v", "loss/cql", "loss/awac")),
                ("values on dataset actions", series("v", "q_hat", "q")),
                ("advantage Q̂-V by response", series("adv/chosen", "adv/rejected")),
                ("‖target - online‖ (Q heads)", series("target_gap"))], run.dir / "training.svg")
    if eval_rows:
        base_model = load_model(model_dir, device=dev).eval() if cfg.train_lm else model  # NLL under the base
        for beta in betas:
            if beta == 0 and not cfg.eval_top_k and not cfg.train_lm:  # the frozen base, unperturbed: same samples
                results["ILQL β=0"] = results["base"]
                continue
            hook = ilql_logits_hook(heads, beta, cfg.eval_temperature, cfg.eval_top_k, cfg.gen_style)
            results[f"ILQL β={beta:g}"] = evaluate_as(cfg, cfg.seed, model, tok, eval_rows, base_model, hook,
                                                      desc=f"eval ILQL beta={beta:g}")
        run.write_json("eval.json", results)
        print(f"\nheld-out pink-elephant eval: {len(eval_rows)} prompts x {cfg.eval_n} samples (temperature "
              f"{cfg.eval_temperature}, {cfg.gen_style} style, top-k {cfg.eval_top_k or 'off'}, seed {cfg.seed})")
        print(format_table(results))
        if (base := results["base"]["pink_rate"]) > 0:
            print("relative change in pink mention rate: " + ", ".join(
                f"β={b:g} {(results[f'ILQL β={b:g}']['pink_rate'] - base) / base:+.0%}" for b in betas))
    where = "heads" if cfg.train_lm else f"heads (on the unchanged {cfg.model})"
    print(f"{where}, metrics and plots in {run.dir} ({(time.perf_counter() - started) / 60:.1f} min)")


if __name__ == "__main__":
    run_cli(main)
