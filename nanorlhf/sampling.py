"""Batched sampling with a KV cache: left-padded prompts, several stop ids, a logits hook.

One prefill pass over the padded prompts fills the cache; then one token per step for every row.
Rows that have stopped keep receiving pad tokens (masked out) until all rows stop, which keeps the
batch rectangular and the code short.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from nanorlhf import distributed
from nanorlhf.data import fit_prompts
from nanorlhf.errors import NonFiniteLogits
from nanorlhf.model import KVCache, Transformer, autocast

# (logits (B, V) fp32, last hidden state (B, hidden), step) -> new logits (ILQL adds β(Q - V) here)
LogitsHook = Callable[[Tensor, Tensor, int], Tensor]
# (model, cache after the prefill, prompts' mask (B, P)) -> an object whose step(token (B,)) returns
# the next logits (B, V) fp32 and hidden state (B, hidden): a faster decode (fast/decode.py)
Decoder = Callable[[Transformer, KVCache, Tensor], object]


@dataclass
class Generation:
    ids: list[list[int]]  # new tokens per row, up to and including the stop token
    texts: list[str] | None = None  # decoded, when a tokenizer was given


def common_prefix(seqs: list[list[int]]) -> int:
    """Length of the longest common prefix of the sequences, at most the shortest one's length - 1:
    every sequence keeps >= 1 token of its own, whose logits predict what follows it. A prefix every
    prompt shares (a chat template's system prompt) is computed once into a KV cache."""
    n = min(len(s) for s in seqs) - 1
    return next((i for i in range(n) if any(s[i] != seqs[0][i] for s in seqs)), n)


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """-> ids (B, P) and attention mask (B, P), prompts aligned to the right edge."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[row, width - len(p):] = 1
    return ids, mask


def cache_dtype(model: Transformer, device: torch.device) -> torch.dtype:
    """The KV cache's dtype: on GPU the forwards run under bf16 autocast, so the keys/values they
    write are bf16; elsewhere the weights' dtype."""
    return torch.bfloat16 if device.type == "cuda" else next(model.parameters()).dtype


def prefix_cache(model: Transformer, prefix: list[int]) -> KVCache:
    """The keys/values of `prefix`, which every row of a batch starts with, from one forward: a
    one-row cache to repeat() into the batch's (judge, stream). Call it under autocast."""
    device = next(model.parameters()).device
    cache = KVCache(model.cfg, 1, len(prefix), device, cache_dtype(model, device))
    if prefix:
        model(torch.tensor([prefix], device=device), cache=cache, last_only=True)
    return cache


def prefill(model: Transformer, ids: Tensor, mask: Tensor, extra_len: int
            ) -> tuple[Tensor, Tensor, KVCache]:
    """Left-padded prompts ids (B, P), mask (B, P) -> next-token logits (B, V) fp32 and hidden state
    (B, hidden) at the last prompt position, and a KV cache of the prompts with room for extra_len.
    Left padding puts every prompt's last token in the same column, so one forward serves the whole
    batch and the next token of every row is written at the same cache position P."""
    B, P = ids.shape
    cache = KVCache(model.cfg, B, P + extra_len, ids.device, cache_dtype(model, ids.device))
    with autocast(ids.device):  # logits (B, 1, V), hidden (B, P, h)
        logits, hidden = model(ids, mask, cache, return_hidden=True, last_only=True)
    return logits[:, -1].float(), hidden[:, -1], cache


def top_k_filter(scores: Tensor, k: int) -> Tensor:
    """scores (..., V) with all below each row's k-th largest set to -inf (k = 0: unchanged)."""
    if k <= 0:
        return scores
    kth = torch.topk(scores, min(k, scores.shape[-1])).values[..., -1:]  # (..., 1)
    return scores.masked_fill(scores < kth, float("-inf"))


def top_p_filter(scores: Tensor, p: float) -> Tensor:
    """scores (..., V) with the tokens outside the nucleus set to -inf (p = 1: unchanged). The
    nucleus (Holtzman et al. 2019) is the smallest set of most likely tokens whose mass reaches
    p. Computed as transformers' TopPLogitsWarper does, so both drop the same tokens to the bit:
    sort ascending and drop every token whose cumulative mass is <= 1 - p. At an exact tie the set
    stops: probabilities (.5, .25, .125, .125) with p = .75 keep two tokens, not three. The most
    likely token always stays."""
    if p >= 1.0:
        return scores
    ascending, order = scores.sort(-1)  # (..., V), least likely first
    drop = ascending.softmax(-1).cumsum(-1) <= 1 - p
    drop[..., -1] = False
    return scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))  # in vocabulary order


