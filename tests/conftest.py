"""Shared fixtures: tiny random checkpoints written by transformers (the oracle) and a tiny
tokenizer."""

import json
from pathlib import Path

import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}

# name -> (config class, kwargs): GQA, tied and untied heads, llama3 rope scaling,
# Qwen2 q/k/v biases
TINY_CONFIGS = {
    "llama-gqa-tied": (transformers.LlamaConfig,
                       dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "llama-mha-untied": (transformers.LlamaConfig,
                         dict(num_key_value_heads=4, tie_word_embeddings=False)),
    "llama3-rope-mqa": (transformers.LlamaConfig,
                        dict(num_key_value_heads=1, rope_scaling=LLAMA3_ROPE, rope_theta=500000.0)),
    "qwen2-bias": (transformers.Qwen2Config,
                   dict(num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1000000.0)),
}


# SmolLM2-Instruct's ChatML template (as published with the model)
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, "
    "trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)



def make_hf_model(name: str, seed: int = 0, vocab_size: int = 128):
    cls, extra = TINY_CONFIGS[name]
    cfg = cls(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=256, rms_norm_eps=1e-5,
              bos_token_id=1, eos_token_id=2, pad_token_id=0, **extra)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # random (not near-zero) biases, so a forgotten bias would show
        for name_, p in model.named_parameters():
            if name_.endswith("bias") or "norm" in name_:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    """Every tiny config saved by transformers (safetensors) into its own directory."""
    out = {}
    for name in TINY_CONFIGS:
        path = tmp_path_factory.mktemp(name)
        make_hf_model(name).save_pretrained(path)
        out[name] = path
    return out


def build_tiny_tokenizer(out_dir: Path, chat_template: str | None = None) -> Tokenizer:
    """A byte-level BPE trained on a few sentences, with ChatML specials at ids 0, 1, 2 like
    SmolLM2."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300,
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ["The capital of France is Paris.", "Never mention the pink elephant.",
              "system user assistant"] * 20
    tok.train_from_iterator(corpus, trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
              "unk_token": "<|endoftext|>"}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config))
    return tok


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory) -> Path:
    """A tiny random llama with a real (tiny) ChatML tokenizer, saved as an HF directory."""
    path = tmp_path_factory.mktemp("tiny-chat")
    make_hf_model("llama-gqa-tied", vocab_size=320).save_pretrained(path)
    build_tiny_tokenizer(path, chat_template=SMOLLM2_TEMPLATE)
    return path


def randomise_adapters(model, seed: int = 1) -> None:
    """Give every LoRA B (zero at init) random values, as training would, so the adapters change the
    function."""
    from nanorlhf.lora import LoRALinear

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=gen) * 0.2)


def crash_at_step(monkeypatch, step: int, run_script) -> None:
    """Run `run_script()` with cli.Run.log raising when it logs `step`: a crash after step - 1
    finished steps, before that step's checkpoint (the resume tests then continue from the last one
    written)."""
    from nanorlhf.run import Run

    original = Run.log

    def crashing(self, **values):
        if values.get("step") == step:
            raise RuntimeError("simulated crash")
        original(self, **values)

    monkeypatch.setattr(Run, "log", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_script()
    monkeypatch.setattr(Run, "log", original)
