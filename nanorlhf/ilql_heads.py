"""ILQL's value heads and the decoding they steer (Snell et al. 2022), apart from the training script so
that anything that samples (generate, pink_eval, chat) can load trained heads and use them.

Heads. trlX's Q head, Linear(h,2h)→ReLU→Linear(2h,V), has 57.3M parameters for SmolLM2-135M (h=576,
V=49152): 229M for 2 Q + 2 targets, more than the model. Ours project into the LM's own output matrix,
rows scaled to unit length and detached: Q(s,·) = Ê·W_up·relu(W_down·h + b) + per-token bias, r = h/4,
W_up zero-initialised so Q starts at 0: 215,184 parameters per Q head, 83,233 for V, 0.94M with the
targets (0.7% of the model). Computed as (Ê·W_up)·z, which costs r/h = 1/4 of Ê·(W_up·z) per position.

Decoding: π(a|s) ∝ π_β(a|s)·exp(β·(Q̂ - V)), Q̂ the min of the target heads, through generate()'s logits
hook. generate() divides the hook's output by T: for Snell's softmax(logits/T + β·adv) (default) the
hook returns logπ + T·β·adv; style "trlx" returns logπ + β·adv, trlX's softmax((logπ + β·adv)/T).
Top-k: Snell keeps the k most likely tokens of the base LM (logits/T), then adds the advantage, so the
heads only re-rank what π_β finds plausible; trlX keeps the top k of the combined score.

Precision. On CUDA every forward runs under bf16 autocast, whose 8 significant bits put Q and V near 1
on a grid of 1/128..1/256: about the size of the advantages Q̂ - V the heads report. So the heads run
outside autocast, in fp32, in training and in decoding alike.
"""

import copy
import math
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from nanorlhf.errors import UserError
from nanorlhf.sampling import LogitsHook, top_k_filter


@contextmanager
def fp32(h: Tensor):
    """Autocast off on h's device: what runs inside sees and computes in fp32 (h is cast by the caller)."""
    with torch.autocast(h.device.type, enabled=False):
        yield


class QHead(nn.Module):
    """Q(s,·) = Ê·W_up·relu(W_down·h + b) + bias, evaluated as (Ê·W_up)·z (see `matrix`)."""

    def __init__(self, hidden: int, rank: int, vocab: int):
        super().__init__()
        self.down, self.up = nn.Linear(hidden, rank), nn.Linear(rank, hidden, bias=False)
        self.bias = nn.Parameter(torch.zeros(vocab))
        nn.init.zeros_(self.up.weight)  # Q starts at 0, like the returns it will fit, not at the LM's logits

    def matrix(self, basis: Tensor) -> Tensor:
        """(V, H) unit rows Ê -> (V, r) Ê·W_up: one V×H×r product per call, not V×H per position."""
        return basis @ self.up.weight

    def forward(self, h: Tensor, matrix: Tensor) -> Tensor:
        return F.linear(F.relu(self.down(h)), matrix) + self.bias  # (..., H) -> (..., V)


class ILQLHeads(nn.Module):
    def __init__(self, hidden: int, unembed: Tensor, rank: int = 0, two_qs: bool = True):
        super().__init__()
        rank = rank or hidden // 4
        self.unembed = unembed.detach()  # a plain attribute: the LM's storage, no parameter, no gradient
        self.v_head = nn.Sequential(nn.Linear(hidden, rank), nn.ReLU(), nn.Linear(rank, 1))
        nn.init.zeros_(self.v_head[2].weight), nn.init.zeros_(self.v_head[2].bias)  # V starts at 0
        self.q_heads = nn.ModuleList(QHead(hidden, rank, unembed.shape[0]) for _ in range(1 + two_qs))
        self.target_q_heads = copy.deepcopy(self.q_heads).requires_grad_(False)  # start identical

    def v(self, h: Tensor) -> Tensor:
        """(..., H) -> (..., ) in fp32, whatever autocast is on."""
        with fp32(h):
            return self.v_head(h.float()).squeeze(-1)

    def q_matrices(self, target: bool = False) -> list[Tensor]:
        # unit rows: Q(s,a) = <ê_a, x(s)> + b_a, so the scale of Q does not depend on the scale of E
        with fp32(self.unembed):
            basis = F.normalize(self.unembed.float(), dim=-1)
            return [q.matrix(basis) for q in (self.target_q_heads if target else self.q_heads)]

    def qs(self, h: Tensor, target: bool = False, matrices: list[Tensor] | None = None) -> list[Tensor]:
        """Per Q head (..., H) -> (..., V) in fp32. `matrices`: q_matrices() computed once while the heads
        stay fixed (decoding)."""
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


def ilql_scores(logits: Tensor, adv: Tensor, beta: float, temperature: float = 1.0, top_k: int = 0,
                style: str = "snell") -> Tensor:
    """(..., V) LM logits and advantages -> what the hook hands to generate(), which divides it by T
    before the softmax (see the docstring). top_k = 0: no filter."""
    logp = logits.float().log_softmax(-1)
    if style == "trlx":  # top-k of the combined score
        return top_k_filter(logp + beta * adv.float(), top_k)
    scale = temperature if temperature > 0 else 1.0  # T = 0 (greedy): the argmax of logπ + β·adv
    return top_k_filter(logp, top_k) + beta * scale * adv.float()  # top-k of π_β (= of logits/T), then adv


@torch.no_grad()
def ilql_logits_hook(heads: ILQLHeads, beta: float, temperature: float = 1.0, top_k: int = 0,
                     style: str = "snell") -> LogitsHook:
    """Perturb the LM by β·(min target Q - V) at every decoding step; pass the same T to generate().
    The heads must not change while the hook is in use (their V×r matrices are computed here, once)."""
    matrices = heads.q_matrices(target=True)

    def hook(logits: Tensor, hidden: Tensor, step: int) -> Tensor:
        if beta == 0 and top_k == 0:
            return logits  # the base policy, bit for bit
        adv = torch.stack(heads.qs(hidden, True, matrices)).min(0).values - heads.v(hidden).unsqueeze(-1)
        return ilql_scores(logits, adv, beta, temperature, top_k, style)
    return hook


def save_heads(heads: ILQLHeads, path: Path, base_model: str = "") -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in heads.state_dict().items()}, path,
              metadata={"rank": str(heads.v_head[0].out_features), "two_qs": str(len(heads.q_heads) == 2),
                        "base_model": base_model})


def load_heads(path: str | Path, model) -> ILQLHeads:
    """Heads saved by save_heads, bound to `model`'s output matrix (on its device). Heads made for
    another vocabulary or hidden size are a UserError."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(path)
    vocab, hidden = tensors["q_heads.0.bias"].shape[0], tensors["v_head.0.weight"].shape[1]
    if (vocab, hidden) != tuple(model.lm_head.weight.shape):
        raise UserError(f"{path}: heads for vocabulary {vocab} and hidden size {hidden}, but the model has "
                        f"{model.lm_head.weight.shape[0]} and {model.lm_head.weight.shape[1]}")
    heads = ILQLHeads(hidden, model.lm_head.weight, int(meta["rank"]), meta["two_qs"] == "True")
    heads.load_state_dict(tensors)
    return heads.to(model.lm_head.weight.device)
