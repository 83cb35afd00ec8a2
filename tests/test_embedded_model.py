"""Slow end-to-end checks on the real embedded SmolLM2-135M-Instruct (converted once into the cache)."""

import pytest
import torch
import transformers

from nanorlhf.checkpoint import load_model
from nanorlhf.embedded import ensure_embedded_model
from nanorlhf.generate import generate
from nanorlhf.tokenizer import Tokenizer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    model_dir = ensure_embedded_model()
    return model_dir, load_model(model_dir).eval(), Tokenizer(model_dir)


def test_logits_equal_transformers(smollm2):
    model_dir, ours, tok = smollm2
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.tensor([tok.chat_prompt("Tell me a short story about a pink elephant.")])
    with torch.no_grad():
        diff = (hf(ids).logits - ours(ids)).abs().max().item()
    assert diff <= 1e-4, diff


def test_chat_prompt_equals_transformers_template(smollm2):
    model_dir, _, tok = smollm2
    hf_tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    messages = [{"role": "system", "content": "Never mention Coca-Cola."}, {"role": "user", "content": "Best soda?"}]
    for conversation in (messages, messages[1:]):
        expected = hf_tok.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        assert tok.chat_prompt(conversation) == hf_tok(expected, add_special_tokens=False)["input_ids"]


def test_greedy_answer_says_paris(smollm2):
    _, model, tok = smollm2
    out = generate(model, [tok.chat_prompt("What is the capital of France?")], 32, tok.stop_ids, tok.pad_id,
                   temperature=0, tokenizer=tok)
    assert "Paris" in out.texts[0], out.texts[0]
    assert out.ids[0][-1] in tok.stop_ids  # it finished its turn
