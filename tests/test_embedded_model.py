"""Slow end-to-end checks on the real embedded SmolLM2-135M-Instruct (converted once into the
cache)."""

import pytest
import torch
import transformers

from nanorlhf import step as logprobs
from nanorlhf.checkpoint import load_model
from nanorlhf.embedded import ensure_embedded_model
from nanorlhf.sampling import generate
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
    messages = [{"role": "system", "content": "Never mention Coca-Cola."},
                {"role": "user", "content": "Best soda?"}]
    for conversation in (messages, messages[1:]):
        expected = hf_tok.apply_chat_template(conversation, add_generation_prompt=True,
                                              tokenize=False)
        assert tok.chat_prompt(conversation) == (
            hf_tok(expected, add_special_tokens=False)["input_ids"])


def test_greedy_answer_says_paris(smollm2):
    _, model, tok = smollm2
    out = generate(model, [tok.chat_prompt("What is the capital of France?")], 32, tok.stop_ids,
                   tok.pad_id, temperature=0, tokenizer=tok)
    assert "Paris" in out.texts[0], out.texts[0]
    assert out.ids[0][-1] in tok.stop_ids  # it finished its turn


def test_a_few_dpo_steps_lower_the_loss_on_the_training_batch(smollm2):
    import train_dpo
    from nanorlhf.data import read_preferences

    model_dir, _, tok = smollm2
    model = load_model(model_dir)  # a fresh copy: the fixture's model stays the base
    pairs, _ = train_dpo.tokenize_pairs(read_preferences("data/pink_dpo_train.jsonl")[:4], tok, 192,
                                        model.cfg.vocab_size)
    cpu = torch.device("cpu")
    logprobs.reference_logps(model, [pairs], tok.pad_id, cpu, average=False)
    ref = [torch.tensor([p[k] for p in pairs]) for k in ("ref_chosen", "ref_rejected")]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    model.train()
    losses = []
    for _ in range(4):
        batch = logprobs.pair_batch(pairs, tok.pad_id)
        chosen, rejected = logprobs.batch_logps(model, batch, cpu, False)
        loss = train_dpo.dpo_loss(chosen, rejected, *ref, beta=0.1)[0].mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert abs(losses[0] - 0.6931472) < 1e-3  # policy == reference before the first step
    assert losses[-1] < losses[0] - 0.05, losses
