"""A decode step with fixed shapes: generate(decode="static" | "compiled").

The eager decode step (model.forward with a KVCache) attends over a key range that grows by one
every step, builds its attention mask with torch.cat, and recomputes where a 4-D mask is needed.
Here the step instead always attends over the whole pre-allocated cache (B, kv_heads, max_len, d)
with one boolean key mask (B, max_len) that is switched on column by column, and writes the new
key/value with scatter_ at columns held in a tensor (one per row: stream.py's rows each have their
own). Every tensor keeps its shape from the first step to the last, which is what torch.compile
needs to compile the step once and run it as fused C++ kernels (gpt-fast's recipe: a static cache, a
compiled step). Masked keys add exact zeros to the softmax, so the logits equal the eager ones up to
the order of float sums (tests/test_fast_decode.py: 1e-5).

The step calls the model's own submodules (projections, norms, MLPs, lm_head), so LoRA adapters and
trained weights are what it sees; it reimplements only Attention.forward's cached path.
"""

import contextlib

import torch
from torch import Tensor

from nanorlhf import sampling
from nanorlhf.fast.packed import packed_linears
from nanorlhf.model import Attention, Block, KVCache, Transformer

DECODE_MODES = ("eager", "static", "compiled")

_compiled = None  # one compiled block step per process: dynamo's guards recompile it for new shapes


def _attend(attn: Attention, x: Tensor, cos: Tensor, sin: Tensor, key_bias: Tensor,
            k_cache: Tensor, v_cache: Tensor, at: Tensor) -> Tensor:
    """x (B, 1, hidden) -> (B, 1, hidden); writes each row's k/v into k_cache/v_cache (B, nkv, L, d)
    at its column `at` (B,). key_bias (B, 1, 1, L) is 0 where a key may be attended, -inf elsewhere.

    Attention by two batched matmuls rather than SDPA: with one query per row, the q heads that
    share a kv head are stacked as that head's rows (B, nkv, group, d), so each kv head's keys are
    read once. SDPA's CPU kernel (a flash kernel, built for long query blocks) took about 1.5x as
    long at this shape."""
    B = x.shape[0]
    q, k, v = attn.project(x, cos, sin)  # (B, nh, 1, d), (B, nkv, 1, d) x 2
    column = at[:, None, None, None].expand(k.shape)  # (B, nkv, 1, d): row b writes column at[b]
    k_cache.scatter_(2, column, k.to(k_cache.dtype))
    v_cache.scatter_(2, column, v.to(v_cache.dtype))
    # q head h uses kv head h // group, as SDPA's enable_gqa does
    group = attn.n_head // attn.n_kv
    q = q.reshape(B, attn.n_kv, group, attn.head_dim) * attn.head_dim ** -0.5  # (B, nkv, g, d)
    scores = (q.to(k_cache.dtype) @ k_cache.transpose(-1, -2)).float()  # (B, nkv, g, L) fp32
    scores = scores + key_bias
    # masked keys weigh exactly 0
    y = scores.softmax(-1).to(v_cache.dtype) @ v_cache  # (B, nkv, g, d)
    return attn.o_proj(y.reshape(B, 1, -1).to(x.dtype))


def block_step(block: Block, x: Tensor, cos: Tensor, sin: Tensor, key_bias: Tensor, k: Tensor,
               v: Tensor, at: Tensor) -> Tensor:
    """One block for one token per row: x (B, 1, hidden) -> (B, 1, hidden). This is the unit that
    torch.compile compiles: every block has the same structure, so (with dynamo's default of
    inlining nn.Modules and treating their parameters as inputs) one compiled graph serves all
    layers, and compiling costs one block, not the whole unrolled model."""
    x = x + _attend(block.self_attn, block.input_layernorm(x), cos, sin, key_bias, k, v, at)
    return x + block.mlp(block.post_attention_layernorm(x))


