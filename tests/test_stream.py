"""Continuous batching (nanorlhf/stream.py) against independent references: generate()'s greedy
tokens, full forwards without any cache, transformers' top-p sets, and
a plain float64 inverse CDF."""

import pytest
import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from nanorlhf.checkpoint import load_model
from nanorlhf.sampling import generate, sample_responses, top_k_filter
from nanorlhf.fast.decode import (Pool, generate_stream, generate_streamed, inverse_cdf, nucleus,
                                  sample_rows)
from nanorlhf.tokenizer import Tokenizer

from conftest import TINY_CONFIGS

# 7 prompts of 1 to 6 tokens, more than the pool's rows, so rows are refilled while others decode
PROMPTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16], [17], [18, 19, 20], [21, 22],
           [23, 24, 25, 26, 27]]
STOPS = [3, 17, 40, 99]


def reference(model, prompt, n, stop_ids, temperature, top_k, top_p, seed, hook=None) -> list[int]:
    """One prompt alone, every step a full forward over prompt + tokens so far (no cache, no
    padding), its own generator seeded as generate_stream documents
    (seed * 2^20 + the prompt's index)."""
    gen, ids, out = torch.Generator().manual_seed(seed), list(prompt), []
    for step in range(n):
        logits, hidden = model(torch.tensor([ids]), return_hidden=True)
        logits, hidden = logits[:, -1].float(), hidden[:, -1]
        if hook is not None:
            logits = hook(logits, hidden, torch.tensor([step]))
        u = torch.rand((), generator=gen, dtype=torch.float64).reshape(1)
        token = int(sample_rows(logits, temperature, top_k, top_p, u))
        ids.append(token)
        out.append(token)
        if token in stop_ids:
            break
    return out


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
@pytest.mark.parametrize("rows,refill_at", [(3, 1), (4, 2), (7, 1)])
def test_greedy_equals_generate(tiny_dirs, name, rows, refill_at):
    # generate() (eager, left-padded, one batch) is the reference decode; here rows
    # own their columns
    model = load_model(tiny_dirs[name]).eval()
    free = generate(model, PROMPTS, 14, [], pad_id=0, temperature=0).ids
    # tokens greedy decoding reaches: rows stop at different steps
    stops = [free[0][2], free[2][6], free[4][9]]
    want = generate(model, PROMPTS, 14, stops, pad_id=0, temperature=0).ids
    assert len({len(r) for r in want}) > 1, "rows should stop at different lengths"
    got = generate_stream(model, PROMPTS, 14, stops, 0, rows, temperature=0,
                          refill_at=refill_at).ids
    assert got == want


@pytest.mark.parametrize("kw", [dict(temperature=1.3), dict(temperature=0.9, top_k=20, top_p=0.8),
                                dict(temperature=1.0, top_p=0.5)])
def test_sampling_equals_each_prompt_alone(tiny_dirs, kw):
    # float64: the cache-free reference and the pooled decode round differently only at ~1e-16, far
    # below what could move a sampled token, so the tokens must be identical
    model = load_model(tiny_dirs["llama-gqa-tied"]).double().eval()
    want = [reference(model, p, 16, STOPS, kw["temperature"], kw.get("top_k", 0),
                      kw.get("top_p", 1.0), 5 * 2**20 + i) for i, p in enumerate(PROMPTS)]
    # tokens do not depend on the pool or the schedule
    for rows, refill_at in ((1, 1), (3, 2), (7, 1)):
        got = generate_stream(model, PROMPTS, 16, STOPS, 0, rows, seed=5, refill_at=refill_at,
                              **kw).ids
        assert got == want, (rows, refill_at)


# every prompt opens with the same 6 tokens (a chat template's system prompt), some are repeated
# (ReST's k samples per prompt): the opening is computed once, a repeated prompt once per fill
OPENING = [30, 31, 32, 33, 34, 35]
SHARED = [OPENING + p for p in (PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[2],
                                PROMPTS[2], PROMPTS[3])]


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_shared_prefix_and_repeats_greedy_equal_generate(tiny_dirs, name):
    model = load_model(tiny_dirs[name]).eval()
    want = generate(model, SHARED, 10, [], pad_id=0, temperature=0).ids
    for rows, refill_at in ((3, 1), (7, 1)):
        assert generate_stream(model, SHARED, 10, [], 0, rows, temperature=0,
                               refill_at=refill_at).ids == want


