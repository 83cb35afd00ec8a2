"""Loading and saving HF-layout checkpoints; every bad input ends in one clear UserError."""

import json
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from nanorlhf.checkpoint import load_model, resolve_model, save_model
from nanorlhf.errors import UserError
from nanorlhf.tokenizer import Tokenizer
from conftest import build_tiny_tokenizer, make_hf_model

IDS = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", ["llama-gqa-tied", "llama-mha-untied", "llama3-rope-mqa",
                                  "qwen2-bias"])
def test_save_then_transformers_loads_same_logits(tiny_dirs, tmp_path, name):
    ours = load_model(tiny_dirs[name]).eval()
    with torch.no_grad():
        for p in ours.parameters():  # change the weights so the saved file is not the original
            p.mul_(1.1)
        expected = ours(IDS)
    out = save_model(ours, tmp_path / "saved")
    assert not list(tmp_path.glob("*.tmp-*"))  # the temporary directory was renamed into place
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert (hf(IDS).logits - expected).abs().max().item() <= 1e-4
    reloaded = load_model(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS), expected)


def test_tied_embedding_is_one_tensor(tiny_dirs):
    model = load_model(tiny_dirs["llama-gqa-tied"])
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight.device.type == "cpu"


def test_sharded_checkpoint_loads(tmp_path):
    hf = make_hf_model("llama-mha-untied")
    hf.save_pretrained(tmp_path, max_shard_size="50KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    with torch.no_grad():
        assert (hf(IDS).logits - load_model(tmp_path)(IDS)).abs().max().item() <= 1e-4


def test_bfloat16_load(tiny_dirs):
    model = load_model(tiny_dirs["llama-gqa-tied"], dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_resolves_local_hf_cache_id(tiny_dirs, tmp_path, monkeypatch):
    snapshot = tmp_path / "hub" / "models--acme--tiny" / "snapshots" / "abc123"
    shutil.copytree(tiny_dirs["llama-gqa-tied"], snapshot)
    (tmp_path / "hub" / "models--acme--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--acme--tiny" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert resolve_model("acme/tiny") == snapshot
    load_model("acme/tiny")


def expect_user_error(fragment: str, fn, *args):
    with pytest.raises(UserError) as info:
        fn(*args)
    message = str(info.value)
    assert fragment in message and "\n" not in message, message
    return message


def copy_of(tiny_dirs, tmp_path, name="llama-gqa-tied"):
    return shutil.copytree(tiny_dirs[name], tmp_path / "ckpt")


def test_missing_path(tmp_path):
    expect_user_error("no such directory", load_model, tmp_path / "nope")


def test_directory_without_config(tmp_path):
    expect_user_error("no config.json", load_model, tmp_path)


def test_unsupported_architecture_is_named(tiny_dirs, tmp_path):
    path = copy_of(tiny_dirs, tmp_path)
    config = json.loads((path / "config.json").read_text())
    config.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (path / "config.json").write_text(json.dumps(config))
    expect_user_error("GPT2LMHeadModel", load_model, path)


def test_missing_shard_is_named(tmp_path):
    make_hf_model("llama-mha-untied").save_pretrained(tmp_path, max_shard_size="50KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    expect_user_error(shard.name, load_model, tmp_path)


def test_shape_mismatch_names_the_tensor(tiny_dirs, tmp_path):
    path = copy_of(tiny_dirs, tmp_path)
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(95, 64)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    expect_user_error("model.layers.1.mlp.up_proj.weight has shape [95, 64]", load_model, path)


def test_missing_tensor_is_named(tiny_dirs, tmp_path):
    path = copy_of(tiny_dirs, tmp_path)
    tensors = load_file(path / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    expect_user_error("missing tensor model.norm.weight", load_model, path)


def test_pickle_only_checkpoint_is_refused(tiny_dirs, tmp_path):
    path = copy_of(tiny_dirs, tmp_path)
    (path / "model.safetensors").unlink()
    (path / "pytorch_model.bin").write_bytes(b"not even read")
    expect_user_error("pytorch_model.bin", load_model, path)


def test_missing_tokenizer(tiny_dirs):
    expect_user_error("no tokenizer.json", Tokenizer, tiny_dirs["llama-gqa-tied"])


def test_tokenizer_files_travel_with_saved_model(tiny_dirs, tmp_path):
    src = copy_of(tiny_dirs, tmp_path)
    build_tiny_tokenizer(src)
    out = save_model(load_model(src), tmp_path / "out")
    assert Tokenizer(out).encode("Paris") == Tokenizer(src).encode("Paris")


def test_saved_files_have_the_usual_mode(tiny_dirs, tmp_path):
    """safetensors writes through a 0600 temporary file of its own: the saved weights must not
    keep that mode."""
    from nanorlhf.atomic import FILE_MODE

    src = copy_of(tiny_dirs, tmp_path)
    build_tiny_tokenizer(src)
    out = save_model(load_model(src), tmp_path / "out")
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    # 0644 under umask 022
    assert "model.safetensors" in modes and set(modes.values()) == {FILE_MODE}
