"""FSDP2 under torchrun (--fsdp true): weights, gradients and optimizer state sharded over
the ranks.

    torchrun --nproc_per_node 8 train_dpo.py --model BIG --fsdp true

DDP (nanorlhf/distributed.py) keeps a whole model, its gradients and optimizer state on every
device. FSDP (torch's fully_shard, one unit per transformer block plus the root) keeps 1/N of each
and gathers a block's weights just before it runs: for a model whose training state does not fit one
device. Such a model is loaded straight into its shards (load_model_sharded), never whole on
any rank.
"""

from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from nanorlhf.checkpoint import (check_names, config_from_hf, read_config, resolve_model,
                                 tensor_files, wrong_shape)
from nanorlhf.model import Block, Transformer


def wrap(model: nn.Module) -> nn.Module:
    """The module to train through under torchrun with --fsdp: FSDP2, in place. Build the optimizer
    after this (FSDP replaces the parameters by sharded ones); every rank must make the same calls.
    A model that is sharded already (load_model_sharded) is returned as it is."""
    return model if isinstance(model, FSDPModule) else shard_model(model)


def shard_model(model: nn.Module) -> nn.Module:
    """FSDP2 in place: one unit per transformer block, then the root. Works on a meta-device model
    too (its shards stay on meta until checkpoint.load_model_sharded fills them in)."""
    for block in [m for m in model.modules() if isinstance(m, Block)]:
        fully_shard(block)  # one unit per block: its weights are gathered only while it runs
    # the root (embeddings, final norm, head) too; it reshards after forward as well, or a no-grad
    # forward (reference log-probs) would leave its whole weights registered in place of the shards
    # the optimizer steps
    return fully_shard(model, reshard_after_forward=True)


def local_rows(param) -> slice:
    """The rows of dim 0 whose values this rank's shard of the FSDP2 parameter `param`
    (a DTensor) holds.

    FSDP2 shards dim 0 as torch.chunk does: ceil(n / N) rows per rank, so the last ranks hold fewer
    (FSDP pads their shard behind the scenes) or none. A parameter of n = 10 rows on N = 4 ranks:
    3, 3, 3, 1."""
    (placement,) = param.placements
    assert placement.is_shard(0), f"expected FSDP's Shard(0), got {placement}"
    n, ranks, me = param.shape[0], param.device_mesh.size(), param.device_mesh.get_local_rank()
    per_rank = -(-n // ranks)  # ceil
    start = min(me * per_rank, n)
    rows = slice(start, min(start + per_rank, n))
    # the local tensor FSDP made must agree, or this reading of its layout is wrong
    assert param.to_local().shape[0] == rows.stop - rows.start, (param.to_local().shape, rows)
    return rows


def load_model_sharded(model: str | Path, device: str | torch.device = "cpu",
                       prepare: Callable[[Transformer], object] | None = None) -> Transformer:
    """Under torchrun with FSDP: a causal LM straight into FSDP2 shards, never whole on any rank.

    The model is built on the meta device (no memory); `prepare` runs on it (LoRA adapters must
    exist before sharding; they are not in the checkpoint and get real values); shard_model shards
    it as wrap would; then every rank reads, file by file, only its own rows of each tensor
    (safetensors' get_slice reads just those bytes) into its shard. Peak memory per rank: its shards
    plus one tensor's rows. Every rank calls it. fp32, like load_model's default.
    """
    if not torch.distributed.is_initialized():
        raise RuntimeError("load_model_sharded needs torchrun's process group: "
                           "call distributed.init() first")
    model_dir = resolve_model(str(model))
    files = tensor_files(model_dir)
    cfg = config_from_hf(read_config(model_dir), set(files), where=str(model_dir / "config.json"))
    with torch.device("meta"):
        # tied: lm_head.weight *is* the embedding, which FSDP then shards once
        net = Transformer(cfg)
    if prepare is not None:
        prepare(net)
    shard_model(net)
    fill_shards(net, model_dir, files, device)
    net.model_dir = model_dir
    return net


@torch.no_grad()
def fill_shards(net: torch.nn.Module, model_dir: Path, files: dict[str, str], device) -> None:
    """Replace each meta-device parameter of the FSDP-sharded `net` by a DTensor holding this rank's
    rows of the checkpoint's tensor, read with get_slice, one file open at a time."""
    where = str(model_dir)
    # a tied head is listed once, as the embedding
    todo = {k: p for k, p in net.named_parameters() if p.is_meta}
    found = {k for k in files if not k.endswith("rotary_emb.inv_freq")}
    if net.cfg.tie_word_embeddings:
        found.discard("lm_head.weight")  # some tied checkpoints store a redundant copy
    check_names(todo, found, where)
    holders = {}  # id(parameter) -> every (module, attribute) holding it: both ends of a tied pair
    for module in net.modules():
        for attr, p in module._parameters.items():
            holders.setdefault(id(p), []).append((module, attr))
    for shard in sorted({files[k] for k in todo}):
        with safe_open(model_dir / shard, "pt") as f:
            for name in [k for k in todo if files[k] == shard]:
                p, source = todo[name], f.get_slice(name)
                if list(source.get_shape()) != list(p.shape):
                    raise wrong_shape(name, source.get_shape(), p.shape, where)
                rows = local_rows(p)
                local = source[rows.start:rows.stop].to(device=device, dtype=p.dtype)
                # the same layout as FSDP's meta shard; FSDP pads it (if dim 0 is uneven) at
                # its first forward
                shard_param = DTensor.from_local(local, p.device_mesh, p.placements,
                                                 run_check=False, shape=p.shape, stride=p.stride())
                new = torch.nn.Parameter(shard_param, requires_grad=p.requires_grad)
                for module, attr in holders[id(p)]:
                    setattr(module, attr, new)
