"""One-time conversion of a pickle-format Hugging Face checkpoint into the layout nanorlhf reads.

    python tools/convert.py SRC DST [--force true]

Unpickling a file can run any code the file names (an object's __reduce__ is a function call), so
every loader in nanorlhf reads safetensors only and refuses pickle. Some published checkpoints exist
only as pickles (UltraRM-13b: pytorch_model-0000N-of-0000M.bin; OpenAssistant's DeBERTa RM:
pytorch_model.bin). This command is the one place that reads them, once, explicitly, and only
through torch's restricted unpickler, torch.load(weights_only=True): tensors, dicts, lists and
numbers load; anything else (a callable, a class) is refused before it is called. mmap=True maps the
file instead of reading it.

SRC -> DST:
  pytorch_model.bin               -> model.safetensors
  pytorch_model.bin.index.json    -> model.safetensors.index.json
  and its shards                  -> model-0000i-of-0000N.safetensors (one output shard per input
                                     shard: memory holds one at a time)
  model.safetensors(.index.json)  -> copied as they are (nothing to unpickle)
  tokenizer.model / spm.model     -> tokenizer.json (from sentencepiece's, if SRC has none)
  config.json, tokenizer_config.json, special_tokens_map.json, ... -> copied
  CHECKSUMS: sha256 of every file written, as `sha256sum -c CHECKSUMS` reads it (also printed)

Tensors keep their names, dtypes and values. safetensors stores each tensor's bytes once and refuses
two names over one storage (tied embeddings, views): those are cloned, so both names load. DST
appears whole or not at all (written to a temporary sibling, renamed at the end); an existing
non-empty DST is refused unless --force true.
"""

import hashlib
import json
import pickle
import re
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from nanorlhf.atomic import atomic_dir
from nanorlhf.checkpoint import PICKLE_SUFFIXES, read_index
from nanorlhf.errors import UserError, run_cli
from nanorlhf.run import flag, parse_config, positional
from nanorlhf.tokenizer import _read_json, _token_text

BIN_INDEX = "pytorch_model.bin.index.json"
SAFE_INDEX = "model.safetensors.index.json"
# weights: converted or useless
NOT_COPIED = PICKLE_SUFFIXES + (".safetensors", ".h5", ".msgpack", ".onnx", ".gguf")
SPM_FILES = ("tokenizer.model", "spm.model")  # Llama's and DeBERTa-v3's sentencepiece file names
# a leading space, digits, accents, CJK, runs of spaces and tabs, newlines, emoji (byte fallback):
# the converted tokenizer must encode it exactly like sentencepiece before it is written
PROBE_TEXT = (" Human: What is 12345 + 6.78?\n\nAssistant:   three spaces,\ttab\t\ttabs, "
              "naïve café, 東京, 🦄🎉 ☃ end  ")


def weight_shards(src: Path) -> tuple[list[str], dict[str, str] | None, bool]:
    """(shard file names, the index's weight_map or None, already safetensors?) of a checkpoint
    directory."""
    for index_name, single, safe in ((SAFE_INDEX, "model.safetensors", True),
                                     (BIN_INDEX, "pytorch_model.bin", False)):
        if (src / index_name).is_file():
            weight_map = read_index(src / index_name)
            shards = sorted(set(weight_map.values()))
            for shard in shards:
                if not (src / shard).is_file():
                    raise UserError(f"{src}: shard {shard} listed in {index_name} is missing")
            return shards, weight_map, safe
        if (src / single).is_file():
            return [single], None, safe
    raise UserError(f"{src}: no weights to convert: expected pytorch_model.bin, {BIN_INDEX}, "
                    f"model.safetensors or {SAFE_INDEX}")


def load_pickle_shard(path: Path) -> dict[str, torch.Tensor]:
    """One .bin file's {name: tensor} through torch's restricted unpickler (mmap'd when it is a zip
    archive, as torch.save has written since 1.6; the legacy format cannot be mapped and is read
    whole)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True,
                           mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        # torch's message is a page long; its 'WeightsUnpickler error:' line says what was refused
        reason = str(e).partition("WeightsUnpickler error:")[2]
        reason = reason.partition("Check the documentation")[0]
        reason = " ".join(reason.split()).partition(" Please use")[0] or str(e).splitlines()[0]
        raise UserError(f"{path}: refused: it holds more than tensors ({reason}); a checkpoint "
                        "file may not name code to run") from None
    except Exception as e:  # not a pickle at all, truncated, ...
        raise UserError(f"{path}: not a readable torch.save file ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise UserError(f"{path}: expected a flat {{name: tensor}} state dict (what "
                        f"save_pretrained writes), got a {type(state).__name__} of other things")
    return state


def storable(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors safetensors can write: contiguous, and no two sharing a storage (the later ones
    cloned)."""
    out, seen = {}, set()
    for name, t in tensors.items():
        t = t.contiguous()  # a no-op (same storage) when it already is
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in seen:
            t = t.clone()
        seen.add(ptr)
        out[name] = t
    return out


