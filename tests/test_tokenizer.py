"""Chat formatting against transformers' own template rendering, and the prompt/response
boundary; a malformed tokenizer file is one line."""

import json

import pytest
import transformers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from nanorlhf.tokenizer import Tokenizer
from conftest import SMOLLM2_TEMPLATE, build_tiny_tokenizer

def test_chatml_matches_transformers_template(tmp_path):
    build_tiny_tokenizer(tmp_path, chat_template=SMOLLM2_TEMPLATE)
    ours = Tokenizer(tmp_path)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"),
                                              chat_template=SMOLLM2_TEMPLATE)
    assert ours.format == "chatml" and ours.eos_id == 2 and ours.pad_id == 2
    for messages in (
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "system", "content": "Never mention the pink elephant."},
         {"role": "user", "content": "Tell me about elephants."},
         {"role": "assistant", "content": "They are grey."},
         {"role": "user", "content": "And pink ones?"}],
    ):
        rendered = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = ours.chat_prompt(messages)
        assert ours.decode(ids, skip_special_tokens=False) == rendered
        assert ids == hf(rendered, add_special_tokens=False)["input_ids"]
        assert ids.count(1) == rendered.count("<|im_start|>")  # specials are single tokens


def test_system_argument_replaces_default_system(tmp_path):
    build_tiny_tokenizer(tmp_path, chat_template=SMOLLM2_TEMPLATE)
    ours = Tokenizer(tmp_path)
    ids = ours.chat_prompt("Hi", system="Never mention Paris.")
    text = ours.decode(ids, skip_special_tokens=False)
    assert text == "<|im_start|>system\nNever mention Paris.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_llama3_headers_and_single_bos(tmp_path):
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                "<|eot_id|>"]
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["system user assistant hello"] * 5, trainers.BpeTrainer(
        vocab_size=280, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
        "chat_template": "... Cutting Knowledge Date: ... <|start_header_id|> ..."}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 4]}))
    ours = Tokenizer(tmp_path)
    ids = ours.chat_prompt([{"role": "user", "content": " hello "}])
    expected = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>"
                "<|start_header_id|>user<|end_header_id|>\n\nhello<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert ours.decode(ids, skip_special_tokens=False) == expected
    assert ids.count(0) == 1  # exactly one BOS
    assert ours.eos_id == 4 and ours.stop_ids == [1, 4]


def test_no_merge_across_the_prompt_response_boundary(tmp_path):
    # Trained on text full of "\n\n", the BPE has "ĊĊ" as one token. The ChatML prompt ends with
    # "\n", so a response starting "\n " puts a "\n\n" pre-token across the boundary when the two
    # are encoded as one string (GPT-2's regex keeps the space for " Paris"): the joint encoding
    # merges there, ours must not.
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300,
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["The capital of France is Paris.\n\n Yes.\n\n system user assistant"] * 20,
                            trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>",
                                                                "chat_template": SMOLLM2_TEMPLATE}))
    ours = Tokenizer(tmp_path)
    prompt_ids, response = ours.chat_prompt("Capital?"), "\n Paris."
    prompt_text = ours.decode(prompt_ids, skip_special_tokens=False)
    joint = ours.encode(prompt_text + response)
    assert tok.id_to_token(joint[len(prompt_ids) - 1]) == "ĊĊ"  # the merge a joint encoding makes

    def check(prompt: list[int], response_ids: list[int]) -> None:
        """What the loss mask needs: each part decodes to exactly its own text, and ends where it
        should."""
        assert ours.decode(prompt, skip_special_tokens=False) == prompt_text
        assert tok.id_to_token(prompt[-1]) == "Ċ" and tok.id_to_token(response_ids[0]) == "Ċ"
        assert response_ids[-1] == ours.eos_id
        assert ours.decode(response_ids[:-1], skip_special_tokens=False) == response

    check(prompt_ids, ours.response_ids(response))
    # response ids sliced from the joint encoding fail the same checks
    with pytest.raises(AssertionError):
        check(joint[:len(prompt_ids)], joint[len(prompt_ids):] + [ours.eos_id])
