"""ILQL on the pink-elephant task: offline Q-learning from the chosen and rejected answers of the
DPO pairs.

    python train_ilql.py --model llama                   # the embedded SmolLM2-135M-Instruct, CPU
    python train_ilql.py --resume out/train_ilql/RUN     # continue an interrupted run
    python train_ilql.py --evaluate out/train_ilql/RUN --eval-betas 4,8   # evaluate its heads again
    torchrun --nproc_per_node 8 train_ilql.py -- --model BIG --fsdp true   # the frozen LM sharded

Implicit Language Q-Learning (Snell et al. 2022, arXiv 2206.11871): every token is an action, the
prefix is the state. A V head, two Q heads and Polyak-averaged target Q heads read the LM's last
hidden state; the loss is four pure functions of tensors (ilql_loss), means over the real actions:
    L_Q    = Σ_heads mean (Q_i(s_t,a_t) - r_t - γ·V(s_t+1)·[s_t+1 not terminal])²   V detached
    L_V    = mean |τ - 1(Q̂ < V)|·(Q̂(s_t,a_t) - V(s_t))²   Q̂ = min of the target heads (expectile)
    L_CQL  = Σ_heads mean CE(Q_i(s_t,·), a_t)                keeps Q low on tokens not in the data
    L_AWAC = mean exp(β_awac·(Q̂ - V))·CE(LM logits, a_t)     β_awac = 0: SFT on the responses
    L = L_Q + L_V + cql_scale·L_CQL + awac_scale·L_AWAC
then target ← α·online + (1-α)·target after every optimizer step (trlX: once per epoch; notes §3.4).
Decoding samples π(a|s) ∝ π_β(a|s)·exp(β·(Q̂ - V)) (ilql_logits_hook).

The LM. --train-lm false (default): π_β is the base model, frozen, as Snell recommends; its hidden
states are computed once, the heads train on them, L_AWAC is dropped and β = 0 is the base policy
exactly. --train-lm true: trlX's shared trunk, trained by every term (with β_awac = 0 its L_AWAC
clones the chosen AND the rejected answers).

Data: a pair gives two samples, chosen (+1) and rejected (-1), the reward on the action that
predicts the end-of-turn token. --reward shaped also puts -penalty on the first token of every
mention of the row's "pink" entity, so credit lands on the token that commits to the name instead of
arriving γ^T-discounted at the end.
Resume: RUN/state/ (heads, targets, AdamW moments, RNG, a trained LM), every --save-every steps.
"""
import copy
import json
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save
from torch import Tensor, nn

from nanorlhf import distributed, lora
from nanorlhf.atomic import atomic_write_bytes, atomic_write_text
from nanorlhf.checkpoint import load_model, resolve_model, save_model
from nanorlhf.data import check_vocab, epoch_batches, fit_to_length, read_preferences
from nanorlhf.distributed import print0
from nanorlhf.errors import UserError, run_cli
from nanorlhf.run import (Run, THREADS_HELP, check_finite, choose_threads, exit_interrupted, flag,
                          load_state, parse_config, read_json, read_results, resume_run, run_dir,
                          save_state, seed_everything)
from nanorlhf.step import clip_grad_norm, collate, lr_at
from nanorlhf.model import autocast, device
from nanorlhf.sampling import LogitsHook, top_k_filter
from nanorlhf.svg import line_plots
from nanorlhf.tasks.pink import (DATA_DIR, HELDOUT_PATH, PAIRS_PATH, evaluate_as, format_table,
                                 load_eval_rows, load_pairs, mention_starts)
from nanorlhf.tokenizer import Tokenizer