def safetensors_name(shard: str, sharded: bool) -> str:
    """pytorch_model-00001-of-00002.bin -> model-00001-of-00002.safetensors (transformers'
    naming)."""
    if not sharded:
        return "model.safetensors"
    return re.sub(r"^pytorch_model", "model", Path(shard).stem) + ".safetensors"


def convert_weights(src: Path, tmp: Path) -> list[str]:
    """Write tmp/model*.safetensors (+ index) from SRC's weights; -> the files written."""
    shards, weight_map, safe = weight_shards(src)
    if safe:  # already safetensors: copied byte for byte, nothing is unpickled
        names = shards + ([SAFE_INDEX] if weight_map is not None else [])
        for name in names:
            shutil.copyfile(src / name, tmp / name)
        return names
    sharded = weight_map is not None
    out_map, total_size, written = {}, 0, []
    total_bytes = sum((src / s).stat().st_size for s in shards)
    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="weights", disable=None) as bar:
        for shard in shards:
            tensors = load_pickle_shard(src / shard)
            if sharded:
                listed = [k for k, v in weight_map.items() if v == shard]
                missing = [k for k in listed if k not in tensors]
                if missing:
                    raise UserError(f"{src / shard}: has no tensor {missing[0]}, which {BIN_INDEX} "
                                    "places there")
            name = safetensors_name(shard, sharded)
            save_file(storable(tensors), tmp / name, metadata={"format": "pt"})
            for k, t in tensors.items():
                if k in out_map:
                    raise UserError(f"{src}: tensor {k} is in two shards ({shard} and an earlier "
                                    "one)")
                out_map[k] = name
                total_size += t.numel() * t.element_size()
            written.append(name)
            del tensors  # one shard in memory at a time
            bar.update((src / shard).stat().st_size)
    if sharded:
        index = {"metadata": {"total_size": total_size},
                 "weight_map": dict(sorted(out_map.items()))}
        (tmp / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        written.append(SAFE_INDEX)
    return written


def tokenizer_kind(src: Path, spm_file: str) -> str:
    """'llama' or 'deberta': tokenizer_config.json's tokenizer_class, else config.json's
    model_type."""
    cls = _read_json(src / "tokenizer_config.json").get("tokenizer_class") or ""
    cls = str(cls).removesuffix("Fast")
    model_type = _read_json(src / "config.json").get("model_type")
    llama_classes = ("LlamaTokenizer", "CodeLlamaTokenizer")
    if cls in llama_classes or (not cls and model_type in ("llama", "mistral")):
        return "llama"
    if cls == "DebertaV2Tokenizer" or (not cls and model_type == "deberta-v2"):
        return "deberta"
    raise UserError(f"{src / spm_file}: cannot convert a sentencepiece tokenizer of class "
                    f"{cls or model_type!r}; nanorlhf converts Llama's (LlamaTokenizer) and "
                    "DeBERTa-v2/v3's (DebertaV2Tokenizer)")


def convert_tokenizer(src: Path, tmp: Path) -> list[str]:
    """tokenizer.json from SRC's sentencepiece model, built by transformers' own classes, then
    checked.

    Why transformers (the optional [convert] extra): its LlamaTokenizerFast / DebertaV2TokenizerFast
    constructors are the reference conversion of these sentencepiece models to `tokenizers`
    (vocabulary and merges, byte fallback, normalizer, decoder, the [CLS] q [SEP] a [SEP] pair
    template), the same ones AutoTokenizer uses; re-deriving them here would be a second, untested
    copy. transformers 5 reads the .model file through protobuf; sentencepiece's own processor gives
    the same pieces and scores, and is also the oracle: the result must encode PROBE_TEXT exactly as
    sentencepiece does, or nothing is written.
    """
    spm_file = next((name for name in SPM_FILES if (src / name).is_file()), None)
    if (src / "tokenizer.json").is_file() or spm_file is None:
        return []  # copied with the other files, or there is no tokenizer to convert
    kind = tokenizer_kind(src, spm_file)
    try:
        import sentencepiece
        import transformers
    except ImportError:
        transformers = None
    if transformers is None or int(transformers.__version__.split(".")[0]) < 5:
        raise UserError(f"{src / spm_file}: converting a sentencepiece tokenizer needs "
                        "transformers >= 5 and sentencepiece: pip install 'nanorlhf[convert]'")
    sp = sentencepiece.SentencePieceProcessor(model_file=str(src / spm_file))
    pieces = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    config = _read_json(src / "tokenizer_config.json")
    specials = {k: _token_text(v) for k, v in config.items()
                if k.endswith("_token") and isinstance(v, (str, dict))}
    if kind == "llama":
        from tokenizers import normalizers
        from transformers.tokenization_utils_base import generate_merges

        vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
        defaults = {"unk_token": sp.id_to_piece(sp.unk_id()),
                    "bos_token": sp.id_to_piece(sp.bos_id()),
                    "eos_token": sp.id_to_piece(sp.eos_id())}
        tok = transformers.LlamaTokenizerFast(vocab=vocab, merges=generate_merges(vocab),
                                              **{**defaults, **specials})
        # sentencepiece prepends its dummy "▁" even to a text that starts with a space; the
        # Metaspace pre-tokenizer above does not (it sees "▁" already there). The legacy
        # normalizer, transformers' LlamaConverter for legacy=True (the slow LlamaTokenizer's
        # default) and Llama-2's own tokenizer.json, does.
        tok.backend_tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                                                 normalizers.Replace(" ", "▁")])
        tok.backend_tokenizer.pre_tokenizer = None
    else:
        tok = transformers.DebertaV2TokenizerFast(
            vocab=pieces, do_lower_case=config.get("do_lower_case", False), **specials)
    expected = sp.encode(PROBE_TEXT)
    got = tok.backend_tokenizer.encode(PROBE_TEXT, add_special_tokens=False).ids
    if got != expected:
        at = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b),
                  min(len(expected), len(got)))
        raise UserError(f"{src / spm_file}: the converted tokenizer encodes a test text "
                        f"differently from sentencepiece (first difference at token {at}); "
                        "not written")
    scratch = tmp / ".tokenizer"
    tok.save_pretrained(scratch)
    written = ["tokenizer.json"]
    shutil.move(scratch / "tokenizer.json", tmp / "tokenizer.json")
    # else SRC's own is copied (bos_token, chat template, ...)
    if not (src / "tokenizer_config.json").is_file():
        shutil.move(scratch / "tokenizer_config.json", tmp / "tokenizer_config.json")
        written.append("tokenizer_config.json")
    shutil.rmtree(scratch)
    return written


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def check_paths(src: Path, dst: Path, force: bool) -> None:
    if not src.exists():
        raise UserError(f"{src}: no such directory")
    if not src.is_dir():
        raise UserError(f"{src}: expected a checkpoint directory, got a file")
    if not (src / "config.json").is_file():
        raise UserError(f"{src}: no config.json (is this a Hugging Face model directory?)")
    if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
        raise UserError(f"{dst}: must be outside SRC {src}")
    if dst.exists() and not dst.is_dir():
        raise UserError(f"{dst}: exists and is a file")
    if dst.is_dir() and any(dst.iterdir()) and not force:
        raise UserError(f"{dst}: exists and is not empty (--force true replaces it)")


