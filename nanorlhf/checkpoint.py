"""Hugging Face checkpoint directories <-> nanorlhf models, through safetensors only.

A checkpoint is a directory with config.json, model.safetensors (or shards listed in
model.safetensors.index.json) and tokenizer files. We read tensors with safetensors (no pickle, no
code from the checkpoint), build the model on the meta device and *assign* the loaded tensors, so
memory holds one copy of the weights, not two.
"""

import errno
import json
import math
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from nanorlhf import distributed, lora
from nanorlhf.errors import UserError
from nanorlhf.model import ModelConfig, Transformer, rope_inv_freq
from nanorlhf.atomic import atomic_dir

SUPPORTED_TYPES = ("llama", "mistral", "qwen2")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# upper bounds far above any released Llama-family model's, low enough that a typo (1e9 layers)
# is refused before a model is built
SIZE_LIMITS = {"vocab_size": 1 << 22, "hidden_size": 1 << 17, "intermediate_size": 1 << 19,
               "num_hidden_layers": 1 << 12, "num_attention_heads": 1 << 12,
               "num_key_value_heads": 1 << 12, "head_dim": 1 << 12,
               "max_position_embeddings": 1 << 24}


def hf_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    hf_home = os.environ.get("HF_HOME") or cache / "huggingface"
    return Path(hf_home) / "hub"


def resolve_model(name: str) -> Path:
    """--model: a directory, an `org/name` already in the local Hugging Face cache, or `llama`
    (the embedded model)."""
    if name == "llama":
        from nanorlhf.embedded import ensure_embedded_model  # lazy: only this path needs gguf

        return ensure_embedded_model()
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise UserError(f"--model {name}: expected a checkpoint directory, got a file")
    repo = hf_cache_dir() / ("models--" + name.replace("/", "--"))
    if name.count("/") == 1 and (repo / "snapshots").is_dir():
        ref = repo / "refs" / "main"
        if ref.is_file() and (repo / "snapshots" / ref.read_text().strip()).is_dir():
            return repo / "snapshots" / ref.read_text().strip()
        snapshots = sorted((repo / "snapshots").iterdir(), key=lambda p: p.stat().st_mtime)
        if snapshots:
            return snapshots[-1]
    raise UserError(f"--model {name}: no such directory, not found in the local Hugging Face cache "
                    f"({hf_cache_dir()}), and not 'llama' (the embedded SmolLM2-135M-Instruct)")


def read_config(model_dir: Path) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise UserError(f"{model_dir}: no config.json (is this a Hugging Face model directory?)")
    try:
        hf = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(hf, dict):
        raise UserError(f"{path}: expected a JSON object of settings, got a {type(hf).__name__}")
    return hf


def _size(hf: dict, key: str, where: str, default: int | None = None) -> int:
    """A size from config.json: a positive integer within SIZE_LIMITS (or `default` if absent)."""
    value = hf.get(key)
    if value is None and default is not None:
        return default
    if value is None:
        raise UserError(f"{where}: missing key {key!r}")
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= SIZE_LIMITS[key]:
        raise UserError(f"{where}: {key} is {value!r}; expected an integer from 1 to "
                        f"{SIZE_LIMITS[key]}")
    return value