@dataclass
class Config:
    model: str = flag("llama", "checkpoint dir, HF cache id, or 'llama' (embedded "
                      "SmolLM2-135M-Instruct)")
    data: str = flag(str(DATA_DIR / "pink_dpo_train.jsonl"),
                     "TRL preference jsonl: prompt, chosen, rejected")
    out_dir: str = flag("out/train_ilql", "runs are written to OUT_DIR/RUN")
    run: str = flag("", "run name (default: a timestamp)")
    resume: str = flag("", "RUN_DIR of an interrupted run: continue it with its own config")
    evaluate: str = flag("", "RUN_DIR of a finished run: evaluate its heads instead of training, "
                         "with the run's own config (flags given beside it override it)")
    evaluate_out: str = flag("", "--evaluate: also write the results (eval.json's layout) to this "
                             "json file")
    # the algorithm
    train_lm: bool = flag(False, "false: frozen LM (π_β = base), only the heads train | true: "
                          "shared trunk")
    reward: str = flag("shaped", "terminal: ±1 on the end-of-turn action | shaped: and -penalty "
                       "where pink is named", choices=("terminal", "shaped"))
    shaped_penalty: float = flag(1.0, "--reward shaped: -reward on the first token of each mention",
                                 min=0.0)
    normalize_rewards: bool = flag(False, "z-score the terminal rewards over the dataset (trlX)")
    gamma: float = flag(0.99, "discount", min=0.0, max=1.0)
    tau: float = flag(0.7, "expectile of the V loss (0.5 = MSE)", gt=0.0, lt=1.0)
    cql_scale: float = flag(0.1, "weight of the CQL term", min=0.0)
    awac_scale: float = flag(1.0, "weight of the AWAC/BC term on the LM (--train-lm true only)",
                             min=0.0)
    awac_beta: float = flag(0.0, "AWAC weights exp(beta*(Q-V)); 0 = plain SFT on the responses",
                            min=0.0)
    alpha: float = flag(0.05, "Polyak: target <- a*online + (1-a)*target", min=0.0, max=1.0)
    target_sync_every: int = flag(1, "optimizer steps between target-head syncs", min=1)
    two_qs: bool = flag(True, "two Q heads (min of the targets) instead of one")
    head_rank: int = flag(0, "inner width of the heads (0 = hidden/4)", min=0)
    # the optimization
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
    save_every: int = flag(50, "write a resumable checkpoint every N steps (0 = only at the end)",
                           min=0)
    # the held-out pink-elephant evaluation: the base, then the heads' decoding at each beta
    eval_data: str = flag(str(HELDOUT_PATH), "pink-elephant eval jsonl ({pink, grey, prompt}); '' "
                          "skips")
    eval_n: int = flag(2, "samples per eval prompt", min=1)
    eval_temperature: float = flag(0.7, "eval sampling temperature (0 = greedy)", min=0.0)
    eval_max_new_tokens: int = flag(80, "eval response length cap", min=1)
    eval_batch_size: int = flag(56, "eval generation batch size", min=1)
    eval_betas: str = flag("0,4,8,16", "comma-separated decoding betas to evaluate after training")
    gen_style: str = flag("snell", "snell: softmax(logits/T + b*adv) | trlx: softmax((logp + "
                          "b*adv)/T)", choices=("snell", "trlx"))
    eval_top_k: int = flag(0, "ILQL eval top-k of π_β (snell) or of the sum (trlx); 0 = off", min=0)
    # a trained LM (--train-lm true) with adapters and less memory; --fsdp shards a frozen LM
    lora_rank: int = flag(0, "LoRA rank r: train rank-r adapters on --lora-targets only (0 = full "
                          "fine-tuning)", min=0)
    lora_alpha: float = flag(16.0, "LoRA α: the adapter update is scaled by α/r", gt=0)
    lora_targets: str = flag(",".join(lora.TARGETS),
                             "comma-separated projections that get adapters")
    grad_checkpointing: bool = flag(False, "recompute each block's activations in backward: less "
                                    "memory, ~1/3 more compute")
    fsdp: bool = flag(False, "under torchrun: shard weights, gradients and optimizer state (FSDP2) "
                      "instead of DDP")
    onednn: bool = flag(False, "CPU matmuls (training and sampling) through oneDNN with packed "
                        "weights: ~1.9x faster steps on AMD CPUs, where MKL runs AVX2 kernels; "
                        "equal to MKL's up to rounding, so not bit-equal to a default run")
    threads: int = flag(0, THREADS_HELP, min=0)
    seed: int = flag(0, "seed for shuffling, init and sampling")

    def check(self) -> None:
        parse_betas(self.eval_betas)
        lora.parse_targets(self.lora_targets)
        if self.onednn and self.fsdp:
            raise UserError("--onednn with --fsdp: FSDP's sharded weights cannot be packed for "
                            "oneDNN; use one of the two")
        if self.fsdp and not distributed.launched():
            raise UserError("--fsdp shards the model over processes: launch with torchrun "
                            "--nproc_per_node N")
        if (self.lora_rank or self.grad_checkpointing) and not self.train_lm:
            raise UserError("--lora-rank / --grad-checkpointing train the LM, which is frozen: "
                            "add --train-lm true")
        if self.fsdp and self.train_lm:  # the heads read lm_head.weight directly, which FSDP shards
            raise UserError("--fsdp shards a frozen LM only (the heads read the LM's output "
                            "matrix, which a trained, sharded LM would change underneath them): "
                            "drop --train-lm or --fsdp")
        if self.evaluate and self.resume:
            raise UserError("--evaluate and --resume: evaluate a finished run or continue an "
                            "interrupted one, not both")


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
    """Σ x·mask / n, n = Σ mask (at least 1) unless given. where(): padding garbage (even inf) never
    leaks."""
    return torch.where(mask > 0, x, 0.0).sum() / (mask.sum().clamp(min=1) if n is None else n)


def taken(values: Tensor, actions: Tensor) -> Tensor:
    """(B, A, V) values, (B, A) action ids -> (B, A) values of the actions taken."""
    return values.gather(-1, actions.unsqueeze(-1)).squeeze(-1)


def q_loss(qs: list[Tensor], vs: Tensor, actions: Tensor, rewards: Tensor, next_nonterminal: Tensor,
           mask: Tensor, gamma: float, n=None) -> Tensor:
    """Σ over the Q heads of the squared one-step error against r + γ·V(s') (V detached, 0 if s'
    is terminal). vs (B, A+1) at the states; next_nonterminal (B, A) 1 where the state after action
    t is not terminal."""
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
    """Advantage-weighted NLL of the dataset tokens under the LM; the weights exp(β·adv) get no
    gradient."""
    weights = torch.where(mask > 0, beta * adv.detach(), 0.0).exp()
    return masked_mean(weights * (logits.logsumexp(-1) - taken(logits, actions)), mask, n), weights


