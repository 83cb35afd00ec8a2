"""Batched sampling with a KV cache: left-padded prompts, several stop ids, a logits hook.

One prefill pass over the padded prompts fills the cache; then one token per step for every row.
Rows that have stopped keep receiving pad tokens (masked out) until all rows stop, which keeps the
batch rectangular and the code short.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from nanorlhf.model import KVCache, Transformer

# (logits (B, V) fp32, last hidden state (B, hidden), step) -> new logits. ILQL adds beta*(Q - V) here.
LogitsHook = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


@dataclass
class Generation:
    ids: list[list[int]]  # new tokens per row, up to and including the stop token
    logprobs: list[list[float]]  # log p(token) under the model's (hooked) distribution at temperature 1
    texts: list[str] | None = None  # decoded, when a tokenizer was given


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> ids (B, P) and attention mask (B, P), prompts aligned to the right edge."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[row, width - len(p):] = 1
    return ids, mask


def top_k_filter(scores: torch.Tensor, k: int) -> torch.Tensor:
    """scores (..., V) with everything below the k-th largest of each row set to -inf (k = 0: unchanged)."""
    if k <= 0:
        return scores
    kth = torch.topk(scores, min(k, scores.shape[-1])).values[..., -1:]  # (..., 1)
    return scores.masked_fill(scores < kth, float("-inf"))


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,). temperature 0 = greedy."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    logits = top_k_filter(logits, top_k)
    if top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass
        drop = probs.cumsum(-1) - probs > top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: Transformer,
    prompts: list[list[int]],
    max_new_tokens: int,
    stop_ids: list[int],
    pad_id: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    logits_hook: LogitsHook | None = None,
    tokenizer=None,
) -> Generation:
    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    B, P = ids.shape
    dtype = next(model.parameters()).dtype
    if device.type == "cuda":
        dtype = torch.bfloat16  # generation runs under bf16 autocast on GPU
    cache = KVCache(model.cfg, B, P + max_new_tokens, device, dtype)
    generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
    stops = torch.tensor(stop_ids, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    out_tokens, out_logprobs = [], []
    inputs = ids
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for step in range(max_new_tokens):
            logits, hidden = model(inputs, mask, cache, return_hidden=True, last_only=True)
            logits = logits[:, -1].float()  # (B, V)
            if logits_hook is not None:
                logits = logits_hook(logits, hidden[:, -1], step)
            token = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
            token = torch.where(done, pad_id, token)
            out_tokens.append(token)
            out_logprobs.append(logits.log_softmax(-1).gather(-1, token[:, None]).squeeze(-1))
            done |= torch.isin(token, stops)
            if bool(done.all()):
                break
            inputs = token[:, None]
            # finished rows attend to their pad tokens too: harmless (their outputs are dropped) and it
            # keeps an unpadded batch mask-free, so SDPA takes its fast path
            mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
    tokens = torch.stack(out_tokens, 1).tolist()  # (B, steps)
    logprobs = torch.stack(out_logprobs, 1).tolist()
    stop_set = set(stop_ids)
    result_ids, result_lp = [], []
    for row_tokens, row_lp in zip(tokens, logprobs):
        n = next((i + 1 for i, t in enumerate(row_tokens) if t in stop_set), len(row_tokens))
        result_ids.append(row_tokens[:n])
        result_lp.append(row_lp[:n])
    texts = [tokenizer.decode(r) for r in result_ids] if tokenizer is not None else None
    return Generation(result_ids, result_lp, texts)