def test_shared_prefix_and_repeats_sample_as_each_prompt_alone(tiny_dirs):
    model = load_model(tiny_dirs["llama3-rope-mqa"]).double().eval()
    want = [reference(model, p, 12, STOPS, 1.2, 0, 1.0, 4 * 2**20 + i)
            for i, p in enumerate(SHARED)]
    assert len({tuple(w) for w in want[3:6]}) > 1, (
        "repeats of one prompt must get their own samples")
    for rows in (2, 7):
        assert generate_stream(model, SHARED, 12, STOPS, 0, rows, 1.2, seed=4,
                               refill_at=1).ids == want


def test_prefill_computes_the_opening_once_and_repeats_once(tiny_dirs):
    model = load_model(tiny_dirs["llama-gqa-tied"]).eval()
    fed = []  # tokens each multi-token forward (a prefill) computes
    model.register_forward_pre_hook(
        lambda mod, args: fed.append(args[0].numel()) if args[0].shape[1] > 1 else None)
    generate_stream(model, SHARED, 4, [], 0, batch_size=7, temperature=0)
    # one forward of the opening, one fill of the 4 distinct prompts' rest, right-padded
    # to the longest (6)
    assert fed == [len(OPENING), 4 * len(PROMPTS[2])]


def test_hook_sees_each_rows_state(tiny_dirs):
    # a hook that reads the hidden state (as ILQL's heads do) and rewrites the logits, and
    # the step count
    model = load_model(tiny_dirs["qwen2-bias"]).double().eval()
    head = torch.randn(model.cfg.hidden_size, model.cfg.vocab_size,
                       generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    hook = lambda logits, hidden, step: logits + 3 * (hidden @ head).float() - 0.5 * step[:, None]
    want = [reference(model, p, 12, STOPS, 1.0, 0, 1.0, 2 * 2**20 + i, hook)
            for i, p in enumerate(PROMPTS)]
    assert generate_stream(model, PROMPTS, 12, STOPS, 0, 3, seed=2, logits_hook=hook,
                           refill_at=1).ids == want


def test_pool_logits_equal_full_forward(tiny_dirs):
    # fp32: two prompts filled into rows 2 and 0 of a 3-row pool, then rows decode unevenly
    # (row 0 waits a step). Each step's logits must equal a cache-free forward over the row's
    # tokens. Sums of <= 64 terms of size ~1 differ by ~n * 2^-24 between the two orders: 1e-5
    # bounds it; a wrong column, position or mask moves logits by O(1e-2).
    model = load_model(tiny_dirs["llama3-rope-mqa"]).eval()
    pool = Pool(model, 3, 12, torch.device("cpu"), torch.float32)
    seqs = {2: [5, 6, 7, 8, 9], 0: [11, 12]}
    with torch.no_grad():
        logits, _ = pool.fill(model, [2, 0], [seqs[2], seqs[0]], pad_id=0)
        for row, lg in zip((2, 0), logits):
            torch.testing.assert_close(lg, model(torch.tensor([seqs[row]]))[0, -1],
                                       atol=1e-5, rtol=1e-5)
        for step, feed in enumerate(([30, 0, 31], [32, 0, 33], [34, 0, 35])):
            live = torch.tensor([step > 0, False, True])
            out, _ = pool.step(model, torch.tensor(feed), live)
            for row in (0, 2):
                if live[row]:
                    seqs[row].append(feed[row])
                    want = model(torch.tensor([seqs[row]]))[0, -1]
                    torch.testing.assert_close(out[row], want, atol=1e-5, rtol=1e-5)
    assert pool.column.tolist() == [4, 0, 8]


def test_inverse_cdf_equals_a_full_float64_cdf():
    gen = torch.Generator().manual_seed(0)
    for V in (1, 5, 255, 256, 257, 1000, 49152):
        probs = torch.rand(32, V, generator=gen) ** 8
        probs[:, ::3] = 0  # impossible tokens, also at block edges
        probs[:, -1] = 0
        probs[:, 0] += 1e-3  # every row has mass
        u = torch.rand(32, generator=gen, dtype=torch.float64)
        cdf = probs.double().cumsum(-1)
        want = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(-1)
        got = inverse_cdf(probs, u)
        # block sums add float32 sums of 16 tokens, each off by < 15·2⁻²⁴ of its mass: the
        # target u·total may move by that much of the mass before it, so a draw may differ from the
        # float64 CDF's only where the target lies that close to a token's boundary, and then
        # by one token
        tol = 15 * 2**-24 * cdf[:, -1] + 1e-12  # (32,)
        target = u * cdf[:, -1]
        lo = torch.where(got > 0, cdf.gather(1, (got - 1).clamp(min=0)[:, None]).squeeze(1), 0.0)
        hi = cdf.gather(1, got[:, None]).squeeze(1)
        assert ((lo - tol <= target) & (target < hi + tol)).all(), V
        # (32,): a boundary within the bound
        near = ((cdf - target[:, None]).abs() < tol[:, None]).any(-1)
        assert torch.equal(got[~near], want[~near]) and (got - want).abs().max() <= 1, V
        assert (probs.gather(1, got[:, None]) > 0).all()
    # u close to 1 must still land on a possible token, never on the zeros that end the vocabulary
    probs = torch.tensor([[0.25, 0.5, 0.25, 0.0, 0.0]])
    assert inverse_cdf(probs, torch.tensor([1 - 2**-53], dtype=torch.float64), block=2).item() == 2


def test_nucleus_keeps_transformers_sets():
    gen = torch.Generator().manual_seed(0)
    smooth = torch.randn(64, 300, generator=gen) * 2
    # nucleus larger than the first guess of 64 tokens
    flat = torch.randn(8, 5000, generator=gen) * 0.1
    ties = torch.randint(-3, 2, (64, 12), generator=gen).float()
    for scores in (smooth, flat, ties):
        for p in (0.05, 0.5, 0.9, 0.999, 1.0):
            for k in (0, 1, 10):
                top_k_scores = TopKLogitsWarper(k)(None, scores.clone()) if k else scores.clone()
                want = TopPLogitsWarper(p)(None, top_k_scores)
                ids, probs = nucleus(scores, k, p)
                kept = torch.zeros_like(scores, dtype=torch.bool).scatter(1, ids, probs > 0)
                # which of equal tokens is kept depends on sort order: compare counts
                if scores is ties:
                    assert torch.equal(kept.sum(-1), torch.isfinite(want).sum(-1)), (p, k)
                else:
                    assert torch.equal(kept, torch.isfinite(want)), (p, k)
                # the kept probabilities are the float64 softmax over the top-k set
                base = top_k_filter(scores, k).double().softmax(-1)
                torch.testing.assert_close(probs[probs > 0], base.gather(1, ids)[probs > 0],
                                           rtol=1e-12, atol=0)


def test_sampler_frequencies_follow_the_nucleus():
    # 4000 draws from one row: kept tokens at their renormalised probabilities
    # (binomial SE <= 0.008, a 5-SE bound), the others never
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    draws = torch.tensor([
        int(sample_rows(logits, 1.0, 0, 0.9, torch.rand(1, generator=gen, dtype=torch.float64)))
        for _ in range(4000)])
    freq = torch.bincount(draws, minlength=4).double() / 4000
    assert freq[3] == 0  # 0.5 + 0.3 < 0.9, so the .15 token is kept and the .05 one is not
    torch.testing.assert_close(freq[:3], torch.tensor([0.5, 0.3, 0.15], dtype=torch.float64) / 0.95,
                               atol=0.04, rtol=0)


def test_sample_responses_stream_is_conversation_major(tiny_chat_model):
    tok, model = Tokenizer(tiny_chat_model), load_model(tiny_chat_model).eval()
    chats = [[{"role": "user", "content": t}] for t in ("hello there", "a cat", "the sea is big")]
    prompts, responses, texts = sample_responses(model, tok, chats, 2, 1.0, 3, 8, 4,
                                                 sampler=generate_streamed)
    assert prompts == [tok.chat_prompt(c) for c in chats for _ in range(2)]
    assert responses == generate_stream(model, prompts, 8, tok.stop_ids, tok.pad_id, 4, 1.0,
                                        seed=3).ids
    assert texts == [tok.decode(r) for r in responses]


def test_progress_counts_every_token_slot_once(tiny_dirs):
    model = load_model(tiny_dirs["llama-gqa-tied"]).eval()
    free = generate(model, PROMPTS, 10, [], pad_id=0, temperature=0).ids
    told = []
    out = generate_stream(model, PROMPTS, 10, [free[1][3]], 0, 3, temperature=0, refill_at=1,
                          progress=told.append)
    assert sum(told) == len(PROMPTS) * 10 and len(told) >= 10
    # some row stopped early, and its unused slots were counted
    assert any(len(r) < 10 for r in out.ids)