def ilql_loss(qs: list[Tensor], target_qs: list[Tensor], vs: Tensor, logits: Tensor | None,
              actions: Tensor, rewards: Tensor, next_nonterminal: Tensor, mask: Tensor,
              gamma: float = 0.99, tau: float = 0.7, cql_scale: float = 0.1,
              awac_scale: float = 1.0, awac_beta: float = 0.0,
              n=None) -> tuple[Tensor, dict[str, float], Tensor]:
    """-> (loss, stats, advantage Q̂-V (B, A), detached). qs/target_qs: per head (B, A, V) at the
    action positions; vs (B, A+1) at the states; logits (B, A, V) of the LM at the actions (None: no
    AWAC); mask (B, A) 1 on real actions. `n` overrides the normaliser (the step's action count, see
    train)."""
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


# --- the heads: V, Q and target Q over the LM's last hidden state ---
#
# trlX's Q head, Linear(h,2h)→ReLU→Linear(2h,V), has 57.3M parameters for SmolLM2-135M (h=576,
# V=49152): 229M for 2 Q + 2 targets, more than the model. Ours project into the LM's own output
# matrix, rows scaled to unit length and detached: Q(s,·) = Ê·W_up·relu(W_down·h + b) + a per-token
# bias, r = h/4, W_up zero-initialised so Q starts at 0: 215,184 parameters per Q head, 83,233 for
# V, 0.94M with the targets (0.7% of the model). Computed as (Ê·W_up)·z, which costs r/h = 1/4 of
# Ê·(W_up·z) per position.
#
# Precision. On CUDA every forward runs under bf16 autocast, whose 8 significant bits put Q and V
# near 1 on a grid of 1/128..1/256: about the size of the advantages Q̂ - V the heads report. So the
# heads run outside autocast, in fp32, in training and in decoding alike.

@contextmanager
def fp32(h: Tensor):
    """Autocast off on h's device: what runs inside sees and computes in fp32 (h is cast by the
    caller)."""
    with torch.autocast(h.device.type, enabled=False):
        yield


class QHead(nn.Module):
    """Q(s,·) = Ê·W_up·relu(W_down·h + b) + bias, evaluated as (Ê·W_up)·z (see `matrix`)."""

    def __init__(self, hidden: int, rank: int, vocab: int):
        super().__init__()
        self.down, self.up = nn.Linear(hidden, rank), nn.Linear(rank, hidden, bias=False)
        self.bias = nn.Parameter(torch.zeros(vocab))
        # Q starts at 0, like the returns it will fit, not at the LM's logits
        nn.init.zeros_(self.up.weight)

    def matrix(self, basis: Tensor) -> Tensor:
        """(V, H) unit rows Ê -> (V, r) Ê·W_up: one V×H×r product per call, not V×H per position."""
        return basis @ self.up.weight

    def forward(self, h: Tensor, matrix: Tensor) -> Tensor:
        return F.linear(F.relu(self.down(h)), matrix) + self.bias  # (..., H) -> (..., V)


class ILQLHeads(nn.Module):
    def __init__(self, hidden: int, unembed: Tensor, rank: int = 0, two_qs: bool = True):
        super().__init__()
        rank = rank or hidden // 4
        # a plain attribute: the LM's storage, no parameter, no gradient
        self.unembed = unembed.detach()
        self.v_head = nn.Sequential(nn.Linear(hidden, rank), nn.ReLU(), nn.Linear(rank, 1))
        nn.init.zeros_(self.v_head[2].weight), nn.init.zeros_(self.v_head[2].bias)  # V starts at 0
        vocab = unembed.shape[0]
        self.q_heads = nn.ModuleList(QHead(hidden, rank, vocab) for _ in range(1 + two_qs))
        # the targets start identical and are moved by Polyak only
        self.target_q_heads = copy.deepcopy(self.q_heads).requires_grad_(False)

    def v(self, h: Tensor) -> Tensor:
        """(..., H) -> (..., ) in fp32, whatever autocast is on."""
        with fp32(h):
            return self.v_head(h.float()).squeeze(-1)

    def q_matrices(self, target: bool = False) -> list[Tensor]:
        # unit rows: Q(s,a) = <ê_a, x(s)> + b_a, so the scale of Q does not depend on the scale of E
        with fp32(self.unembed):
            basis = F.normalize(self.unembed.float(), dim=-1)
            return [q.matrix(basis) for q in (self.target_q_heads if target else self.q_heads)]

    def qs(self, h: Tensor, target: bool = False, matrices: list[Tensor] | None = None
           ) -> list[Tensor]:
        """Per Q head (..., H) -> (..., V) in fp32. `matrices`: q_matrices() computed once while the
        heads stay fixed (decoding)."""
        matrices = matrices or self.q_matrices(target)
        heads = self.target_q_heads if target else self.q_heads
        with fp32(h):
            return [q(h.float(), m) for q, m in zip(heads, matrices)]

    @torch.no_grad()
    def sync_targets(self, alpha: float) -> None:
        """Polyak: target <- α·online + (1-α)·target, on the Q heads only (there is no target V)."""
        for t, o in zip(self.target_q_heads.parameters(), self.q_heads.parameters()):
            t.lerp_(o, alpha)

    @torch.no_grad()
    def target_gap(self) -> float:
        """‖target - online‖ over all Q-head parameters: a stuck or racing target shows here."""
        pairs = zip(self.target_q_heads.parameters(), self.q_heads.parameters())
        return math.sqrt(sum(float((t - o).pow(2).sum()) for t, o in pairs))


# --- data: pairs -> samples with action/state indices and rewards ---

