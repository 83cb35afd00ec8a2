"""ILQL on the pink-elephant task: offline Q-learning from the chosen/rejected answers of the DPO pairs.

    python train_ilql.py --model llama                   # the embedded SmolLM2-135M-Instruct, CPU
    python train_ilql.py --resume out/train_ilql/RUN     # continue an interrupted run
    torchrun --nproc_per_node 8 train_ilql.py -- --model BIG --fsdp true   # the frozen LM sharded (FSDP2)
    python tools/pink_eval.py --model llama --ilql-heads out/train_ilql/RUN --beta 8   # evaluate it

Implicit Language Q-Learning (Snell et al. 2022, arXiv 2206.11871): every token is an action, the prefix
is the state. A V head, two Q heads and Polyak-averaged target Q heads read the LM's last hidden state;
the loss is four pure functions of tensors (ilql_loss), means over the real actions:
    L_Q    = Σ_heads mean (Q_i(s_t,a_t) - r_t - γ·V(s_t+1)·[s_t+1 not terminal])²      V detached
    L_V    = mean |τ - 1(Q̂ < V)|·(Q̂(s_t,a_t) - V(s_t))²      Q̂ = min of the target heads (expectile)
    L_CQL  = Σ_heads mean CE(Q_i(s_t,·), a_t)                   keeps Q low on tokens not in the data
    L_AWAC = mean exp(β_awac·(Q̂ - V))·CE(LM logits, a_t)        β_awac = 0: SFT on the responses
    L = L_Q + L_V + cql_scale·L_CQL + awac_scale·L_AWAC
then target ← α·online + (1-α)·target after every optimizer step (trlX: once per epoch; notes §3.4).

The LM. --train-lm false (default): π_β is the base model, frozen, as Snell recommends; its hidden states
are computed once, the heads train on them, L_AWAC is dropped and β = 0 is the base policy exactly.
--train-lm true: trlX's shared trunk, trained by every term (with β_awac = 0 its L_AWAC clones the
chosen AND the rejected answers).

Data: a pair gives two samples, chosen (+1) and rejected (-1), the reward on the action that predicts
the end-of-turn token. --reward shaped also puts -penalty on the first token of every mention of the
row's "pink" entity, so credit lands on the token that commits to the name instead of arriving
γ^T-discounted at the end. Heads and decoding π_β(a|s)·exp(β·(Q̂ - V)): nanorlhf/ilql_heads.py.
Resume: RUN/resume/ (heads, targets, AdamW moments, RNG, a trained LM), every --save-every steps.
"""
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from nanorlhf import distributed, scale
from nanorlhf.checkpoint import load_model, resolve_model, save_model
from nanorlhf.run import Run, flag, parse_config, run_dir, seed_everything
from nanorlhf.model import autocast, device
from nanorlhf.data import check_vocab, epoch_batches, fit_to_length, read_preferences
from nanorlhf.logprobs import collate
from nanorlhf.errors import UserError, run_cli
from nanorlhf.distributed import print0
from nanorlhf.ilql_heads import ILQLHeads, ilql_logits_hook, save_heads
from nanorlhf.tasks.pink import DATA_DIR, PAIRS_PATH, load_eval_rows, load_pairs, mention_starts
from nanorlhf.tasks.pink_eval import EvalConfig, evaluate_as, format_table
from nanorlhf.resume import latest, load_train_state, metrics_upto, resumed_config, save_train_state
from nanorlhf.schedule import lr_at
from nanorlhf.svg import line_plots
from nanorlhf.tokenizer import Tokenizer


