"""LoRA: an adapted model starts equal to its base, merges into a plain HF checkpoint equal to the
adapted model, and with its adapters off is DPO's reference (the same numbers as a frozen copy of
the base)."""

import copy
import json

import pytest
import torch
import transformers
from safetensors.torch import load_file

import train_dpo
from nanorlhf import step as logprobs, lora
from nanorlhf.checkpoint import load_model, save_model
from nanorlhf.data import read_preferences
from nanorlhf.tokenizer import Tokenizer
from conftest import randomise_adapters
from test_train_dpo import train_as_main

IDS = torch.randint(0, 128, (2, 19), generator=torch.Generator().manual_seed(0))
CPU = torch.device("cpu")


@pytest.mark.parametrize("name", ["llama-gqa-tied", "qwen2-bias"])
def test_adapted_model_starts_equal_to_base_and_trains_only_adapters(tiny_dirs, name):
    base = load_model(tiny_dirs[name]).eval()
    model = lora.add(load_model(tiny_dirs[name]).eval(), rank=4, alpha=8)
    with torch.no_grad():
        assert torch.equal(model(IDS), base(IDS))  # B = 0: not close, equal
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert set(trainable) == {f"model.layers.{i}.{part}.{t}.lora_{ab}"
                              for i in range(2) for ab in "AB"
                              for part, names in (("self_attn", ("q_proj", "k_proj", "v_proj",
                                                                 "o_proj")),
                                                  ("mlp", ("gate_proj", "up_proj", "down_proj")))
                              for t in names}
    h, inter, kv = 64, 96, 2 * 16  # hidden, intermediate, kv heads x head_dim
    # r·(in + out) per projection / r
    per_layer = (h + h) + 2 * (h + kv) + (h + h) + 2 * (h + inter) + (inter + h)
    assert sum(trainable.values()) == 2 * 4 * per_layer
    # base names unchanged
    assert set(dict(model.state_dict())) - set(dict(base.state_dict())) == set(trainable)


def test_adapter_is_the_low_rank_formula(tiny_dirs):
    model = lora.add(load_model(tiny_dirs["qwen2-bias"]), rank=3, alpha=6, targets=("q_proj",))
    randomise_adapters(model)
    q = model.model.layers[1].self_attn.q_proj
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    W, b, A, B = (t.detach().double() for t in (q.weight, q.bias, q.lora_A, q.lora_B))
    expected = x @ W.T + b + (6 / 3) * (x @ A.T) @ B.T  # by hand, in float64
    torch.testing.assert_close(q(x.float()).double(), expected, atol=1e-5, rtol=0)
    # only the named targets
    assert not isinstance(model.model.layers[1].self_attn.v_proj, lora.LoRALinear)


@pytest.mark.parametrize("name", ["llama-gqa-tied", "llama-mha-untied", "qwen2-bias"])
def test_merge_and_saved_checkpoint_equal_the_adapted_model(tiny_dirs, tmp_path, name):
    base = load_model(tiny_dirs[name]).eval()
    model = lora.add(load_model(tiny_dirs[name]).eval(), rank=4, alpha=8)
    randomise_adapters(model)
    with torch.no_grad():
        adapted = model(IDS)
        assert (adapted - base(IDS)).abs().max() > 1e-2  # the adapters matter
        with lora.disabled(model):
            assert torch.equal(model(IDS), base(IDS))  # adapters off: the base function exactly
        assert torch.equal(model(IDS), adapted)  # and back on after the block

    out = save_model(model, tmp_path / "merged")
    assert not any("lora" in k for k in load_file(out / "model.safetensors"))  # plain HF layout
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    merged = lora.merge(copy.deepcopy(model))
    assert not any(isinstance(m, lora.LoRALinear) for m in merged.modules())
    assert all(p.requires_grad for p in merged.parameters())
    with torch.no_grad():
        # transformers vs us, as in test_checkpoint
        assert (hf(IDS).logits - adapted).abs().max().item() <= 1e-4
        torch.testing.assert_close(merged(IDS), adapted, atol=1e-5, rtol=0)
        torch.testing.assert_close(load_model(out)(IDS), adapted, atol=1e-5, rtol=0)
        assert torch.equal(model(IDS), adapted)  # saving merged a copy, not the model


def test_dpo_reference_with_adapters_off_equals_a_frozen_copy(tiny_chat_model, tmp_path):
    tok, frozen = Tokenizer(tiny_chat_model), load_model(tiny_chat_model).eval()
    rows = [{"prompt": f"Question {i}?", "chosen": "Grey elephants" + " are large" * i,
             "rejected": "Paris."} for i in range(6)]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs, _ = train_dpo.tokenize_pairs(read_preferences(tmp_path / "p.jsonl"), tok, 192, 320)
    model = load_model(tiny_chat_model)
    cfg = train_dpo.Config(lora_rank=4, lora_alpha=16, batch_size=2, grad_accum=1, lr=1e-2,
                           warmup_steps=1)
    lora.adapt(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)  # as main() does
    history = train_as_main(cfg, model, pairs, tok.pad_id)
    assert history[0]["loss"] == pytest.approx(0.6931472, abs=1e-6)  # step 1: policy == reference
    assert history[-1]["rewards/margins"] > 0  # the adapters learned something

    off, frozen_pairs = copy.deepcopy(pairs), copy.deepcopy(pairs)
    with lora.disabled(model):
        logprobs.reference_logps(model, [off[:2], off[2:5], off[5:]], tok.pad_id, CPU, False)
    logprobs.reference_logps(frozen, [frozen_pairs[:2], frozen_pairs[2:5], frozen_pairs[5:]],
                             tok.pad_id, CPU, False)
    for a, b in zip(off, frozen_pairs):
        # bit-identical
        assert (a["ref_chosen"], a["ref_rejected"]) == (b["ref_chosen"], b["ref_rejected"])
    with torch.no_grad():  # adapters on, the trained policy differs
        on, _ = logprobs.batch_logps(model, logprobs.pair_batch(off[:2], tok.pad_id), CPU, False)
    assert (on - torch.tensor([p["ref_chosen"] for p in off[:2]])).abs().max() > 1e-3
    base_weights = {k: v for k, v in model.state_dict().items() if "lora" not in k}
    # W itself never moved
    assert all(torch.equal(v, frozen.state_dict()[k]) for k, v in base_weights.items())


def test_base_view_is_the_base_model_after_training(tiny_chat_model):
    """lora.BaseView computes what the checkpoint computed before the adapters learned anything."""
    from nanorlhf import lora as lora_mod
    model = load_model(tiny_chat_model).eval()
    lora_mod.add(model, rank=4, alpha=8.0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, lora_mod.LoRALinear):
                m.lora_B.normal_()  # as if trained: the adapted model now differs from the base
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        base = load_model(tiny_chat_model).eval()(ids)
        assert not torch.equal(model(ids), base)
        assert torch.equal(lora_mod.BaseView(model)(ids), base)  # the same ops on the same weights
        assert not torch.equal(model(ids), base)  # and the adapters are back on afterwards