def ilql_indices(lengths: list[int]) -> tuple[list[int], list[int], list[int]]:
    """Lengths [prompt_1, output_1, prompt_2, output_2, ...] -> (actions_ixs, states_ixs,
    next_nonterminal).

    The action for the output token at position p sits at p-1, the hidden state that predicts it.
    Prompt tokens are never actions; the state after an output turn is the next prompt's last token,
    which has seen them. states = actions + [last position]; next_nonterminal (trlX's dones[1:]) is
    0 only after the last action."""
    if (not lengths or len(lengths) % 2 or lengths[0] < 1 or min(lengths[1::2]) < 1
            or min(lengths) < 0):
        raise ValueError(f"need [prompt, output, ...] lengths with a non-empty first prompt, "
                         f"got {lengths}")
    actions, offset = [], 0
    for i, n in enumerate(lengths):
        if i % 2:
            actions += range(offset - 1, offset + n - 1)
        offset += n
    return actions, actions + [offset - 1], [1] * (len(actions) - 1) + [0]


def normalize_rewards(values: list[float]) -> list[float]:
    """trlX: (R - mean) / (unbiased std + float64 eps); one sample has a NaN std: trlX skips the
    division."""
    r = torch.tensor(values, dtype=torch.float64)
    r = r - r.mean()
    return (r / (r.std() + torch.finfo(torch.float64).eps) if len(r) > 1 else r).tolist()


def make_samples(rows: list[dict], tok: Tokenizer, cfg: Config, vocab_size: int
                 ) -> tuple[list[dict], int]:
    """Each pair -> two samples {prompt, response, actions/states/next_nonterminal, rewards,
    label}."""
    aliases = {}
    if cfg.reward == "shaped" and PAIRS_PATH.is_file():
        aliases = {p["pink"]: p.get("pink_aliases", []) for p in load_pairs(PAIRS_PATH)}
    samples, truncated = [], 0
    for row in rows:
        pink = row.get("pink")
        if cfg.reward == "shaped" and not (isinstance(pink, str) and pink.strip()):
            raise UserError(f"{row['where']}: --reward shaped needs a non-empty 'pink' field "
                            "(what to avoid)")
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
                            "states_ixs": states, "next_nonterminal": next_nonterminal,
                            "shaping": shaping, "label": label})
    terminal = [s["label"] for s in samples]
    for s, r in zip(samples, normalize_rewards(terminal) if cfg.normalize_rewards else terminal):
        # the terminal reward on the last action
        s["rewards"] = s["shaping"][:-1] + [s["shaping"][-1] + r]
    return samples, truncated


def ilql_batch(samples: list[dict], pad_id: int) -> dict[str, Tensor]:
    """Right-padded tokens (real pad id), (B, A) action tensors and (B, A+1) state indices; padding
    is 0."""
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
        batch["h_states"] = nn.utils.rnn.pad_sequence([s["h_states"] for s in samples],
                                                      batch_first=True)
    return batch


def state_hidden(model, batch: dict[str, Tensor]) -> Tensor:
    """(B, A+1, H): the LM's last hidden state at every state of every row (cached ones if the batch
    has them)."""
    if "h_states" in batch:
        return batch["h_states"]
    # through the LM's own forward (logits at no position), so FSDP's hooks on it gather the root's
    # weights
    no_logits = torch.zeros_like(batch["attention_mask"], dtype=torch.bool)
    _, hidden = model(batch["input_ids"], batch["attention_mask"], return_hidden=True,
                      logits_at=no_logits)  # (B, T, H)
    return hidden.gather(1, batch["states_ixs"].unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))


@torch.no_grad()
def cache_features(model, samples: list[dict], pad_id: int, batch_size: int, dev,
                   lockstep: bool = False) -> None:
    """A frozen LM's last hidden states at each sample's states, computed once: s["h_states"]
    (A+1, H). `lockstep` (FSDP): every rank runs as many forwards as the busiest one, the extra ones
    on a dummy chunk."""
    chunks = [samples[i:i + batch_size] for i in range(0, len(samples), batch_size)]
    n_forwards = distributed.max_over_ranks(len(chunks)) if lockstep else len(chunks)
    for i in distributed.bar(range(n_forwards), desc="features", unit="batch"):
        # past its own chunks a rank forwards a copy of one sample (without its cached features) and
        # drops it
        dummy = [{k: v for k, v in samples[0].items() if k != "h_states"}]
        chunk = chunks[i] if i < len(chunks) else dummy
        batch = {k: v.to(dev) for k, v in ilql_batch(chunk, pad_id).items()}
        with autocast(dev):
            h_states = state_hidden(model, batch).float()
        for row, s in enumerate(chunk):
            s["h_states"] = h_states[row, :len(s["states_ixs"])].clone()