@dataclass
class Config(EvalConfig, scale.ScaleConfig):  # + --eval-*, --lora-*, --grad-checkpointing (with --train-lm)
    model: str = flag("llama", "checkpoint dir, HF cache id, or 'llama' (embedded SmolLM2-135M-Instruct)")
    data: str = flag(str(DATA_DIR / "pink_dpo_train.jsonl"), "TRL preference jsonl: prompt, chosen, rejected")
    out_dir: str = flag("out/train_ilql", "runs are written to OUT_DIR/RUN")
    run: str = flag("", "run name (default: a timestamp)")
    resume: str = flag("", "RUN_DIR of an interrupted run: continue it with its own config")
    train_lm: bool = flag(False, "false: frozen LM (π_β = base), only the heads train | true: shared trunk")
    reward: str = flag("shaped", "terminal: ±1 on the end-of-turn action | shaped: and -penalty where pink "
                       "is named", choices=("terminal", "shaped"))
    shaped_penalty: float = flag(1.0, "--reward shaped: -reward on the first token of each mention", min=0.0)
    normalize_rewards: bool = flag(False, "z-score the terminal rewards over the dataset (trlX)")
    gamma: float = flag(0.99, "discount", min=0.0, max=1.0)
    tau: float = flag(0.7, "expectile of the V loss (0.5 = MSE)", gt=0.0, lt=1.0)
    cql_scale: float = flag(0.1, "weight of the CQL term", min=0.0)
    awac_scale: float = flag(1.0, "weight of the AWAC/BC term on the LM (--train-lm true only)", min=0.0)
    awac_beta: float = flag(0.0, "AWAC weights exp(beta*(Q-V)); 0 = plain SFT on the responses", min=0.0)
    alpha: float = flag(0.05, "Polyak: target <- a*online + (1-a)*target", min=0.0, max=1.0)
    target_sync_every: int = flag(1, "optimizer steps between target-head syncs", min=1)
    two_qs: bool = flag(True, "two Q heads (min of the targets) instead of one")
    head_rank: int = flag(0, "inner width of the heads (0 = hidden/4)", min=0)
    lr: float = flag(2e-5, "AdamW peak learning rate of the LM (--train-lm true)", gt=0.0)
    head_lr: float = flag(1e-3, "AdamW peak learning rate of the V and Q heads", gt=0.0)
    weight_decay: float = flag(0.0, "AdamW weight decay", min=0.0)
    warmup_steps: int = flag(4, "linear warmup steps, then linear decay to 0", min=0)
    epochs: int = flag(2, "passes over the samples (2 per pair)", min=1)
    batch_size: int = flag(16, "samples per forward pass", min=1)
    grad_accum: int = flag(1, "forward passes per optimizer step", min=1)
    max_pairs: int = flag(0, "use only the first N pairs (0 = all)", min=0)
    max_len: int = flag(192, "max prompt+response tokens (see data.fit_to_length)", min=2)
    grad_clip: float = flag(1.0, "max gradient norm (LM and heads together)", gt=0.0)
    save_every: int = flag(50, "write a resumable checkpoint every N steps (0 = only at the end)", min=0)
    eval_betas: str = flag("0,4,8,16", "comma-separated decoding betas to evaluate after training")
    gen_style: str = flag("snell", "snell: softmax(logits/T + b*adv) | trlx: softmax((logp + b*adv)/T)",
                          choices=("snell", "trlx"))
    eval_top_k: int = flag(0, "ILQL eval top-k of π_β (snell) or of the sum (trlx); 0 = off", min=0)
    seed: int = flag(0, "seed for shuffling, init and sampling")

    def check(self) -> None:
        parse_betas(self.eval_betas)
        scale.check(self)
        if (self.lora_rank or self.grad_checkpointing) and not self.train_lm:
            raise UserError("--lora-rank / --grad-checkpointing train the LM, which is frozen: "
                            "add --train-lm true")
        if self.fsdp and self.train_lm:  # the heads read lm_head.weight directly, which FSDP shards
            raise UserError("--fsdp shards a frozen LM only (the heads read the LM's output matrix, which a "
                            "trained, sharded LM would change underneath them): drop --train-lm or --fsdp")


def parse_betas(text: str) -> list[float]:
    try:
        betas = [float(b) for b in text.split(",") if b.strip()]
    except ValueError:
        betas = []
    if not betas or any(b < 0 or not math.isfinite(b) for b in betas):
        raise UserError(f"--eval-betas {text!r}: expected comma-separated numbers >= 0, e.g. 0,1,4")
    return betas


