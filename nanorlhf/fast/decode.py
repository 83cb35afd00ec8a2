"""Fast decoding on the CPU: one fixed-shape decode step, and its two users.

1. The static step (StaticDecoder, generate(decode="static" | "compiled")). The eager decode step
(model.forward with a KVCache) attends over a key range that grows by one every step, builds its
attention mask with torch.cat, and recomputes where a 4-D mask is needed. Here the step instead
always attends over the whole pre-allocated cache (B, kv_heads, max_len, d) with one boolean key
mask (B, max_len) that is switched on column by column, and writes the new key/value with scatter_
at columns held in a tensor (one per row: continuous batching's rows each have their own). Every
tensor keeps its shape from the first step to the last, which is what torch.compile needs to compile
the step once and run it as fused C++ kernels (gpt-fast's recipe: a static cache, a compiled step).
Masked keys add exact zeros to the softmax, so the logits equal the eager ones up to the order of
float sums (tests/test_fast_decode.py: 1e-5).

The step calls the model's own submodules (projections, norms, MLPs, lm_head), so LoRA adapters and
trained weights are what it sees; it reimplements only Attention.forward's cached path.

2. Continuous batching (generate_stream; generate_streamed is a sampler for
sampling.sample_responses): many prompts through a fixed pool of rows, refilled as rows finish.

generate() runs one batch until its longest row stops: a row that stops early keeps decoding pad
tokens, and the next batch waits. Here `batch_size` rows decode together, and when enough of them
have stopped the next prompts are prefilled into their slots while the others carry on (the
scheduling of Orca and vLLM, without paging). Each row owns its cache columns: its prompt sits at
columns 0..p-1 (no padding) and token t is written at column p + t, so rows of different ages decode
in one fixed-shape step (decode_step with one write column per row). When no prompts are
left, the pool shrinks to the rows still decoding.

Randomness is per sample, not per batch: sample i draws from its own generator seeded
seed·2²⁰ + i, one uniform per token (inverse-CDF sampling in float64), so its tokens do not
depend on the batch size, the schedule or the other prompts (up to float rounding of the batched
kernels). These are not the tokens generate() draws for the same seed: the two samplers consume
randomness differently.
"""

import contextlib
from collections import deque

import torch
from torch import Tensor

from nanorlhf import distributed
from nanorlhf.fast.packed import packed_linears
from nanorlhf.model import Attention, Block, KVCache, Transformer, autocast
from nanorlhf.sampling import (Generation, Ids, LogitsHook, cache_dtype, common_prefix, generate as
                               sampling_generate, prefix_cache, top_k_filter)

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
             pad_id: int, *args, decode: str = "static", **kwargs) -> Generation:
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
        return sampling_generate(model, prompts, max_new_tokens, stop_ids, pad_id, *args,
                                 decoder=decoder, **kwargs)


# --- continuous batching ---

def nucleus(scores: Tensor, top_k: int, top_p: float) -> tuple[Tensor, Tensor]:
    """scores (B, V) -> the tokens that top-k then top-p keep, most likely first: ids (B, m) and
    their probabilities (B, m) float64, renormalised over the top-k set, 0 past each row's nucleus.

    Same sets as generate's filters, found without sorting the vocabulary: take the m most likely
    tokens and grow m until they hold the nucleus. A token is kept when the mass of the tokens more
    likely than it is < p (so at an exact tie the set stops, as in top_p_filter)."""
    scores = top_k_filter(scores, top_k)  # ties at the k-th score stay, as in transformers
    finite = int(torch.isfinite(scores).sum(-1).max())
    # the normaliser in float64: at p = 0.999 the nucleus ends among tokens of mass ~1e-5, where a
    # float32 normaliser's error (~5e-7 of the mass) would move its edge. Shifted by the max, as
    # softmax is, so n tied tokens get exactly 1/n and the tie rule holds to the bit
    top = scores.max(-1, keepdim=True).values.double()  # (B, 1)
    z = (scores.double() - top).exp().sum(-1, keepdim=True)  # (B, 1)
    m = min(finite, 64)
    while True:
        values, ids = scores.topk(m, -1)  # (B, m), descending
        probs = (values.double() - top).exp() / z  # (B, m)
        before = probs.cumsum(-1) - probs  # mass of the more likely tokens
        # every row's nucleus lies inside the m
        if m == finite or bool((probs.sum(-1) >= top_p).all()):
            return ids, probs * (before < top_p)
        m = min(finite, 4 * m)


