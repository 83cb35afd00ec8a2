"""torchrun: one process per device, each training on its shard of every global batch.

    torchrun --nproc_per_node 2 train_dpo.py --model llama          # DDP: NCCL on GPUs, gloo on CPU
    torchrun --nproc_per_node 8 train_dpo.py --model BIG --fsdp true --save-every 0   # FSDP2

Without torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) nothing here does anything: rank 0
of 1, no process group, the model unwrapped, sums over one rank. Under it, the rules a training
loop follows:

- every rank builds the same global batches (same data, same seeds) and trains on shard() of each;
- a loss is a sum over the rank's shard divided by the *global* count, times world_size(): DDP
  and FSDP average gradients over ranks, so the average is the 1-process gradient of the batch;
- every rank runs the same number of forward/backward passes (a rank with nothing to do gets a
  dummy item and weight 0), or the collectives inside DDP/FSDP would wait for each other forever;
- gradients of an accumulated step are all-reduced on its last backward only (nanoGPT's
  `net.require_backward_grad_sync = last`: an attribute DDP reads, harmless on a plain module);
- only rank 0 prints (print0, bar), writes (run.Run, checkpoint.save_model) and evaluates.

DDP keeps a whole model, its gradients and optimizer state on every device; FSDP
(nanorlhf/fast/fsdp.py) shards them. Clipping and a step's metrics: nanorlhf/step.py.
"""

import atexit
import os

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm


def launched() -> bool:
    """Started by torchrun (or anything that sets its environment variables)?"""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init() -> None:
    """Join torchrun's process group; pin this process to GPU LOCAL_RANK. No-op without torchrun."""
    if not launched() or dist.is_initialized():
        return
    if torch.cuda.is_available():  # so model.device()'s "cuda" is this rank's GPU
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    # left to interpreter teardown, gloo's threads can abort the process after its work is done
    # ("terminate called without an active exception"): leave the group first
    atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())


def print0(*args, **kwargs) -> None:
    """print() on rank 0 only: N ranks would otherwise print every line N times."""
    if is_main():
        print(*args, **kwargs)


def bar(*args, **kwargs) -> tqdm:
    """A tqdm bar shown on rank 0 only (disabled elsewhere, so every rank runs the same code)."""
    return tqdm(*args, disable=not is_main() or kwargs.pop("disable", False), **kwargs)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def shard(items: list) -> tuple[list, bool]:
    """This rank's share of `items` (every world_size-th, from rank()) and whether it is real. A
    rank left with nothing gets items[:1] and False: it must still run forward and backward, with
    its loss times 0."""
    mine = items[rank()::world_size()]
    return (mine, True) if mine or not items else (items[:1], False)


def all_reduce_sum(x: Tensor | float) -> Tensor | float:
    """Σ over ranks of x, a tensor (on x's device) or a number (a CPU tensor); no gradient."""
    if not dist.is_initialized():
        return x
    x = torch.as_tensor(x)
    y = x.detach().to("cuda" if dist.get_backend() == "nccl" else "cpu", copy=True)
    dist.all_reduce(y)
    return y.to(x.device)


def max_over_ranks(n: int) -> int:
    """The largest n of any rank (n without torchrun): e.g. how many forwards every rank runs."""
    if not dist.is_initialized():
        return n
    x = torch.tensor(n, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return int(x)


def broadcast(obj):
    """Rank 0's `obj` (picklable) on every rank: e.g. a list setting how many steps all take."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    nccl = dist.get_backend() == "nccl"
    dist.broadcast_object_list(box, src=0, device=torch.device("cuda") if nccl else None)
    return box[0]


def wrap(model: nn.Module) -> nn.Module:
    """The module to train through: DDP under torchrun, `model` itself otherwise (FSDP instead:
    nanorlhf/fast/fsdp.py). Generate and evaluate with the unwrapped model."""
    if not dist.is_initialized():
        return model
    device = next(model.parameters()).device
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def gathered(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """FSDP's sharded tensors (DTensors) made whole, one at a time onto the CPU; other tensors as
    they are. A collective under FSDP: every rank must call it."""
    return {k: v.full_tensor().cpu() if hasattr(v, "full_tensor") else v for k, v in state.items()}
