"""Run by tests/test_sharded_load.py under torchrun (gloo, CPU): load each MODEL_DIR with
checkpoint.load_model_sharded while recording every read from the safetensors files, and write what
this rank holds to OUT_DIR for the test to check against the files themselves.

    torchrun --nproc_per_node 2 tests/sharded_load_worker.py -- OUT_DIR MODEL_DIR [MODEL_DIR ...]

Per model (index i) and rank r: OUT_DIR/i/rank{r}.safetensors (this rank's local shard of every
parameter), OUT_DIR/i/rank{r}.json (the rows each parameter's shard holds, every read, the most
files open at once, whether the tied head stayed tied), OUT_DIR/i/logits.safetensors (rank 0; the
forward runs on every rank, as FSDP requires), or OUT_DIR/i/error{r}.txt if the load
refused the checkpoint.
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from nanorlhf import checkpoint, distributed
from nanorlhf.fast import fsdp
from nanorlhf.errors import UserError

# --- a recording safe_open: what the loader reads, and how much of each tensor ---

real_safe_open = fsdp.safe_open
log = {"slices": [], "full_reads": [], "open_now": 0, "max_open": 0}


class RecordingSlice:
    def __init__(self, name: str, inner):
        self.name, self.inner = name, inner

    def get_shape(self):
        return self.inner.get_shape()

    def __getitem__(self, index):
        rows = self.inner[index]
        log["slices"].append({"name": self.name, "shape": list(rows.shape)})
        return rows


class RecordingFile:
    def __init__(self, path, framework, **kwargs):
        self.inner = real_safe_open(path, framework, **kwargs)

    def __enter__(self):
        self.inner.__enter__()
        log["open_now"] += 1
        log["max_open"] = max(log["max_open"], log["open_now"])
        return self

    def __exit__(self, *exc):
        log["open_now"] -= 1
        return self.inner.__exit__(*exc)

    def keys(self):
        return self.inner.keys()

    def get_slice(self, name):
        return RecordingSlice(name, self.inner.get_slice(name))

    def get_tensor(self, name):  # a whole tensor: what the sharded path must never need
        log["full_reads"].append(name)
        return self.inner.get_tensor(name)


def refuse_whole_file(*args, **kwargs):
    raise AssertionError("load_model_sharded read a whole safetensors file (load_file)")


def main(out_dir: Path, model_dirs: list[str]) -> None:
    distributed.init()
    fsdp.safe_open, checkpoint.load_file = RecordingFile, refuse_whole_file
    rank = distributed.rank()
    for i, model_dir in enumerate(model_dirs):
        out = out_dir / str(i)
        out.mkdir(parents=True, exist_ok=True)
        log.update(slices=[], full_reads=[], max_open=0)
        try:
            net = fsdp.load_model_sharded(model_dir, "cpu")
        except UserError as e:  # a broken checkpoint: the same one line on every rank
            (out / f"error{rank}.txt").write_text(str(e))
            continue
        shards = {k: p.to_local().contiguous() for k, p in net.named_parameters()}
        rows = {k: [fsdp.local_rows(p).start, fsdp.local_rows(p).stop]
                for k, p in net.named_parameters()}
        ids = torch.randint(0, net.cfg.vocab_size, (2, 9),
                            generator=torch.Generator().manual_seed(0))
        mask = torch.ones_like(ids)
        mask[1, :3] = 0  # a left-padded row too: the padded mask path
        with torch.no_grad():
            logits = net(ids, attention_mask=mask)
        save_file(shards, out / f"rank{rank}.safetensors")
        if rank == 0:
            save_file({"ids": ids, "mask": mask, "logits": logits}, out / "logits.safetensors")
        tied = net.lm_head.weight is net.model.embed_tokens.weight
        info = {**log, "rows": rows, "tied": tied, "params": [k for k, _ in net.named_parameters()]}
        (out / f"rank{rank}.json").write_text(json.dumps(info))

if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
