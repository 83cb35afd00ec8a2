"""Sampling: seeds, filters (against transformers), stop tokens, the logits hook, cached
decoding."""

import pytest
import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from nanorlhf.checkpoint import load_model
from nanorlhf.sampling import generate, left_pad, sample_next, top_k_filter, top_p_filter

PROMPTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16]]


def test_seeded_sampling_is_reproducible(tiny_dirs):
    model = load_model(tiny_dirs["llama-gqa-tied"])
    a = generate(model, PROMPTS, 16, stop_ids=[], pad_id=0, temperature=1.0, seed=7)
    b = generate(model, PROMPTS, 16, stop_ids=[], pad_id=0, temperature=1.0, seed=7)
    c = generate(model, PROMPTS, 16, stop_ids=[], pad_id=0, temperature=1.0, seed=8)
    assert a.ids == b.ids and a.ids != c.ids


def test_top_k_one_is_greedy(tiny_dirs):
    model = load_model(tiny_dirs["qwen2-bias"])
    greedy = generate(model, PROMPTS, 12, stop_ids=[], pad_id=0, temperature=0)
    top1 = generate(model, PROMPTS, 12, stop_ids=[], pad_id=0, temperature=1.3, top_k=1, seed=0)
    assert greedy.ids == top1.ids


def test_top_p_keeps_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    seen = {sample_next(logits, 1.0, 0, 0.7, torch.Generator().manual_seed(s)).item()
            for s in range(200)}
    assert seen == {0, 1}  # 0.5 < 0.7 so token 1 is needed; 0.5 + 0.3 >= 0.7 so token 2 is not


def kept(scores: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(scores).sum(-1)


@pytest.mark.parametrize("n,p,want", [(4, 0.5, 2), (8, 0.75, 6), (8, 0.125, 1), (2, 0.5, 1)])
def test_top_p_stops_at_an_exact_tie(n, p, want):
    # n equal logits: every probability is exactly 1/n (exp(0) = 1, a power-of-two divisor), so the
    # cumulative mass hits p exactly after p*n tokens, and those are enough: the nucleus reaches p.
    # With a '>' test on the mass ranked above, one more token would be kept.
    # n equal logits, then 3 impossible tokens
    logits = torch.cat([torch.zeros(1, n), torch.full((1, 3), float("-inf"))], 1)
    assert kept(top_p_filter(logits, p)).item() == want


def test_top_p_equals_transformers():
    issue = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    # .5 + .3 reaches .8: the .15 token is not needed
    assert kept(top_p_filter(issue, 0.8)).item() == 2
    powers = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.125]]))
    gen = torch.Generator().manual_seed(0)
    ties = torch.randint(-3, 2, (256, 12), generator=gen).float()  # few distinct values: many ties
    smooth = torch.randn(256, 50, generator=gen) * 2
    for scores in (issue, powers, ties, smooth, torch.zeros(4, 16)):
        for p in (0.05, 0.25, 0.5, 0.75, 0.8, 0.9, 0.95, 0.999):
            want = TopPLogitsWarper(p)(None, scores.clone())
            assert torch.equal(top_p_filter(scores, p), want), p
            assert (kept(want) >= 1).all()
            for k in (1, 3, 10):  # generate() applies top-k, then top-p, in transformers' order
                want = TopPLogitsWarper(p)(None, TopKLogitsWarper(k)(None, scores.clone()))
                assert torch.equal(top_p_filter(top_k_filter(scores, k), p), want), (p, k)
    assert top_p_filter(smooth, 1.0) is smooth


def test_cached_decoding_logits_are_those_of_a_full_forward(tiny_dirs):
    # left-padded prefill, then one cached token per step: every step's logits (seen by the hook)
    # must equal a plain forward over prompt + tokens so far, for rows of every padding width
    model = load_model(tiny_dirs["llama3-rope-mqa"]).eval()
    seen = []

    def record(logits, hidden, step):
        seen.append(logits.log_softmax(-1))
        return logits

    out = generate(model, PROMPTS, 10, stop_ids=[], pad_id=0, temperature=1.0, seed=3,
                   logits_hook=record)
    for row, (prompt, new) in enumerate(zip(PROMPTS, out.ids)):
        with torch.no_grad():
            # position t predicts t+1
            logp = model(torch.tensor([prompt + new]))[0, :-1].log_softmax(-1)
        got = torch.stack([s[row] for s in seen])  # (steps, V)
        torch.testing.assert_close(got, logp[len(prompt) - 1:], atol=1e-4, rtol=1e-4)


def test_stops_on_any_stop_id_and_hook_sees_hidden(tiny_dirs):
    model = load_model(tiny_dirs["llama-gqa-tied"])
    calls = []

    def hook(logits, hidden, step):
        calls.append((logits.shape, hidden.shape, step))
        forced = torch.full_like(logits, -1e9)
        forced[:, 40 + step] = 0.0  # force tokens 40, 41, 42, ...; 43 and 44 are stop ids
        return forced

    out = generate(model, PROMPTS, 20, stop_ids=[44, 43], pad_id=0, temperature=1.0, seed=0,
                   logits_hook=hook)
    assert out.ids == [[40, 41, 42, 43]] * 3  # stopped at the first stop id, which is kept
    assert calls[0] == (torch.Size([3, 128]), torch.Size([3, 64]), 0) and len(calls) == 4


def test_left_pad():
    ids, mask = left_pad([[1, 2, 3], [4]], pad_id=9)
    assert ids.tolist() == [[1, 2, 3], [9, 9, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