def sample_next(logits: Tensor, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator | None) -> Tensor:
    """logits (B, V) -> next token ids (B,). temperature 0 = greedy. Filters in transformers' order:
    temperature, then top-k, then top-p (the nucleus of what top-k kept)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = top_p_filter(top_k_filter(logits / temperature, top_k), top_p).softmax(-1)
    if not bool(probs.isfinite().all()):  # NaN or +inf logits: one line, not torch's traceback
        raise NonFiniteLogits("the policy's logits overflow (next-token probabilities are nan)")
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, stop_ids: list[int],
             pad_id: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             seed: int | None = None, logits_hook: LogitsHook | None = None, tokenizer=None,
             decoder: Decoder | None = None) -> Generation:
    """Sample up to `max_new_tokens` after each prompt; a row ends at its first stop id (kept). The
    same seed gives the same tokens: all randomness comes from one generator. decoder: None runs the
    steps after the prefill through model.forward with the growing KV cache (the reference);
    nanorlhf/fast/decode.py passes its fixed-shape step here."""
    device = next(model.parameters()).device
    ids, mask = (t.to(device) for t in left_pad(prompts, pad_id))  # (B, P) each
    B = ids.shape[0]
    generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
    stops = torch.tensor(stop_ids, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    out_tokens = []
    # the hook's heads run under the same bf16 autocast as the model on GPU
    with autocast(device):
        logits, hidden, cache = prefill(model, ids, mask, max_new_tokens)  # (B, V), (B, hidden)
        fast = decoder(model, cache, mask) if decoder is not None else None
        for step in range(max_new_tokens):
            if logits_hook is not None:
                logits = logits_hook(logits, hidden, step)
            token = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
            # a finished row still draws (every row's draws stay aligned with the generator): pad
            token = torch.where(done, pad_id, token)
            out_tokens.append(token)
            done |= torch.isin(token, stops)
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            if fast is not None:
                logits, hidden = fast.step(token)
                continue
            # finished rows attend to their pad tokens too: harmless (their outputs are dropped),
            # and it keeps an unpadded batch mask-free, so SDPA takes its fast path
            mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)  # (B, P + step + 1)
            logits, hidden = model(token[:, None], mask, cache, return_hidden=True, last_only=True)
            logits, hidden = logits[:, -1].float(), hidden[:, -1]  # (B, V), (B, h)
    tokens = torch.stack(out_tokens, 1).tolist()  # (B, steps)
    stop_set = set(stop_ids)
    # cut each row after its first stop id; a row that never stopped keeps all its tokens
    result = [row[:next((i + 1 for i, t in enumerate(row) if t in stop_set), len(row))]
              for row in tokens]
    texts = [tokenizer.decode(r) for r in result] if tokenizer is not None else None
    return Generation(result, texts)


# --- sampling many conversations, as the RL scripts and the evaluations do ---

SAMPLERS = ("batch", "stream")
SAMPLER_HELP = ("batch: generate() batch by batch, one generator per batch (the published results) "
                "| stream: continuous batching, one generator per sample (faster; other samples)")
Ids = list[list[int]]  # token ids, one list per prompt or response
# (model, prompts, max_new_tokens, stop_ids, pad_id, batch_size, temperature, seed, hook, desc)
Sampler = Callable[..., Ids]


def generate_batched(model, prompts: Ids, max_new_tokens: int, stop_ids: list[int], pad_id: int,
                     batch_size: int, temperature: float, seed: int,
                     logits_hook: LogitsHook | None = None, desc: str = "sampling") -> Ids:
    """generate() over `prompts` in batches of batch_size; the batch at `start` has seed + start."""
    responses = []
    starts = range(0, len(prompts), batch_size)
    for start in distributed.bar(starts, desc=desc, unit="batch", leave=False):
        out = generate(model, prompts[start:start + batch_size], max_new_tokens, stop_ids, pad_id,
                       temperature=temperature, seed=seed + start, logits_hook=logits_hook)
        responses += out.ids
    return responses


def sample_responses(model, tok, conversations: list[list[dict]], n: int, temperature: float,
                     seed: int, max_new_tokens: int, batch_size: int,
                     logits_hook: LogitsHook | None = None, desc: str = "sampling",
                     sampler: Sampler = generate_batched) -> tuple[Ids, Ids, list[str]]:
    """n samples for every conversation -> (prompt ids, response ids, response texts),
    conversation-major. `sampler`: generate_batched, or fast/decode.py's continuous batching."""
    prompts = [tok.chat_prompt(messages) for messages in conversations for _ in range(n)]
    prompts = fit_prompts(prompts, model.cfg.max_position_embeddings, max_new_tokens)  # cut if long
    responses = sampler(model, prompts, max_new_tokens, tok.stop_ids, tok.pad_id, batch_size,
                        temperature, seed, logits_hook, desc)
    return prompts, responses, [tok.decode(r) for r in responses]
