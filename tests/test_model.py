"""The model against transformers (the oracle): logits, padding, KV cache, greedy generation."""

import pytest
import torch
import transformers

from nanorlhf.checkpoint import load_model
from nanorlhf.sampling import generate, left_pad
from nanorlhf.model import KVCache, attention_mask_4d
from conftest import TINY_CONFIGS


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_logits_match_transformers(tiny_dirs, name):
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_dirs[name]).eval()
    ours = load_model(tiny_dirs[name]).eval()
    # positions up to 60 > original_max_position_embeddings=16, so llama3 scaling's bands all matter
    ids = torch.randint(0, 128, (3, 60), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = hf(ids).logits, ours(ids)
    assert (expected - got).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", ["llama-gqa-tied", "qwen2-bias"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_rows_alone(tiny_dirs, name, side):
    model = load_model(tiny_dirs[name]).eval()
    gen = torch.Generator().manual_seed(2)
    rows = [torch.randint(3, 128, (n,), generator=gen) for n in (9, 4, 13)]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, span], mask[i, span] = r, 1
    with torch.no_grad():
        batched = model(ids, mask)
        for i, r in enumerate(rows):
            alone = model(r[None])[0]
            span = slice(width - len(r), width) if side == "left" else slice(0, len(r))
            torch.testing.assert_close(batched[i, span], alone, atol=1e-5, rtol=1e-5)
        assert torch.isfinite(batched).all()  # pad rows must not produce NaN


def test_kv_cache_decoding_equals_full_forward(tiny_dirs):
    model = load_model(tiny_dirs["llama3-rope-mqa"]).eval()
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding on the second row
    with torch.no_grad():
        full = model(ids, mask)
        cache = KVCache(model.cfg, 2, 20, "cpu", torch.float32)
        # prefill 8, then a 5-token chunk (queries fewer than keys, T > 1), then one at a time
        pieces = [model(ids[:, :8], mask[:, :8], cache), model(ids[:, 8:13], mask[:, :13], cache)]
        pieces += [model(ids[:, t:t + 1], mask[:, :t + 1], cache) for t in range(13, 20)]
    stepwise = torch.cat(pieces, dim=1)
    torch.testing.assert_close(stepwise[0], full[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stepwise[1, 5:], full[1, 5:], atol=1e-5, rtol=1e-5)


def test_mask_is_causal_lower_right_and_keeps_diagonal():
    mask = attention_mask_4d(torch.tensor([[0, 1, 1, 1]]), T=2)[0, 0]  # queries are positions 2, 3
    assert mask.tolist() == [[False, True, True, False], [False, True, True, True]]
    pad_query = attention_mask_4d(torch.tensor([[0, 0, 1]]), T=3)[0, 0]
    # a pad query sees only itself, never nothing
    assert pad_query[0].tolist() == [True, False, False]


@pytest.mark.parametrize("name", ["llama-gqa-tied", "llama3-rope-mqa", "qwen2-bias"])
def test_greedy_generation_equals_transformers(tiny_dirs, name):
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_dirs[name]).eval()
    ours = load_model(tiny_dirs[name]).eval()
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [20, 21, 22, 23, 24]]
    ids, mask = left_pad(prompts, pad_id=0)
    expected = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=24, do_sample=False,
                           pad_token_id=0, eos_token_id=None)[:, ids.shape[1]:]
    got = generate(ours, prompts, max_new_tokens=24, stop_ids=[], pad_id=0, temperature=0)
    assert got.ids == expected.tolist()