def decode_step(model: Transformer, token: Tensor, positions: Tensor, at: Tensor, key_mask: Tensor,
                k: Tensor, v: Tensor, step=block_step) -> tuple[Tensor, Tensor]:
    """One token per row through the whole model with fixed shapes.

    token (B,), positions (B,) its rotary positions, at (B,) the cache column each row writes it to,
    key_mask (B, L) bool (True = may attend; each row's column `at` already True), k/v the cache
    (layers, B, nkv, L, d)
    -> next-token logits (B, V) fp32 and the last hidden state (B, hidden)."""
    bb = model.model
    x = bb.embed_tokens(token[:, None])  # (B, 1, hidden)
    cos, sin = bb.rope(positions[:, None], x.dtype)  # (B, 1, 1, d)
    # the mask as an additive bias, built once for all layers
    key_bias = torch.zeros(key_mask.shape, device=key_mask.device)
    key_bias.masked_fill_(~key_mask, float("-inf"))
    key_bias = key_bias[:, None, None, :]  # (B, 1, 1, L) fp32
    for i, block in enumerate(bb.layers):
        x = step(block, x, cos, sin, key_bias, k[i], v[i], at)
    hidden = bb.norm(x)[:, -1]  # (B, hidden)
    return model.lm_head(hidden).float(), hidden


class StaticDecoder:
    """Decodes after an eager prefill: `cache` holds the prompts (its pos = P) with room for the
    rest, `mask` (B, P) is the prompts' padding mask. `step(token)` feeds one token per row and
    returns the logits (B, V) fp32 and hidden state (B, hidden) for the next one. compile=True runs
    the step through torch.compile (the first call per shape compiles: tens of seconds on CPU)."""

    def __init__(self, model: Transformer, cache: KVCache, mask: Tensor, compile: bool = False):
        global _compiled
        B, P = mask.shape
        self.model, self.cache, self.pos = model, cache, cache.pos
        self.key_mask = torch.zeros(B, cache.k.shape[3], dtype=torch.bool, device=mask.device)
        self.key_mask[:, :P] = mask.bool()
        # a token's position counts the real tokens before it (as Backbone's cumsum does)
        self.positions = mask.long().sum(-1)  # (B,)
        if compile and _compiled is None:
            _compiled = torch.compile(block_step, fullgraph=True, dynamic=False)
        self.block_step = _compiled if compile else block_step

    def step(self, token: Tensor) -> tuple[Tensor, Tensor]:
        if self.pos >= self.key_mask.shape[1]:
            raise RuntimeError(f"KV cache full: {self.key_mask.shape[1]} positions")
        # finished rows attend to their pad tokens too, as in the eager loop
        # (their outputs are dropped)
        self.key_mask[:, self.pos] = True
        at = torch.full_like(self.positions, self.pos)  # every row writes the same column
        logits, hidden = decode_step(self.model, token, self.positions, at, self.key_mask,
                                     self.cache.k, self.cache.v, self.block_step)
        self.pos += 1
        self.cache.pos = self.pos
        self.positions += 1
        return logits, hidden


def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, stop_ids: list[int],
             pad_id: int, *args, decode: str = "static", **kwargs) -> sampling.Generation:
    """sampling.generate with the steps after the prefill run by `decode`: "eager" (the reference),
    "static" (StaticDecoder, the matmuls through oneDNN's packed weights, nanorlhf/fast/packed.py:
    2x MKL's rate on AMD CPUs) or "compiled" (the same step through torch.compile, compiled once per
    batch shape, with MKL's matmuls: torch 2.13's dynamo refuses oneDNN's packed tensors). Logits
    agree with eager's to float rounding (tests/test_fast_decode.py)."""
    if decode not in DECODE_MODES:
        raise ValueError(f"decode={decode!r}: choose one of {', '.join(DECODE_MODES)}")
    decoder = None if decode == "eager" else (
        lambda m, cache, mask: StaticDecoder(m, cache, mask, compile=decode == "compiled"))
    with packed_linears(model) if decode == "static" else contextlib.nullcontext():
        return sampling.generate(model, prompts, max_new_tokens, stop_ids, pad_id, *args,
                                 decoder=decoder, **kwargs)