def convert(src: str | Path, dst: str | Path, force: bool = False) -> Path:
    """Convert SRC into DST (see the module docstring); prints each written file's sha256.
    -> DST."""
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    check_paths(src, dst, force)
    with atomic_dir(dst) as tmp:
        written = convert_weights(src, tmp) + convert_tokenizer(src, tmp)
        # config.json, tokenizer files, generation config, README, ...
        not_copied = written + [BIN_INDEX, "CHECKSUMS"]
        for p in sorted(src.iterdir()):
            if (p.is_file() and not p.name.startswith(".") and p.name not in not_copied
                    and not p.name.endswith(NOT_COPIED)):
                shutil.copyfile(p, tmp / p.name)
                written.append(p.name)
        lines = [f"{sha256(tmp / name)}  {name}" for name in sorted(written)]
        (tmp / "CHECKSUMS").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {dst} ({len(written)} files; sha256 in {dst / 'CHECKSUMS'}: "
          "sha256sum -c CHECKSUMS checks them)")
    if not (dst / "tokenizer.json").is_file():
        print(f"note: {src} has no tokenizer.json, {' or '.join(SPM_FILES)}: nanorlhf needs "
              "tokenizer.json to score or sample")
    return dst


@dataclass
class Config:
    src: str = positional("a Hugging Face checkpoint directory with *.bin weights")
    dst: str = positional("the directory to write (must not exist, or be empty)")
    force: bool = flag(False, "replace DST if it exists and is not empty")


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(Config, __doc__, argv, prog="python tools/convert.py")
    convert(cfg.src, cfg.dst, cfg.force)


if __name__ == "__main__":
    run_cli(main)