class ILQLNet(nn.Module):
    """The LM and its heads as one module: what DDP wraps, so it sees every parameter the loss
    reaches. `lm` None: a frozen LM whose features every batch carries (cache_features)."""

    def __init__(self, lm, heads: ILQLHeads):
        super().__init__()
        self.lm, self.heads = lm, heads

    def forward(self, batch: dict[str, Tensor], lm_logits: bool = True):
        """-> qs, target_qs (B, A, V), vs (B, A+1), LM logits (B, A, V) or None, actions (B, A). The
        heads see the gathered states only; the actions are the states but the last
        (ilql_indices)."""
        h_states = state_hidden(self.lm, batch)
        # padded rows: their extra "actions" are masked out by action_mask
        h_actions = h_states[:, :-1]
        with torch.no_grad():
            target_qs = self.heads.qs(h_actions, target=True)
        # the token each action emitted
        actions = batch["input_ids"].gather(1, batch["actions_ixs"] + 1)
        qs, vs = self.heads.qs(h_actions), self.heads.v(h_states)
        return qs, target_qs, vs, self.lm.lm_head(h_actions) if lm_logits else None, actions

    def state_tensors(self) -> dict[str, Tensor]:
        """What RUN/state/ keeps: the heads (targets too) and a trained LM (a frozen one is the
        base, not stored); a tied output matrix is the embedding, stored once."""
        tied = self.lm is not None and self.lm.cfg.tie_word_embeddings
        return {k: v for k, v in self.state_dict().items()
                if not (tied and k == "lm.lm_head.weight")}

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        """state_tensors() back in place (heads.unembed still shares the LM's storage)."""
        mine = {k: v for k, v in tensors.items() if k.startswith(("lm.", "heads."))}
        if self.lm is not None and self.lm.cfg.tie_word_embeddings:
            mine["lm.lm_head.weight"] = mine["lm.model.embed_tokens.weight"]
        self.load_state_dict(mine)


# --- the run ---

def prepare(cfg: Config, model, heads: ILQLHeads, samples: list[dict], pad_id: int, dev
            ) -> tuple[nn.Module, ILQLNet, torch.optim.Optimizer, list[list[dict]]]:
    """What the loop trains through -> (the net to call: DDP under torchrun, the ILQLNet it wraps,
    AdamW over what trains, the micro-batches). A frozen LM's features are computed here, once."""
    model.train(cfg.train_lm)
    # the same order on every (re)start: a resume needs only the step number
    micro_batches = [b for epoch in epoch_batches(samples, cfg.batch_size, cfg.epochs, cfg.seed)
                     for b in epoch]
    if not cfg.train_lm:  # the LM never changes: its features once, then only the small heads run
        model.requires_grad_(False)
        mine = list({id(s): s for b in micro_batches for s in distributed.shard(b)[0]}.values())
        # under FSDP every rank must join every forward of the sharded LM
        cache_features(model, mine, pad_id, cfg.batch_size * cfg.grad_accum, dev, lockstep=cfg.fsdp)
    # DDP under torchrun, else itself; a frozen LM stays out of it (its features are cached; under
    # FSDP, DDP would broadcast rank 0's shards over the other ranks' own)
    ilql = ILQLNet(model if cfg.train_lm else None, heads)
    net = distributed.wrap(ilql)
    # not the targets: Polyak moves them
    head_params = [p for p in heads.parameters() if p.requires_grad]
    groups = [{"params": head_params, "lr": cfg.head_lr, "peak_lr": cfg.head_lr}]
    if cfg.train_lm:  # with LoRA: the adapters
        lm_params = [p for p in model.parameters() if p.requires_grad]
        groups.append({"params": lm_params, "lr": cfg.lr, "peak_lr": cfg.lr})
    return net, ilql, torch.optim.AdamW(groups, weight_decay=cfg.weight_decay), micro_batches