# --- the loss: pure functions of tensors. Shapes: B rows, A actions (padded), V vocabulary ---

def masked_mean(x: Tensor, mask: Tensor, n: float | Tensor | None = None) -> Tensor:
    """Σ x·mask / n, n = Σ mask (at least 1) unless given. where(): padding garbage (even inf) never leaks."""
    return torch.where(mask > 0, x, 0.0).sum() / (mask.sum().clamp(min=1) if n is None else n)


def taken(values: Tensor, actions: Tensor) -> Tensor:
    """(B, A, V) values, (B, A) action ids -> (B, A) values of the actions taken."""
    return values.gather(-1, actions.unsqueeze(-1)).squeeze(-1)


def q_loss(qs: list[Tensor], vs: Tensor, actions: Tensor, rewards: Tensor, next_nonterminal: Tensor,
           mask: Tensor, gamma: float, n=None) -> Tensor:
    """Σ over the Q heads of the squared one-step error against r + γ·V(s') (V detached, 0 if s' is
    terminal). vs (B, A+1) at the states; next_nonterminal (B, A) 1 where the state after action t is not
    terminal."""
    target = rewards + gamma * torch.where(next_nonterminal > 0, vs[:, 1:].detach(), 0.0)
    return sum(masked_mean((taken(q, actions) - target) ** 2, mask, n) for q in qs)


def expectile_loss(q_hat: Tensor, v: Tensor, tau: float, mask: Tensor, n=None) -> Tensor:
    """V toward the τ-expectile of the target Q: weight τ where Q̂ ≥ V, 1-τ below (trlX's ≥)."""
    diff = q_hat.detach() - v
    return masked_mean(torch.where(diff >= 0, tau, 1 - tau) * diff ** 2, mask, n)


def cql_loss(qs: list[Tensor], actions: Tensor, mask: Tensor, n=None) -> Tensor:
    """Σ over the Q heads of CE(Q(s,·) as logits, dataset token): logsumexp Q - Q(s,a)."""
    return sum(masked_mean(q.logsumexp(-1) - taken(q, actions), mask, n) for q in qs)


def awac_loss(logits: Tensor, actions: Tensor, adv: Tensor, beta: float, mask: Tensor,
              n=None) -> tuple[Tensor, Tensor]:
    """Advantage-weighted NLL of the dataset tokens under the LM; the weights exp(β·adv) get no gradient."""
    weights = torch.where(mask > 0, beta * adv.detach(), 0.0).exp()
    return masked_mean(weights * (logits.logsumexp(-1) - taken(logits, actions)), mask, n), weights


def ilql_loss(qs: list[Tensor], target_qs: list[Tensor], vs: Tensor, logits: Tensor | None, actions: Tensor,
              rewards: Tensor, next_nonterminal: Tensor, mask: Tensor, gamma: float = 0.99, tau: float = 0.7,
              cql_scale: float = 0.1, awac_scale: float = 1.0, awac_beta: float = 0.0,
              n=None) -> tuple[Tensor, dict[str, float], Tensor]:
    """-> (loss, stats, advantage Q̂-V (B, A), detached). qs/target_qs: per head (B, A, V) at the action
    positions; vs (B, A+1) at the states; logits (B, A, V) of the LM at the actions (None: no AWAC); mask
    (B, A) 1 on real actions. `n` overrides the normaliser (the step's action count, see train)."""
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
             "q": masked_mean(taken(qs[0].detach(), actions), mask, n),
             "awac_weight": masked_mean(weights, mask, n)}
    return loss, {k: float(val.detach()) for k, val in stats.items()}, (q_hat - v).detach()


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
    """trlX: (R - mean) / (unbiased std + float64 eps); one sample has a NaN std: trlX skips the division."""
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
            raise UserError(f"{row['where']}: --reward shaped needs a non-empty 'pink' field (what to avoid)")
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
            samples.append({"prompt": cut_prompt, "response": response, "actions_ixs": actions,
                            "states_ixs": states, "next_nonterminal": next_nonterminal, "shaping": shaping,
                            "label": label})
    terminal = [s["label"] for s in samples]
    for s, r in zip(samples, normalize_rewards(terminal) if cfg.normalize_rewards else terminal):
        s["rewards"] = s["shaping"][:-1] + [s["shaping"][-1] + r]  # the terminal reward on the last action
    return samples, truncated