def _positive(value, key: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise UserError(f"{where}: {key} is {value!r}; expected a positive number")
    return float(value)


def config_from_hf(hf: dict, tensor_names: set[str], where: str = "config.json") -> ModelConfig:
    """Translate config.json (transformers v4 or v5 keys) into a ModelConfig. Every size is checked
    (type, bounds, the layers the checkpoint's `tensor_names` hold) before anything is built."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_TYPES:
        arch = ", ".join(hf.get("architectures") or []) or model_type
        raise UserError(f"{where}: unsupported architecture {arch!r} (model_type {model_type!r}); "
                        f"nanorlhf runs the Llama family: {', '.join(SUPPORTED_TYPES)}")
    if hf.get("rope_interleaved"):
        raise UserError(f"{where}: rope_interleaved=true is not supported (HF split-halves RoPE "
                        "only)")
    # transformers v5 writes rope_parameters {rope_theta, rope_type, ...}; v4 files have
    # rope_theta + rope_scaling
    for key in ("rope_parameters", "rope_scaling"):
        if not isinstance(hf.get(key) or {}, dict):
            raise UserError(f"{where}: {key} is {hf[key]!r}; expected an object")
    rope_params = hf.get("rope_parameters") or {}
    theta = rope_params.get("rope_theta", hf.get("rope_theta", 10000.0))
    default_rope = rope_params.get("rope_type", "default") == "default"
    scaling = hf.get("rope_scaling") if default_rope else rope_params
    size = lambda key, default=None: _size(hf, key, where, default)
    hidden, heads = size("hidden_size"), size("num_attention_heads")
    layers, kv_heads = size("num_hidden_layers"), size("num_key_value_heads", heads)
    if heads % kv_heads:
        raise UserError(f"{where}: num_attention_heads {heads} is not a multiple of "
                        f"num_key_value_heads {kv_heads}")
    found = {int(n.split(".")[2]) for n in tensor_names if n.startswith("model.layers.")
             and n.split(".")[2].isdigit()}
    if tensor_names and found != set(range(layers)):
        raise UserError(f"{where}: num_hidden_layers is {layers}, but the checkpoint's tensors "
                        f"hold {len(found)} layers")
    tied = hf.get("tie_word_embeddings", False)
    if not isinstance(tied, bool):
        raise UserError(f"{where}: tie_word_embeddings is {tied!r}; expected true or false")
    cfg = ModelConfig(
        vocab_size=size("vocab_size"),
        hidden_size=hidden,
        intermediate_size=size("intermediate_size"),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=size("head_dim", max(hidden // heads, 1)),
        rms_norm_eps=_positive(hf.get("rms_norm_eps", 1e-6), "rms_norm_eps", where),
        rope_theta=_positive(theta, "rope_theta", where),
        rope_scaling=scaling,
        max_position_embeddings=size("max_position_embeddings", 2048),
        tie_word_embeddings=tied,
        # biases: decided by what the checkpoint holds (Qwen2's config has no key for them)
        qkv_bias="model.layers.0.self_attn.q_proj.bias" in tensor_names,
        o_bias="model.layers.0.self_attn.o_proj.bias" in tensor_names,
        mlp_bias="model.layers.0.mlp.gate_proj.bias" in tensor_names,
        hf_config=hf,
    )
    try:  # the rotary frequencies: small (head_dim / 2 numbers); a bad rope_scaling shows now
        rope_inv_freq(cfg)
    except (KeyError, ValueError, TypeError, ZeroDivisionError) as e:
        reason = f"{type(e).__name__}: {e}"
        raise UserError(f"{where}: rope scaling {scaling!r} is not usable ({reason})") from None
    return cfg


def read_index(path: Path) -> dict[str, str]:
    """An index file's weight_map {tensor name: shard file name}; one line if malformed."""
    try:
        index = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise UserError(f"{path}: expected a non-empty 'weight_map' object of tensor name -> "
                        "shard file name")
    for shard in set(weight_map.values()):
        if Path(shard).name != shard:
            raise UserError(f"{path}: shard {shard!r} is not a file name inside the checkpoint "
                            "directory")
    return weight_map


def safetensors_files(model_dir: Path) -> list[str]:
    """The safetensors file(s) of a checkpoint directory: one file, or the shards its index lists.
    Refuses pickle files."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(read_index(index).values()))
    elif (model_dir / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        shards = sorted(p.name for p in model_dir.glob("*.safetensors"))
    if not shards:
        pickles = [p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise UserError(f"{model_dir}: only pickle weights ({', '.join(pickles)}); nanorlhf "
                            "never unpickles when loading. Convert them once: "
                            f"python tools/convert.py {model_dir} DST")
        raise UserError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")
    for shard in shards:
        if not (model_dir / shard).is_file():
            raise UserError(f"{model_dir}: shard {shard} listed in model.safetensors.index.json "
                            "is missing")
    return shards


def read_safetensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of a single-file or sharded safetensors checkpoint. Refuses pickle files."""
    tensors = {}
    for shard in safetensors_files(model_dir):
        try:
            tensors.update(load_file(Path(model_dir) / shard))
        except (SafetensorError, OSError) as e:
            raise unreadable(Path(model_dir) / shard, e) from None
    return tensors


def unreadable(path: Path, e: Exception) -> UserError:
    return UserError(f"{path}: not a readable safetensors file ({e}); is it truncated or damaged?")


def tensor_files(model_dir: Path) -> dict[str, str]:
    """{tensor name: the file holding it}, from the files' headers only (no tensor data is read)."""
    files = {}
    for shard in safetensors_files(model_dir):
        try:
            with safe_open(Path(model_dir) / shard, "pt") as f:
                files.update(dict.fromkeys(f.keys(), shard))
        except (SafetensorError, OSError) as e:
            raise unreadable(Path(model_dir) / shard, e) from None
    return files


def check_names(expected, found, where: str) -> None:
    """One UserError line if the checkpoint's tensor names `found` are not exactly the model's
    `expected`."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    if missing:
        more = f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(f"{where}: missing tensor {missing[0]}{more}")
    if unexpected:
        more = f" (+{len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise UserError(f"{where}: unexpected tensor {unexpected[0]}{more}")


def wrong_shape(name: str, shape, expected, where: str) -> UserError:
    return UserError(f"{where}: tensor {name} has shape {list(shape)}, config.json implies "
                     f"{list(expected)}")


def load_state_into(module: torch.nn.Module, tensors: dict[str, torch.Tensor], where: str,
                    dtype: torch.dtype, ignore: tuple[str, ...] = ()) -> None:
    """Check names and shapes, then assign `tensors` into a meta-device `module` (no second
    copy)."""
    expected = module.state_dict()
    skip = ignore + ("rotary_emb.inv_freq",)
    tensors = {k: v for k, v in tensors.items() if not k.endswith(skip)}
    check_names(expected, tensors, where)
    for name, t in tensors.items():
        if t.shape != expected[name].shape:
            raise wrong_shape(name, t.shape, expected[name].shape, where)
    module.load_state_dict({k: v.to(dtype) for k, v in tensors.items()}, strict=True, assign=True)


def load_model(model: str | Path, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> Transformer:
    """Load a causal LM from a checkpoint directory (or any name `resolve_model` accepts)."""
    model_dir = resolve_model(str(model))
    hf = read_config(model_dir)
    tensors = read_safetensors(model_dir)
    cfg = config_from_hf(hf, set(tensors), where=str(model_dir / "config.json"))
    with torch.device("meta"):
        net = Transformer(cfg)
    # tied models store no lm_head (some store a redundant copy): the embedding is the head
    ignore = ("lm_head.weight",) if cfg.tie_word_embeddings else ()
    if cfg.tie_word_embeddings:
        del net.lm_head.weight  # drop the alias so state_dict() stops expecting it
    load_state_into(net, tensors, str(model_dir), dtype, ignore)
    net.tie_weights()
    net.model_dir = model_dir
    return net.to(device)


def hf_config_of(cfg: ModelConfig, dtype: torch.dtype) -> dict:
    """config.json for `cfg`: the loaded one with our fields written over it, so unknown keys
    survive."""
    hf = dict(cfg.hf_config)
    hf.setdefault("architectures", ["LlamaForCausalLM"])
    hf.setdefault("model_type", "llama")
    hf.update(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
              intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
              num_attention_heads=cfg.num_attention_heads,
              num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
              rms_norm_eps=cfg.rms_norm_eps, max_position_embeddings=cfg.max_position_embeddings,
              tie_word_embeddings=cfg.tie_word_embeddings, hidden_act="silu")
    # the v5 / v4 spelling
    hf["dtype" if "dtype" in hf else "torch_dtype"] = str(dtype).removeprefix("torch.")
    if hf["model_type"] == "llama":
        hf.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
    if "rope_parameters" not in hf:
        hf.update(rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling)
    return hf


def tokenizer_files(model_dir: Path) -> list[Path]:
    """The tokenizer files of `model_dir` that may travel with saved weights: regular files inside
    it (in a Hugging Face cache snapshot, links into its repository's blobs/ count as inside).
    Anything else (a link out of the directory, a device, a pipe) is skipped with one line on
    stderr: copying it would put an outside file's contents into the run."""
    root = Path(model_dir).resolve()
    inside = root.parent.parent if root.parent.name == "snapshots" else root
    files = []
    for name in TOKENIZER_FILES:
        path = Path(model_dir) / name
        if not (path.exists() or path.is_symlink()):
            continue
        target = path.resolve()
        if target.is_file() and target.is_relative_to(inside):
            files.append(path)
        else:
            print(f"warning: {path} is not a regular file inside {model_dir}: not copied",
                  file=sys.stderr)
    return files


def write_checkpoint_dir(out_dir: Path, config: dict, tensors: dict[str, torch.Tensor],
                         copy_from: Path | None) -> Path:
    """Write config.json + model.safetensors (+ tokenizer files copied from `copy_from`)
    atomically: everything goes to a temporary sibling first and is renamed into place, so a crash
    leaves no half checkpoint. Under torchrun only rank 0 writes."""
    if not distributed.is_main():
        return Path(out_dir)
    with atomic_dir(Path(out_dir)) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        try:  # atomic_dir gives the file the usual mode (safetensors writes it 0600)
            save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        except SafetensorError as e:  # a full disk: atomic_dir makes it one line, old dir kept
            raise OSError(errno.EIO, str(e)) from None
        for path in tokenizer_files(copy_from) if copy_from else ():
            shutil.copyfile(path, tmp / path.name)
    return Path(out_dir)


def plain_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """model's tensors under their HF names: LoRA adapters merged in, FSDP shards gathered (a
    collective)."""
    return distributed.gathered(lora.merged_state_dict(model))


def save_model(model: Transformer, out_dir: str | Path,
               copy_from: str | Path | None = None) -> Path:
    """Save in the HF layout that `transformers.AutoModelForCausalLM.from_pretrained` loads.

    `copy_from`: the directory whose tokenizer files travel with the weights (default: where the
    model came from). LoRA adapters are merged into the saved weights (the model keeps them).
    Under torchrun every rank calls this (FSDP gathers the shards) and rank 0 writes.
    """
    dtype = next(model.parameters()).dtype
    tensors = plain_tensors(model)
    if model.cfg.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)  # HF convention: tied models store the embedding once
    copy_from = copy_from or getattr(model, "model_dir", None)
    return write_checkpoint_dir(Path(out_dir), hf_config_of(model.cfg, dtype), tensors, copy_from)