def train(cfg: Config, net: nn.Module, ilql: ILQLNet, optimizer: torch.optim.Optimizer,
          micro_batches: list[list[dict]], pad_id: int, dev, run: Run, start: int = 0,
          history: list[dict] | None = None) -> list[dict]:
    """ILQL steps from `start` through `net` (what prepare() made). Under torchrun every rank builds
    the same micro-batches and trains on its shard of each."""
    total_steps = math.ceil(len(micro_batches) / cfg.grad_accum)
    history = [] if history is None else history  # main's list: Ctrl-C counts its finished steps
    syncs = start // cfg.target_sync_every
    bar = distributed.bar(total=total_steps, initial=start, desc="ILQL", unit="step")
    for step in range(start, total_steps):
        for group in optimizer.param_groups:
            group["lr"] = group["peak_lr"] * lr_at(step, total_steps, cfg.warmup_steps)
        part = slice(step * cfg.grad_accum, (step + 1) * cfg.grad_accum)
        # Every term is a mean over the step's actions, of all its micro-batches on all ranks:
        # ilql_loss divides by this n, so the micro-batch losses add up to the step's loss, not to a
        # mean of means.
        n = sum(len(s["actions_ixs"]) for b in micro_batches[part] for s in b)
        shards = [distributed.shard(b) for b in micro_batches[part]]  # [(this rank's share, real?)]
        # named totals of this rank's micro-batches, summed over the ranks below
        sums: dict[str, float] = {}
        for i, (samples_i, real) in enumerate(shards):
            batch = {k: v.to(dev) for k, v in ilql_batch(samples_i, pad_id).items()}
            # DDP all-reduces the gradients on the step's last backward only; before it they add up
            # locally
            net.require_backward_grad_sync = i == len(shards) - 1
            # The targets come from the target Q heads (Q̂ = their min), never from the online
            # ones: bootstrapping from the heads being trained is what makes Q-learning diverge.
            with autocast(dev):
                qs, target_qs, vs, logits, actions = net(batch, cfg.train_lm)
            # L_Q regresses Q(s,a) on r + γ·V(s') (V detached), L_V pulls V to an upper
            # expectile of Q̂ (τ > 0.5: V ≈ the best action seen in the data, not the data's
            # average), L_CQL keeps Q low on tokens never taken, L_AWAC (a trained LM only) is
            # advantage-weighted BC.
            loss, stats, adv = ilql_loss(qs, target_qs, vs, logits, actions, batch["rewards"],
                                         batch["next_nonterminal"], batch["action_mask"],
                                         cfg.gamma, cfg.tau, cfg.cql_scale, cfg.awac_scale,
                                         cfg.awac_beta, n)
            # DDP averages the ranks' gradients: × world size makes that the sum the loss
            # defines. A rank with no real samples left runs a dummy micro-batch (real = False)
            # with weight 0.
            (loss * (distributed.world_size() if real else 0)).backward()
            chosen = batch["action_mask"] * (batch["label"] > 0)[:, None]
            rejected = batch["action_mask"] * (batch["label"] < 0)[:, None]
            # the stats are shares of the step's mean already; the advantages are averaged per
            # response kind
            named = {**stats, "adv_sum/chosen": float((adv * chosen).sum()),
                     "actions/chosen": float(chosen.sum()),
                     "adv_sum/rejected": float((adv * rejected).sum()),
                     "actions/rejected": float(rejected.sum())}
            for k, v in named.items():
                sums[k] = sums.get(k, 0.0) + real * v
        params = [p for g in optimizer.param_groups for p in g["params"]]
        grad_norm = clip_grad_norm(params, cfg.grad_clip)
        # a NaN or inf stops the run here, before the weights step on it: the last state stays
        check_finite(step + 1, "lower --lr or --head-lr", grad_norm=grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # Polyak after every optimizer step, as Snell's loop does: trlX syncs once per epoch at
        # most, so its targets barely move. α small: Q̂ trails the online heads, which keeps the
        # bootstrap target stable.
        if (step + 1) % cfg.target_sync_every == 0:
            ilql.heads.sync_targets(cfg.alpha)
            syncs += 1
        # one all-reduce of all named totals, in the dict's key order: the same names, in the same
        # order, on every rank (inserted by the same code); float64, so the sums over ranks do not
        # lose digits
        totals = distributed.all_reduce_sum(torch.tensor(list(sums.values()), dtype=torch.float64))
        totals = dict(zip(sums, totals.tolist()))
        # what's left in totals after the pops: ilql_loss's stats
        adv_means = {f"adv/{side}": totals.pop(f"adv_sum/{side}")
                     / max(totals.pop(f"actions/{side}"), 1) for side in ("chosen", "rejected")}
        metrics = {**totals, **adv_means, "step": step + 1, "grad_norm": grad_norm,
                   "lr": optimizer.param_groups[0]["lr"], "target_syncs": syncs,
                   "target_gap": ilql.heads.target_gap()}
        run.log(**metrics)
        history.append(metrics)
        # the chosen answers' advantage should be the higher
        gap = metrics["adv/chosen"] - metrics["adv/rejected"]
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", adv_gap=f"{gap:.3f}")
        bar.update()
        due = step + 1 == total_steps or (cfg.save_every and (step + 1) % cfg.save_every == 0)
        if distributed.is_main() and due:
            save_state(run.dir, step + 1, ilql.state_tensors(), optimizer)
    bar.close()
    return history


# --- decoding: π(a|s) ∝ π_β(a|s)·exp(β·(Q̂ - V)), Q̂ the min of the target heads ---
#
# Through generate()'s logits hook. generate() divides the hook's output by T: for Snell's
# softmax(logits/T + β·adv) (default) the hook returns logπ + T·β·adv; style "trlx" returns
# logπ + β·adv, trlX's softmax((logπ + β·adv)/T). Top-k: Snell keeps the k most likely tokens of the
# base LM (logits/T), then adds the advantage, so the heads only re-rank what π_β finds plausible;
# trlX keeps the top k of the combined score.

def ilql_scores(logits: Tensor, adv: Tensor, beta: float, temperature: float = 1.0, top_k: int = 0,
                style: str = "snell") -> Tensor:
    """(..., V) LM logits and advantages -> what the hook hands to generate(), which divides it by T
    before the softmax (see above). top_k = 0: no filter."""
    logp = logits.float().log_softmax(-1)
    if style == "trlx":  # top-k of the combined score
        return top_k_filter(logp + beta * adv.float(), top_k)
    scale = temperature if temperature > 0 else 1.0  # T = 0 (greedy): the argmax of logπ + β·adv
    # top-k of π_β (= of logits/T), then the advantage
    return top_k_filter(logp, top_k) + beta * scale * adv.float()


@torch.no_grad()
def ilql_logits_hook(heads: ILQLHeads, beta: float, temperature: float = 1.0, top_k: int = 0,
                     style: str = "snell") -> LogitsHook:
    """Perturb the LM by β·(min target Q - V) at every decoding step; pass the same T to
    generate(). The heads must not change while the hook is in use (their V×r matrices are computed
    here, once)."""
    matrices = heads.q_matrices(target=True)

    def hook(logits: Tensor, hidden: Tensor, step: int) -> Tensor:
        if beta == 0 and top_k == 0:
            return logits  # the base policy, bit for bit
        q_hat = torch.stack(heads.qs(hidden, True, matrices)).min(0).values
        adv = q_hat - heads.v(hidden).unsqueeze(-1)
        return ilql_scores(logits, adv, beta, temperature, top_k, style)
    return hook


# --- evaluation: the base, then the heads' decoding at each --eval-betas ---

def evaluate_heads(cfg: Config, policy, heads: ILQLHeads, tok: Tokenizer, rows: list[dict],
                   base_model, results: dict) -> dict:
    """results (holding "base") + an "ILQL β=b" column per --eval-betas: `policy` steered by the
    heads, its samples' NLL under `base_model`."""
    for beta in parse_betas(cfg.eval_betas):
        if beta == 0 and not cfg.eval_top_k and not cfg.train_lm:  # the frozen base, unperturbed
            results["ILQL β=0"] = results["base"]
            continue
        hook = ilql_logits_hook(heads, beta, cfg.eval_temperature, cfg.eval_top_k, cfg.gen_style)
        results[f"ILQL β={beta:g}"] = evaluate_as(cfg, cfg.seed, policy, tok, rows, base_model,
                                                  hook, desc=f"eval ILQL beta={beta:g}")
    return results


def print_results(cfg: Config, results: dict, n_rows: int) -> None:
    print(f"\nheld-out pink-elephant eval: {n_rows} prompts x {cfg.eval_n} samples (temperature "
          f"{cfg.eval_temperature}, {cfg.gen_style} style, top-k {cfg.eval_top_k or 'off'}, "
          f"seed {cfg.seed})")
    print(format_table(results))
    if (base := results["base"]["pink_rate"]) > 0:
        print("relative change in pink mention rate: " + ", ".join(
            f"β={b:g} {(results[f'ILQL β={b:g}']['pink_rate'] - base) / base:+.0%}"
            for b in parse_betas(cfg.eval_betas)))


def save_heads(heads: ILQLHeads, path: Path, base_model: str = "") -> None:
    """The heads as one safetensors file, written atomically (a crash keeps the previous file)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in heads.state_dict().items()}
    atomic_write_bytes(path, save(tensors, metadata={
        "rank": str(heads.v_head[0].out_features), "two_qs": str(len(heads.q_heads) == 2),
        "base_model": base_model}))


def load_heads(path: str | Path, model) -> ILQLHeads:
    """Heads saved by save_heads, bound to `model`'s output matrix (on its device). Heads made for
    another vocabulary or hidden size are a UserError."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(path)
    vocab, hidden = tensors["q_heads.0.bias"].shape[0], tensors["v_head.0.weight"].shape[1]
    if (vocab, hidden) != tuple(model.lm_head.weight.shape):
        raise UserError(f"{path}: heads for vocabulary {vocab} and hidden size {hidden}, but the "
                        f"model has {model.lm_head.weight.shape[0]} and "
                        f"{model.lm_head.weight.shape[1]}")
    heads = ILQLHeads(hidden, model.lm_head.weight, int(meta["rank"]), meta["two_qs"] == "True")
    heads.load_state_dict(tensors)
    return heads.to(model.lm_head.weight.device)


def finished_run(run: str) -> dict:
    """--evaluate RUN_DIR -> the run's config.json (a finished run: its heads are there, and its LM
    if it trained one), as the defaults of the flags: one process evaluates, it resumes nothing."""
    path = Path(run)
    if not (path / "ilql_heads.safetensors").is_file() or not (path / "config.json").is_file():
        raise UserError(f"--evaluate {run}: no ilql_heads.safetensors and config.json there "
                        "(not a finished train_ilql run directory)")
    saved = read_json(path / "config.json")
    if saved.get("train_lm") and not (path / "model").is_dir():
        raise UserError(f"--evaluate {run}: the run trained its LM, but {path / 'model'} is "
                        "missing")
    return {**saved, "fsdp": False, "resume": "", "evaluate": run}


def evaluate_run(cfg: Config, threads: int) -> None:
    """--evaluate: the run's heads steer its LM (the trained one, or the frozen --model), evaluated
    as the run evaluated itself: with the run's flags, its eval.json's columns to the last digit."""
    if not cfg.eval_data:
        raise UserError(f"--evaluate {cfg.evaluate}: no --eval-data (the run had none): give one")
    rows = load_eval_rows(cfg.eval_data)
    model_dir = resolve_model(cfg.model)
    tok, dev = Tokenizer(model_dir), device()
    base = load_model(model_dir, device=dev).eval()
    policy = load_model(Path(cfg.evaluate) / "model", device=dev).eval() if cfg.train_lm else base
    heads = load_heads(Path(cfg.evaluate) / "ilql_heads.safetensors", policy)  # before any sampling
    print(f"evaluating the heads of {cfg.evaluate} on {cfg.eval_data}; torch threads: {threads}")
    results = {"base": evaluate_as(cfg, cfg.seed, base, tok, rows, desc="eval base")}
    evaluate_heads(cfg, policy, heads, tok, rows, base, results)
    print_results(cfg, results, len(rows))
    if cfg.evaluate_out:
        text = json.dumps(results, indent=1, ensure_ascii=False) + "\n"
        atomic_write_text(cfg.evaluate_out, text)


def main() -> None:
    cfg = parse_config(Config, __doc__)  # every flag checked before any work
    threads = choose_threads(cfg.threads)
    if cfg.evaluate:  # the finished run's own config, with the flags given here on top
        evaluate_run(parse_config(Config, __doc__, defaults=finished_run(cfg.evaluate)), threads)
        return
    if not cfg.resume:
        run_dir(cfg.out_dir, cfg.run)  # refuse a used --run now, not after the model has loaded
    distributed.init()  # torchrun: join the process group (a no-op otherwise)
    history = []
    if cfg.resume:  # the interrupted run's own config, and its metrics up to its saved state
        cfg, step, history = resume_run(Config, cfg.resume, "train_ilql")
        print0(f"resuming {cfg.resume} at step {step}")
    seed_everything(cfg.seed)
    started, dev = time.perf_counter(), device()
    rows = read_preferences(cfg.data)[:cfg.max_pairs or None]
    # validate inputs before any work
    eval_rows = load_eval_rows(cfg.eval_data) if cfg.eval_data else []
    if cfg.fsdp and eval_rows:  # generation would need every rank in lockstep: evaluate afterwards
        print0("--fsdp: no pink-elephant evaluation here; run python train_ilql.py --evaluate "
               "RUN_DIR")
    eval_rows = eval_rows if distributed.is_main() and not cfg.fsdp else []  # rank 0 evaluates
    model_dir = resolve_model(cfg.model)
    tok = Tokenizer(model_dir)
    if cfg.fsdp:  # a frozen LM: every rank reads only its shard of each tensor, never all of it
        from nanorlhf.fast.fsdp import load_model_sharded
        model = load_model_sharded(model_dir, dev).eval()
    else:
        model = load_model(model_dir, device=dev).eval()
    if cfg.train_lm:  # how the LM trains (Config.check refuses these on a frozen LM)
        lora.adapt(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.seed)  # rank 0: off
        model.model.grad_checkpointing = cfg.grad_checkpointing
        if cfg.onednn:  # the optional speed layer, imported only where its flag is read
            from nanorlhf.fast.packed import pack_linears
            pack_linears(model)  # after LoRA: adapted projections keep their own forward
    samples, truncated = make_samples(rows, tok, cfg, model.cfg.vocab_size)
    # the heads project into the LM's output matrix: FSDP's shards gathered once (the LM is frozen)
    unembed = model.lm_head.weight.full_tensor() if cfg.fsdp else model.lm_head.weight
    heads = ILQLHeads(model.cfg.hidden_size, unembed, cfg.head_rank, cfg.two_qs).to(dev)
    n_heads = sum(p.numel() for p in heads.parameters() if p.requires_grad)
    print0(f"{len(samples)} samples ({len(rows)} pairs) from {cfg.data}; {truncated} truncated to "
           f"{cfg.max_len} tokens; heads: {n_heads:,} trainable parameters; "
           f"LM {'trained' if cfg.train_lm else 'frozen'}; torch threads: {threads}")
    run = Run("train_ilql", cfg.out_dir, cfg.run, cfg, resume=bool(cfg.resume))
    if cfg.resume:
        run.rewrite(history)  # metrics.jsonl back to the saved state's step

    results = read_results(run.dir) if cfg.resume else {}  # a resumed run keeps the base evaluation it already has
    if eval_rows and "base" not in results:  # the policy before its first step (heads still 0)
        results["base"] = evaluate_as(cfg, cfg.seed, model, tok, eval_rows, desc="eval base")
        run.write_json("eval.json", results)
    net, ilql, optimizer, micro_batches = prepare(cfg, model, heads, samples, tok.pad_id, dev)
    start = 0
    if cfg.resume:  # the heads, targets, a trained LM, AdamW's moments and the RNG, as saved
        start, tensors, _ = load_state(run.dir, optimizer)
        ilql.load_state_tensors(tensors)

    def save() -> Path:  # the heads, and a trained LM (every rank calls it; rank 0 writes)
        model.eval()
        if cfg.train_lm:  # LoRA merged
            save_model(model, run.dir / "model", copy_from=model_dir)
        if distributed.is_main():
            save_heads(heads, run.dir / "ilql_heads.safetensors",
                       base_model="" if cfg.train_lm else str(model_dir))
        return run.dir if cfg.train_lm else run.dir / "ilql_heads.safetensors"

    try:
        history = train(cfg, net, ilql, optimizer, micro_batches, tok.pad_id, dev, run, start,
                        history)
    except KeyboardInterrupt:  # Ctrl-C: what the finished steps learned is saved; one line, 130
        exit_interrupted(run, len(history), "heads and model" if cfg.train_lm else "heads", save)
    save()
    if not distributed.is_main():
        return
    series = lambda *keys: {k: [(m["step"], m[k]) for m in history] for k in keys}
    line_plots([("ILQL loss terms", series("loss/q", "loss/v", "loss/cql", "loss/awac")),
                ("values on dataset actions", series("v", "q_hat", "q")),
                ("advantage Q̂-V by response", series("adv/chosen", "adv/rejected")),
                ("‖target - online‖ (Q heads)", series("target_gap"))], run.dir / "training.svg")
    if eval_rows:
        # the NLL is scored under the base: a trained LM's is loaded again, a frozen one is it
        base_model = load_model(model_dir, device=dev).eval() if cfg.train_lm else model
        evaluate_heads(cfg, model, heads, tok, eval_rows, base_model, results)
        run.write_json("eval.json", results)
        print_results(cfg, results, len(eval_rows))
    where = "heads" if cfg.train_lm else f"heads (on the unchanged {cfg.model})"
    minutes = (time.perf_counter() - started) / 60
    print(f"{where}, metrics and plots in {run.dir} ({minutes:.1f} min)")


if __name__ == "__main__":
    run_cli(main)