def ilql_batch(samples: list[dict], pad_id: int) -> dict[str, Tensor]:
    """Right-padded tokens (real pad id), (B, A) action tensors and (B, A+1) state indices; padding is 0."""
    batch = collate([s["prompt"] for s in samples], [s["response"] for s in samples], pad_id)
    A = max(len(s["actions_ixs"]) for s in samples)
    i64, f32 = torch.long, torch.float
    fields = {"actions_ixs": (A, i64), "states_ixs": (A + 1, i64), "action_mask": (A, f32),
              "next_nonterminal": (A, f32), "rewards": (A, f32)}
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
    """(B, A+1, H): the LM's last hidden state at every state of every row (cached ones if the batch has)."""
    if "h_states" in batch:
        return batch["h_states"]
    # through the LM's own forward (logits at no position), so FSDP's hooks on it gather the root's weights
    no_logits = torch.zeros_like(batch["attention_mask"], dtype=torch.bool)
    _, hidden = model(batch["input_ids"], batch["attention_mask"], return_hidden=True, logits_at=no_logits)  # (B, T, H)
    return hidden.gather(1, batch["states_ixs"].unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))


@torch.no_grad()
def cache_features(model, samples: list[dict], pad_id: int, batch_size: int, dev, lockstep: bool = False) -> None:
    """A frozen LM's last hidden states at each sample's states, computed once: s["h_states"] (A+1, H).
    `lockstep` (FSDP): every rank runs as many forwards as the busiest one, the extra ones on a dummy chunk."""
    chunks = [samples[i:i + batch_size] for i in range(0, len(samples), batch_size)]
    n_forwards = distributed.max_over_ranks(len(chunks)) if lockstep else len(chunks)
    for i in distributed.bar(range(n_forwards), desc="features", unit="batch"):
        # past its own chunks a rank forwards a copy of one sample (without its cached features) and drops it
        chunk = chunks[i] if i < len(chunks) else [{k: v for k, v in samples[0].items() if k != "h_states"}]
        batch = {k: v.to(dev) for k, v in ilql_batch(chunk, pad_id).items()}
        with autocast(dev):
            h_states = state_hidden(model, batch).float()
        for row, s in enumerate(chunk):
            s["h_states"] = h_states[row, :len(s["states_ixs"])].clone()


class ILQLNet(nn.Module):
    """The LM and its heads as one module: what DDP wraps, so it sees every parameter the loss reaches.
    `model` None: a frozen LM whose features every batch carries (cache_features)."""

    def __init__(self, model, heads: ILQLHeads):
        super().__init__()
        self.lm, self.heads = model, heads

    def forward(self, batch: dict[str, Tensor], lm_logits: bool = True):
        """-> qs, target_qs (B, A, V), vs (B, A+1), LM logits (B, A, V) or None, actions (B, A). The heads
        see the gathered states only; the actions are the states but the last (ilql_indices)."""
        h_states = state_hidden(self.lm, batch)
        h_actions = h_states[:, :-1]  # padded rows: their extra "actions" are masked out by action_mask
        with torch.no_grad():
            target_qs = self.heads.qs(h_actions, target=True)
        actions = batch["input_ids"].gather(1, batch["actions_ixs"] + 1)  # the token each action emitted
        qs, vs = self.heads.qs(h_actions), self.heads.v(h_states)
        return qs, target_qs, vs, self.lm.lm_head(h_actions) if lm_logits else None, actions


# --- resumable checkpoints: safetensors + json, never pickle ---

def save_resume(path: Path, step: int, model, heads: ILQLHeads, optimizer, train_lm: bool) -> None:
    tied = model.cfg.tie_word_embeddings
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()  # a frozen LM is the base: not stored
               if train_lm and not (tied and k == "lm_head.weight")}  # a tied head is the embedding: once
    tensors.update({f"heads.{k}": v for k, v in heads.state_dict().items()})
    save_train_state(path, step, tensors, optimizer)


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

