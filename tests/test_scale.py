"""The scale flags: gradient checkpointing changes memory, not gradients; bad flags end in one clear
line."""

import pytest
import torch

import rest_loop
import train_dpo
from nanorlhf import lora
from nanorlhf.fast.packed import PackedLinear, pack_linears
from nanorlhf.checkpoint import load_model
from nanorlhf.step import collate, response_logps
from nanorlhf.errors import UserError
from conftest import randomise_adapters


def prepare(model, lora_rank: int = 0, grad_checkpointing: bool = False, onednn: bool = False):
    """What a script's main() does with --lora-rank, --grad-checkpointing and --onednn."""
    lora.adapt(model, lora_rank, 16.0, ",".join(lora.TARGETS), seed=0)
    model.model.grad_checkpointing = grad_checkpointing
    if onednn:
        pack_linears(model)
    return model


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_grad_checkpointing_gives_the_same_gradients(tiny_chat_model, lora_rank):
    # padded rows
    batch = collate([[5, 6, 7], [8, 9], [10]], [[11, 12], [13, 14, 15, 16], [17, 18, 19]], pad_id=2)
    grads = []
    for checkpointing in (False, True):
        model = load_model(tiny_chat_model).train()
        model = prepare(model, lora_rank, grad_checkpointing=checkpointing)
        randomise_adapters(model)  # with B = 0 the gradient of A would be zero: nothing to compare
        calls = []
        for block in model.model.layers:
            # pre: a recompute stops early
            block.register_forward_pre_hook(lambda *args: calls.append(1))
        (-response_logps(model, batch).sum()).backward()
        # recomputed in backward
        assert len(calls) == (2 if checkpointing else 1) * len(model.model.layers)
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name in grads[0]:
        assert (grads[0][name] - grads[1][name]).abs().max().item() <= 1e-6, name


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_onednn_gives_the_same_gradients_through_its_own_matmuls(tiny_chat_model, lora_rank):
    # --onednn: the same fp32 products, summed in oneDNN's order. Each is off by at most
    # ~(n + 1) 2^-24 of its terms' magnitude (n <= 64 here), compounded over two blocks' few
    # products: ~1e-5 of a gradient's scale. 1e-4 of each tensor's largest entry bounds that; a
    # wrong or missing term moves a gradient by O(1) of it
    batch = collate([[5, 6, 7], [8, 9], [10]], [[11, 12], [13, 14, 15, 16], [17, 18, 19]], pad_id=2)
    grads = []
    for onednn in (False, True):
        torch.manual_seed(0)
        model = prepare(load_model(tiny_chat_model).train(), lora_rank, onednn=onednn)
        randomise_adapters(model)
        assert isinstance(model.lm_head, PackedLinear) == onednn  # packed, or nn.Linear
        (-response_logps(model, batch).sum()).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name in grads[0]:
        scale_ = grads[0][name].abs().max().item()
        assert (grads[0][name] - grads[1][name]).abs().max().item() <= 1e-4 * scale_ + 1e-12, name


def test_no_recomputation_without_gradients(tiny_chat_model):
    model = load_model(tiny_chat_model)
    model.model.grad_checkpointing = True
    calls = []
    model.model.layers[0].register_forward_pre_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        model(torch.tensor([[5, 6, 7]]))
    assert len(calls) == 1  # inference (sampling, reference log-probs) never pays for checkpointing


@pytest.mark.parametrize("flags, message", [
    (["--lora-rank", "-1"], "--lora-rank -1: must be >= 0"),
    (["--lora-rank", "4", "--lora-alpha", "0"], "--lora-alpha 0.0: must be > 0"),
    (["--lora-targets", "q_proj,qv_proj"],
     "--lora-targets 'q_proj,qv_proj': unknown projection 'qv_proj'"),
    (["--lora-targets", ""], "--lora-targets '': unknown projection ''"),
])
@pytest.mark.parametrize("script", [train_dpo, rest_loop])
def test_bad_scale_flags_are_one_line_and_write_nothing(tiny_chat_model, tmp_path, monkeypatch,
                                                        capsys, script,
                                                        flags, message):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr("sys.argv", ["x.py", "--model", str(tiny_chat_model),
                                     "--out-dir", str(tmp_path / "out"), *flags])
    with pytest.raises(SystemExit) as info:
        script.run_cli(script.main)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {message}" or (err.startswith(f"error: {message}") and "\n" not in err)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("script, message", [
    (train_dpo, "--fsdp shards the model over processes: launch with torchrun --nproc_per_node N"),
    (rest_loop, "unrecognized arguments: --fsdp true"),  # rest_loop cannot shard: no such flag
])
def test_fsdp_without_torchrun_says_the_right_thing(tiny_chat_model, tmp_path, monkeypatch, capsys,
                                                   script, message):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr("sys.argv", ["x.py", "--model", str(tiny_chat_model),
                                     "--out-dir", str(tmp_path / "out"),
                                     "--fsdp", "true"])
    with pytest.raises(SystemExit):
        script.run_cli(script.main)
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {message}") and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_onednn_with_fsdp_is_refused(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    refused = "--onednn with --fsdp: FSDP's sharded weights cannot be packed"
    with pytest.raises(UserError, match=refused):
        train_dpo.Config(fsdp=True, onednn=True).check()