def inverse_cdf(probs: Tensor, uniforms: Tensor, block: int = 256) -> Tensor:
    """probs (B, V) >= 0 (any scale), uniforms (B,) in [0, 1) -> (B,) the index where the cumulative
    mass first exceeds u * total. A float64 cumsum of the whole vocabulary costs as much as a third
    of a decode step, so it is done in two levels: sums of blocks, then the cumsum inside the chosen
    block. Converting every probability to float64 costs as much again, so a block's sum adds
    float32 sums of 16 tokens in float64: each of those is off by < 15·2⁻²⁴ of its mass (the
    probabilities themselves carry 2⁻²⁴), and no error accumulates over the vocabulary. Tokens
    of zero mass are never chosen."""
    B, V = probs.shape
    padded = probs if V % block == 0 else torch.nn.functional.pad(probs, (0, -V % block))
    padded = padded.view(B, -1, block)
    chunk = 16 if block % 16 == 0 else 1
    sums = padded.view(B, -1, block // chunk, chunk).sum(-1)  # (B, blocks, block / chunk) float32
    block_cdf = sums.sum(-1, dtype=torch.float64).cumsum(-1)  # (B, blocks)
    target = uniforms.to(block_cdf) * block_cdf[:, -1]  # (B,)
    last_block = block_cdf.shape[1] - 1
    j = torch.searchsorted(block_cdf, target[:, None], right=True).clamp(max=last_block)  # (B, 1)
    # the chosen block's mass never exceeds its float64 sum by more than rounding; the clamp to its
    # last token of nonzero mass keeps that rounding from landing on a token that cannot be drawn
    inside = padded.gather(1, j[:, :, None].expand(B, 1, block)).squeeze(1)  # (B, block)
    before = torch.where(j > 0, block_cdf.gather(1, (j - 1).clamp(min=0)), 0.0)  # (B, 1)
    inside_cdf = inside.cumsum(-1, dtype=torch.float64)  # (B, block)
    k = torch.searchsorted(inside_cdf, target[:, None] - before, right=True)
    last_nonzero = (inside > 0).cumsum(-1).argmax(-1, keepdim=True)  # (B, 1)
    return (j * block + torch.minimum(k, last_nonzero)).squeeze(-1)


def sample_rows(logits: Tensor, temperature: float, top_k: int, top_p: float,
                uniforms: Tensor) -> Tensor:
    """logits (B, V), one uniform in [0, 1) per row (B,) float64 -> token ids (B,) by inverse CDF.
    temperature 0 = greedy. Filters in generate's order: temperature, top-k, top-p."""
    if temperature == 0:
        return logits.argmax(-1)
    scores = logits / temperature if temperature != 1 else logits  # a (B, V) pass saved at T = 1
    if top_k <= 0 and top_p >= 1.0:
        return inverse_cdf(scores.softmax(-1), uniforms)
    ids, probs = nucleus(scores, top_k, top_p)  # (B, m) each
    return ids.gather(-1, inverse_cdf(probs, uniforms, block=probs.shape[1])[:, None]).squeeze(-1)


class Pool:
    """The rows' shared cache: keys/values (layers, B, kv_heads, width, d), a key mask (B, width)
    and the next write column of every row. The last column is scratch: rows with nothing to decode
    write there."""

    def __init__(self, model: Transformer, rows: int, width: int, device, dtype):
        self.cache = KVCache(model.cfg, rows, width + 1, device, dtype)
        self.scratch = width
        self.key_mask = torch.zeros(rows, width + 1, dtype=torch.bool, device=device)
        # an empty row attends to the scratch column alone (no NaN)
        self.key_mask[:, self.scratch] = True
        self.column = torch.zeros(rows, dtype=torch.long, device=device)
        self.share(model, [])

    def share(self, model: Transformer, prefix: list[int]) -> None:
        """Compute the keys/values of `prefix` once: every prompt fill() gets from now on starts
        with it."""
        self.prefix, self.shared = list(prefix), prefix_cache(model, prefix)

    def fill(self, model: Transformer, slots: list[int], prompts: list[list[int]],
             pad_id: int) -> tuple[Tensor, Tensor]:
        """Prefill `prompts` into rows `slots` -> their next-token logits (n, V) fp32 and hidden
        (n, h). Only what is new is computed: the shared prefix comes from share()'s cache, and
        identical prompts (ReST's k samples of one prompt) are prefilled once and copied. The rest
        is right-padded, so each prompt's keys land at columns 0..p-1 as the row needs them."""
        dev, S = self.column.device, len(self.prefix)
        assert all(p[:S] == self.prefix for p in prompts), (
            "every prompt starts with the shared prefix")
        unique = {tuple(p): None for p in prompts}  # insertion-ordered set
        index = {p: i for i, p in enumerate(unique)}
        # (n,): each slot's unique prompt
        which = torch.tensor([index[tuple(p)] for p in prompts], device=dev)
        n, width = len(unique), max(map(len, unique))
        ids = torch.full((n, width - S), pad_id, dtype=torch.long, device=dev)
        mask = torch.zeros((n, width), dtype=torch.long, device=dev)
        mask[:, :S] = 1
        for i, p in enumerate(unique):
            ids[i, :len(p) - S], mask[i, S:len(p)] = torch.tensor(p[S:], device=dev), 1
        lengths = mask.sum(-1)  # (n,)
        last = torch.zeros_like(ids, dtype=torch.bool)
        last[torch.arange(n), lengths - S - 1] = True  # (n, width - S): each prompt's last token
        fresh = self.shared.repeat(n, width)
        # (n, V), (n, width - S, h)
        logits, hidden = model(ids, mask, fresh, return_hidden=True, logits_at=last)
        rows = torch.tensor(slots, device=dev)
        self.cache.k[:, rows, :, :width] = fresh.k[:, which]
        self.cache.v[:, rows, :, :width] = fresh.v[:, which]
        self.key_mask[rows] = False
        self.key_mask[rows, :width] = mask.bool()[which]
        self.column[rows] = lengths[which]
        return logits.float()[which], hidden[last][which]

    def step(self, model: Transformer, token: Tensor, live: Tensor) -> tuple[Tensor, Tensor]:
        """Feed token (B,) to the rows where live (B,) bool; the others write the scratch column.
        -> logits (B, V) fp32 and hidden (B, h); only live rows' are meaningful."""
        at = torch.where(live, self.column, self.scratch)  # (B,)
        self.key_mask[live, self.column[live]] = True
        logits, hidden = decode_step(model, token, self.column, at, self.key_mask,
                                     self.cache.k, self.cache.v)
        self.column += live.long()
        return logits, hidden

    def keep(self, rows: Tensor) -> None:
        """Shrink the pool to `rows` (when no prompts are left to refill)."""
        self.cache.k, self.cache.v = self.cache.k[:, rows], self.cache.v[:, rows]
        self.key_mask, self.column = self.key_mask[rows], self.column[rows]


@torch.no_grad()
def generate_stream(
    model: Transformer,
    prompts: list[list[int]],
    max_new_tokens: int,
    stop_ids: list[int],
    pad_id: int,
    batch_size: int = 64,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    logits_hook: LogitsHook | None = None,
    tokenizer=None,
    refill_at: int | None = None,
    progress=None,
) -> Generation:
    """Up to `max_new_tokens` after each prompt, a row ending at its first stop id (kept), as
    generate() does, through `batch_size` rows with continuous batching. Prompts are refilled once
    `refill_at` rows (default batch_size // 8, at least 1) are free: each refill is a prefill
    forward, which reads every weight once, so it pays to refill several rows at a time. The hook
    gets step as a (B,) tensor, each row's own step. progress(n) is told after every step how many
    of the len(prompts) x max_new_tokens token slots it used up (a stop frees the rest of its
    row's): a bar with that total moves steadily even when every row ends at the same step."""
    device = next(model.parameters()).device
    dtype = cache_dtype(model, device)
    rows = max(1, min(batch_size, len(prompts)))
    refill_at = max(1, rows // 8) if refill_at is None else refill_at
    pool = Pool(model, rows, max(map(len, prompts), default=0) + max_new_tokens, device, dtype)
    generators = [torch.Generator().manual_seed(seed * 2**20 + i) for i in range(len(prompts))]
    stops = torch.tensor(stop_ids, dtype=torch.long, device=device)
    queue, out = deque(range(len(prompts))), [[] for _ in prompts]
    item = [-1] * rows  # the prompt each row is decoding (-1: free)
    logits = torch.zeros(rows, model.cfg.vocab_size, device=device)
    hidden = torch.zeros(rows, model.cfg.hidden_size, device=device, dtype=dtype)
    token = torch.full((rows,), pad_id, dtype=torch.long, device=device)
    live = torch.zeros(rows, dtype=torch.bool, device=device)  # rows holding a token to feed
    with autocast(device), packed_linears(model):  # oneDNN's packed matmuls: 2x MKL's on AMD CPUs
        # e.g. the chat template's system prompt: its keys/values once, not per prompt
        if len(prompts) > 1:
            pool.share(model, prompts[0][:common_prefix(prompts)])
        while queue or any(i >= 0 for i in item):
            if bool(live.any()):
                # free rows' outputs are scratch: they are sampled and dropped, or refilled below
                logits, step_hidden = pool.step(model, token, live)
                hidden = step_hidden.to(hidden.dtype)
            free = [r for r, i in enumerate(item) if i < 0]
            if queue and (len(free) >= refill_at or not bool(live.any())):
                slots = free[:len(queue)]
                for r in slots:
                    item[r] = queue.popleft()
                new_prompts = [prompts[item[r]] for r in slots]
                new_logits, new_hidden = pool.fill(model, slots, new_prompts, pad_id)
                logits[slots], hidden[slots] = new_logits, new_hidden.to(hidden.dtype)
            elif not queue and len(free) >= refill_at:  # nothing left to refill: drop the free rows
                busy = [r for r, i in enumerate(item) if i >= 0]
                keep = torch.tensor(busy, device=device)
                pool.keep(keep)
                item = [item[r] for r in busy]
                logits, hidden, token = logits[keep], hidden[keep], token[keep]
            scores = logits
            if logits_hook is not None:
                steps = torch.tensor([len(out[i]) if i >= 0 else 0 for i in item], device=device)
                scores = logits_hook(logits, hidden, steps)
            draws = [float(torch.rand((), generator=generators[i], dtype=torch.float64))
                     if i >= 0 else 0.0 for i in item]
            uniforms = torch.tensor(draws, dtype=torch.float64)
            token = sample_rows(scores, temperature, top_k, top_p, uniforms.to(device))
            finished, used = torch.isin(token, stops), 0
            for r, i in enumerate(item):
                if i < 0:
                    continue
                out[i].append(int(token[r]))
                used += 1
                if bool(finished[r]) or len(out[i]) == max_new_tokens:
                    item[r] = -1
                    used += max_new_tokens - len(out[i])
            if progress is not None:
                progress(used)
            # every row still decoding fed a token
            live = torch.tensor([i >= 0 for i in item], device=device)
    texts = [tokenizer.decode(r) for r in out] if tokenizer is not None else None
    return Generation(out, texts)


def generate_streamed(model, prompts: Ids, max_new_tokens: int, stop_ids: list[int], pad_id: int,
                      batch_size: int, temperature: float, seed: int,
                      logits_hook: LogitsHook | None = None, desc: str = "sampling") -> Ids:
    """generate_stream() with a token progress bar: sampling.generate_batched's signature, so
    sampling.sample_responses(..., sampler=generate_streamed) samples through
    continuous batching."""
    bar = distributed.bar(total=len(prompts) * max_new_tokens, desc=desc, unit="tok", leave=False)
    ids = generate_stream(model, prompts, max_new_tokens, stop_ids, pad_id, batch_size, temperature,
                          seed=seed, logits_hook=logits_hook, progress=bar.update).ids
    bar.close()
    return ids
