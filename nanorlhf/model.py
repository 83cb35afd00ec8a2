"""A Llama-family decoder in one file: the network every nanorlhf script trains.

Covers Llama 1/2/3(.1/.2), SmolLM2, TinyLlama, Mistral (without the sliding window) and Qwen2:
RMSNorm, rotary embeddings in Hugging Face's split-halves layout (with llama3/linear scaling),
grouped-query attention through torch's scaled_dot_product_attention, a SwiGLU MLP, optional
q/k/v biases (Qwen2), tied or untied output head, and a pre-allocated KV cache.

Parameter names are exactly those of Hugging Face checkpoints (`model.layers.0.self_attn.q_proj`,
...), so a safetensors file loads by name with no translation table.
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # e.g. {"rope_type": "llama3", "factor": 32.0, ...}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 has biases on q/k/v only
    o_bias: bool = False  # Llama's `attention_bias` also puts one on o_proj
    mlp_bias: bool = False
    hf_config: dict = field(default_factory=dict, repr=False)  # the config.json it came from


def rope_inv_freq(cfg: ModelConfig) -> Tensor:
    """Inverse frequencies theta^(-2i/d), shape (head_dim/2,), with optional long-context scaling:
    llama3's (Llama 3.1/3.2) keeps high frequencies, divides low ones by `factor` and blends the
    band in between, as in transformers' `_compute_llama3_parameters`."""
    d = cfg.head_dim
    # device="cpu" explicitly: the model may be built under torch.device("meta") for loading
    dims = torch.arange(0, d, 2, dtype=torch.int64, device="cpu").float()  # 0, 2, ..., d-2
    inv_freq = 1.0 / (cfg.rope_theta ** (dims / d))
    scaling = cfg.rope_scaling or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_ctx = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_ctx / lo, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        in_band = (wavelen >= old_ctx / hi) & (wavelen <= old_ctx / lo)
        return torch.where(in_band, blended, scaled)
    raise ValueError(f"unsupported rope_type {rope_type!r} (supported: default, linear, llama3)")


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: (B, heads, T, d); cos/sin: (B, 1, T, d). HF layout: dim i pairs with dim i + d/2."""
    return x * cos + rotate_half(x) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # normalise in fp32 even under bf16, cast back, then scale: the order HF uses
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class KVCache:
    """Pre-allocated keys/values for every layer: (layers, B, kv_heads, max_len, head_dim). `pos`
    counts the positions already written; the model advances it after each forward."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device, dtype):
        shape = (cfg.num_hidden_layers, batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0

    def repeat(self, batch_size: int, max_len: int) -> "KVCache":
        """A cache of batch_size rows with room for max_len positions, every row starting with this
        one-row cache's `pos` positions (a prefix all rows share, computed once)."""
        out = KVCache.__new__(KVCache)
        shape = (self.k.shape[0], batch_size, self.k.shape[2], max_len, self.k.shape[4])
        out.k, out.v = self.k.new_zeros(shape), self.v.new_zeros(shape)
        out.k[:, :, :, :self.pos] = self.k[:, :, :, :self.pos]
        out.v[:, :, :, :self.pos] = self.v[:, :, :, :self.pos]
        out.pos = self.pos
        return out

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k/v (B, kv_heads, T, d) at `pos`; return all keys/values so far
        (B, kv_heads, pos+T, d)."""
        end = self.pos + k.shape[2]
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        h = cfg.hidden_size
        self.q_proj = nn.Linear(h, self.n_head * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, h, bias=cfg.o_bias)

    def project(self, x, cos, sin) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, T, hidden) -> rotated q (B, nh, T, d), rotated k and v (B, nkv, T, d)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, d)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, nkv, T, d)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x, cos, sin, mask: Tensor | None, cache: KVCache | None) -> Tensor:
        B, T, _ = x.shape
        q, k, v = self.project(x, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, nkv, S, d), S = cached + T
        # no mask means "plain causal": upper-left aligned, right only when queries == keys
        causal = mask is None and q.shape[2] == k.shape[2] and T > 1
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=self.n_kv != self.n_head
        )  # (B, nh, T, d); enable_gqa shares each kv head with n_head/n_kv consecutive q heads
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(h, i, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(i, h, bias=cfg.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


def attention_mask_4d(attention_mask: Tensor, T: int) -> Tensor:
    """(B, S) 1=token/0=pad over all keys -> bool (B, 1, T, S), True = may attend. The T queries
    are the last T of the S positions (the rest sit in the KV cache), so the causal part is aligned
    to the lower right. A pad query still sees itself: a softmax row with every entry masked would
    be NaN, and NaN in a pad row can leak into gradients."""
    S = attention_mask.shape[1]
    q_pos = torch.arange(S - T, S, device=attention_mask.device)[:, None]  # (T, 1)
    k_pos = torch.arange(S, device=attention_mask.device)[None, :]  # (1, S)
    mask = (k_pos <= q_pos) & attention_mask[:, None, None, :].bool()  # (B, 1, T, S)
    return mask | (k_pos == q_pos)


class Backbone(nn.Module):
    """Embeddings + blocks + final norm: token ids -> last hidden states (the LM's and the reward
    models')."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        # keep only each block's input and recompute its activations in backward: memory per block
        # drops from its intermediates to one (B, T, hidden) tensor, for about one more forward
        self.grad_checkpointing = False

    def rope(self, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """position_ids (B, T) -> cos, sin (B, 1, T, head_dim), computed in fp32, cast to dtype."""
        freqs = position_ids[:, :, None].float() * self.inv_freq[None, None, :]  # (B, T, d/2), fp32
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, d)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(
        self,
        input_ids: Tensor,  # (B, T)
        attention_mask: Tensor | None = None,  # (B, S): S = cached + T; 1 = token, 0 = pad
        cache: KVCache | None = None,
        position_ids: Tensor | None = None,  # (B, T); required with a 4-D mask
    ) -> Tensor:  # (B, T, hidden)
        B, T = input_ids.shape
        start = cache.pos if cache is not None else 0
        if attention_mask is not None and attention_mask.dim() == 4:
            # (B, 1, T, S) bool, True = may attend, used as given, e.g. a prompt tree's (judge.py)
            if position_ids is None:
                raise ValueError("a 4-D attention mask needs position_ids")
            mask = attention_mask
        else:
            if position_ids is None and attention_mask is not None:
                # left or right padding: a token's position counts only the real tokens before it
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]  # (B, T)
            elif position_ids is None:
                position_ids = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
            if attention_mask is None and start > 0 and T > 1:
                attention_mask = torch.ones(B, start + T, dtype=torch.long, device=input_ids.device)
            # a 4-D mask only where SDPA's plain causal (or no) masking would be wrong
            has_pad = attention_mask is not None and not bool(attention_mask.all())
            needs_mask = has_pad or (start > 0 and T > 1)
            mask = attention_mask_4d(attention_mask, T) if needs_mask else None

        x = self.embed_tokens(input_ids)
        cos, sin = self.rope(position_ids, x.dtype)
        for block in self.layers:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, mask, cache, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, cache)
        if cache is not None:
            cache.pos += T
        return self.norm(x)


class Transformer(nn.Module):
    """Causal LM: Backbone + lm_head. `model(ids)` -> logits (B, T, vocab). Everything a training
    step needs goes through forward() (not model.model + model.lm_head), so DDP and FSDP, which
    hook the wrapped module's forward, see the whole step."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        cache: KVCache | None = None,
        return_hidden: bool = False,
        last_only: bool = False,  # logits for the last position only (sampling): skips a big matmul
        logits_at: Tensor | None = None,  # (B, T) bool: logits only where True -> (N, vocab)
        position_ids: Tensor | None = None,  # (B, T): default from the mask (0.. without one)
    ):
        hidden = self.model(input_ids, attention_mask, cache, position_ids)  # (B, T, hidden)
        picked = hidden[:, -1:] if last_only else hidden if logits_at is None else hidden[logits_at]
        logits = self.lm_head(picked)  # (B, T or 1, vocab), or (N, vocab) with logits_at
        return (logits, hidden) if return_hidden else logits


def device() -> torch.device:
    """CUDA (with bf16 autocast at the call sites) when present, else the CPU in fp32. Under
    torchrun "cuda" is this rank's GPU (distributed.init() made it the current device)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(dev: torch.device):
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")