def train(cfg: Config, model, heads: ILQLHeads, samples: list[dict], pad_id: int, dev, run: Run,
          history=()) -> list[dict]:
    """ILQL steps. Under torchrun every rank builds the same micro-batches and trains on its shard of each."""
    model.train(cfg.train_lm)
    # the same order on every (re)start: a resume needs only the step number
    micro_batches = [b for epoch in epoch_batches(samples, cfg.batch_size, cfg.epochs, cfg.seed) for b in epoch]
    shards = [distributed.shard(b) for b in micro_batches]  # [(this rank's samples, real?)]
    if not cfg.train_lm:  # the LM never changes: its features once, then only the small heads run
        model.requires_grad_(False)
        mine = list({id(s): s for b, _ in shards for s in b}.values())
        cache_features(model, mine, pad_id, cfg.batch_size * cfg.grad_accum, dev, lockstep=cfg.fsdp)
    # DDP under torchrun, else itself; a frozen LM stays out of it (its features are cached; under FSDP DDP
    # would broadcast rank 0's shards over the other ranks' own)
    net = distributed.wrap(ILQLNet(model if cfg.train_lm else None, heads))
    head_params = [p for p in heads.parameters() if p.requires_grad]  # not the targets: Polyak moves them
    groups = [{"params": head_params, "lr": cfg.head_lr, "peak_lr": cfg.head_lr}]
    if cfg.train_lm:  # with LoRA: the adapters
        groups.append({"params": scale.trainable(model), "lr": cfg.lr, "peak_lr": cfg.lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    total_steps = math.ceil(len(micro_batches) / cfg.grad_accum)
    start = load_resume(resume_dir(run.dir), model, heads, optimizer) if cfg.resume else 0
    history, syncs = list(history), start // cfg.target_sync_every
    bar = distributed.bar(total=total_steps, initial=start, desc="ILQL", unit="step")
    for step in range(start, total_steps):
        for group in optimizer.param_groups:
            group["lr"] = group["peak_lr"] * lr_at(step, total_steps, cfg.warmup_steps)
        part = slice(step * cfg.grad_accum, (step + 1) * cfg.grad_accum)
        # Every term is a mean over the step's actions, of all its micro-batches on all ranks: ilql_loss
        # divides by this n, so the micro-batch losses add up to the step's loss, not to a mean of means.
        n = sum(len(s["actions_ixs"]) for b in micro_batches[part] for s in b)
        sums: dict[str, float] = {}  # named totals of this rank's micro-batches; all ranks' are summed below
        for i, (samples_i, real) in enumerate(shards[part]):
            batch = {k: v.to(dev) for k, v in ilql_batch(samples_i, pad_id).items()}
            # DDP all-reduces the gradients on the step's last backward only; before it they add up locally
            with distributed.no_sync(net, skip=i < len(shards[part]) - 1):
                # The targets come from the target Q heads (Q̂ = their min), never from the online ones:
                # bootstrapping from the heads being trained is what makes Q-learning diverge.
                with autocast(dev):
                    qs, target_qs, vs, logits, actions = net(batch, cfg.train_lm)
                # L_Q regresses Q(s,a) on r + γ·V(s') (V detached), L_V pulls V to an upper expectile of Q̂
                # (τ > 0.5: V ≈ the best action seen in the data, not the data's average), L_CQL keeps Q low
                # on tokens never taken, L_AWAC (a trained LM only) is advantage-weighted BC.
                loss, stats, adv = ilql_loss(qs, target_qs, vs, logits, actions, batch["rewards"],
                                             batch["next_nonterminal"], batch["action_mask"], cfg.gamma,
                                             cfg.tau, cfg.cql_scale, cfg.awac_scale, cfg.awac_beta, n)
                # DDP averages the ranks' gradients: × world size makes that the sum the loss defines.
                # A rank with no real samples left runs a dummy micro-batch (real = False) with weight 0.
                (loss * (distributed.world_size() if real else 0)).backward()
            chosen = batch["action_mask"] * (batch["label"] > 0)[:, None]
            rejected = batch["action_mask"] * (batch["label"] < 0)[:, None]
            # the stats are shares of the step's mean already; the advantages are averaged per response kind
            named = {**stats, "adv_sum/chosen": float((adv * chosen).sum()),
                     "actions/chosen": float(chosen.sum()), "adv_sum/rejected": float((adv * rejected).sum()),
                     "actions/rejected": float(rejected.sum())}
            for k, v in named.items():
                sums[k] = sums.get(k, 0.0) + real * v
        params = [p for g in optimizer.param_groups for p in g["params"]]
        grad_norm = distributed.clip_grad_norm(params, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # Polyak after every optimizer step, as Snell's loop does: trlX syncs once per epoch at most, so its
        # targets barely move. α small: Q̂ trails the online heads, which keeps the bootstrap target stable.
        if (step + 1) % cfg.target_sync_every == 0:
            heads.sync_targets(cfg.alpha)
            syncs += 1
        # one all-reduce of all named totals, in the dict's key order: the same names, in the same order, on
        # every rank (inserted by the same code); float64, so the sums over ranks do not lose digits
        totals = distributed.all_reduce_sum(torch.tensor(list(sums.values()), dtype=torch.float64))
        totals = dict(zip(sums, totals.tolist()))
        adv_means = {f"adv/{side}": totals.pop(f"adv_sum/{side}") / max(totals.pop(f"actions/{side}"), 1)
                     for side in ("chosen", "rejected")}  # what's left in totals: ilql_loss's stats
        metrics = {**totals, **adv_means, "step": step + 1, "grad_norm": grad_norm,
                   "lr": optimizer.param_groups[0]["lr"], "target_syncs": syncs,
                   "target_gap": heads.target_gap()}
        run.log(**metrics)
        history.append(metrics)
        gap = metrics["adv/chosen"] - metrics["adv/rejected"]  # the chosen answers' should be higher
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", adv_gap=f"{gap:.3f}")
        bar.update()
        last = step + 1 == total_steps
        if distributed.is_main() and (last or (cfg.save_every and (step + 1) % cfg.save_every == 0)):
            save_resume(run.dir / "resume", step + 1, model, heads, optimizer, cfg.train_lm)
    bar.close()
    model.eval()
    return history


def main() -> None:
    cfg, history = parse_config(Config, __doc__), []  # every flag checked before any work
    if not cfg.resume:
        run_dir(cfg.out_dir, cfg.run)  # refuse a used --run now, not after the model has loaded
    distributed.init()  # torchrun: join the process group (a no-op otherwise)
    if cfg.resume:  # the interrupted run's own config, and its metrics up to the checkpoint
        step = json.loads((resume_dir(Path(cfg.resume)) / "state.json").read_text())["step"]
        print0(f"resuming {cfg.resume} at step {step}")
        cfg, history = resumed_config(Config, cfg.resume, "train_ilql"), metrics_upto(Path(cfg.resume), step)
    betas = parse_betas(cfg.eval_betas)
    seed_everything(cfg.seed)
    started, dev = time.perf_counter(), device()
    rows = read_preferences(cfg.data)[:cfg.max_pairs or None]
    eval_rows = load_eval_rows(cfg.eval_data) if cfg.eval_data else []  # validate inputs before any work
    if cfg.fsdp and eval_rows:  # generation would need every rank in lockstep; evaluate the saved heads instead
        print0("--fsdp: no pink-elephant evaluation here; run python tools/pink_eval.py --ilql-heads RUN_DIR")
    eval_rows = eval_rows if distributed.is_main() and not cfg.fsdp else []  # rank 0 evaluates
    model_dir = resolve_model(cfg.model)
    tok = Tokenizer(model_dir)
    # --fsdp (a frozen LM): every rank reads only its shard of each tensor, the model is never whole on a device
    model = (__import__("nanorlhf.fast.fsdp").fast.fsdp.load_model_sharded(model_dir, dev) if cfg.fsdp else load_model(model_dir, device=dev)).eval()
    if cfg.train_lm:
        scale.prepare(model, cfg, cfg.seed)  # LoRA adapters, gradient checkpointing
    samples, truncated = make_samples(rows, tok, cfg, model.cfg.vocab_size)
    # the heads project into the LM's output matrix: FSDP's shards gathered once (the LM is frozen then)
    unembed = model.lm_head.weight.full_tensor() if cfg.fsdp else model.lm_head.weight
    heads = ILQLHeads(model.cfg.hidden_size, unembed, cfg.head_rank, cfg.two_qs).to(dev)
    n_heads = sum(p.numel() for p in heads.parameters() if p.requires_grad)
    print0(f"{len(samples)} samples ({len(rows)} pairs) from {cfg.data}; {truncated} truncated to "
           f"{cfg.max_len} tokens; heads: {n_heads:,} trainable parameters; "
           f"LM {'trained' if cfg.train_lm else 'frozen'}")
    run = Run("train_ilql", cfg.out_dir, cfg.run, cfg, resume=bool(cfg.resume))
    if cfg.resume:
        run.rewrite(history)  # metrics.jsonl back to the checkpoint's step

    saved = run.dir / "eval.json"  # a resumed run keeps the base evaluation it already has
    results = json.loads(saved.read_text()) if cfg.resume and saved.is_file() else {}
    if eval_rows and "base" not in results:  # the policy before its first step (the heads are still 0)
        results["base"] = evaluate_as(cfg, cfg.seed, model, tok, eval_rows, desc="eval base")
        run.write_json("eval.json", results)
    history = train(cfg, model, heads, samples, tok.pad_id, dev, run, history)
    if cfg.train_lm:  # every rank calls it; rank 0 writes (LoRA merged)
        save_model(model, run.dir / "model", copy_from=model_dir)
    if not distributed.is_main():
        return
    save_heads(heads, run.dir / "ilql_heads.safetensors", base_model="" if cfg.train_lm else str(model_dir))
    series = lambda *keys: {k: [(m["step"], m[k]) for m in history] for k in keys}
    line_plots([("ILQL loss terms", series("loss/q", "loss/v", "loss/cql", "loss/awac")),
                ("values on dataset actions", series("v", "q_hat", "q")),
                ("advantage Q̂-V by response", series("adv/chosen", "adv/rejected")),
                ("‖target - online‖ (Q heads)", series("target_gap"))], run.dir / "training.svg")
    if eval_rows:
        base_model = load_model(model_dir, device=dev).eval() if cfg.train_lm else model  # scores the NLL
        for beta in betas:
            if beta == 0 and not cfg.eval_top_k and not cfg.train_lm:  # the frozen base, unperturbed
                results["ILQL β=0"] = results["base"]
                continue
            hook = ilql_logits_hook(heads, beta, cfg.eval_temperature, cfg.eval_top_k, cfg.gen_style)
            results[f"ILQL β={beta:g}"] = evaluate_as(cfg, cfg.seed, model, tok, eval_rows, base_model, hook,
                                                      desc=f"eval ILQL beta={beta:g}")
        run.write_json("eval.json", results)
        print(f"\nheld-out pink-elephant eval: {len(eval_rows)} prompts x {cfg.eval_n} samples (temperature "
              f"{cfg.eval_temperature}, {cfg.gen_style} style, top-k {cfg.eval_top_k or 'off'}, "
              f"seed {cfg.seed})")
        print(format_table(results))
        if (base := results["base"]["pink_rate"]) > 0:
            print("relative change in pink mention rate: " + ", ".join(
                f"β={b:g} {(results[f'ILQL β={b:g}']['pink_rate'] - base) / base:+.0%}" for b in betas))
    where = "heads" if cfg.train_lm else f"heads (on the unchanged {cfg.model})"
    print(f"{where}, metrics and plots in {run.dir} ({(time.perf_counter() - started) / 60:.1f} min)")


if __name__ == "__main__":
    run_cli(main)
