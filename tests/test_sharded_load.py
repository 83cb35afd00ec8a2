"""checkpoint.load_model_sharded: a sharded safetensors checkpoint straight into FSDP2 shards,
on 2 gloo ranks.

Tiny random Llamas saved by transformers in the published layout (model.safetensors.index.json
+ 6 shards); vocab 129 is odd, so FSDP's row split is uneven (65 + 64 rows, the second shard
padded). The worker (tests/sharded_load_worker.py) records every read; here the files are read again
independently and compared with what each rank holds.
"""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_hf_model
from nanorlhf.checkpoint import load_model
from test_distributed import launch

RANKS = 2
VOCAB = 129  # odd: rank 0 holds rows 0..64 of the embedding, rank 1 rows 65..128


def whole_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a sharded checkpoint, read from the files the index names (not by
    nanorlhf)."""
    weight_map = json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"]
    tensors = {}
    for shard in sorted(set(weight_map.values())):
        tensors.update(load_file(model_dir / shard))
    assert set(tensors) == set(weight_map)
    return tensors


def save_sharded(name: str, path: Path) -> Path:
    make_hf_model(name, vocab_size=VOCAB).save_pretrained(path, max_shard_size="60KB")
    assert len(list(path.glob("model-*-of-*.safetensors"))) >= 3
    return path


def without_tensor(src: Path, dst: Path, name: str) -> Path:
    """A copy of checkpoint `src` whose shards and index no longer hold tensor `name`."""
    shutil.copytree(src, dst)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    shard = index["weight_map"].pop(name)
    save_file({k: v for k, v in load_file(dst / shard).items() if k != name}, dst / shard,
              metadata={"format": "pt"})
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return dst


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """The worker run once over a tied, an untied and a broken checkpoint
    -> (model dirs, its output dir)."""
    root = tmp_path_factory.mktemp("sharded")
    dirs = [save_sharded("llama-gqa-tied", root / "tied"),
            save_sharded("llama-mha-untied", root / "untied")]
    dirs.append(without_tensor(dirs[0], root / "broken", "model.norm.weight"))
    out = root / "out"
    launch("tests/sharded_load_worker.py", [out, *dirs], ranks=RANKS)
    return dirs, out


def rank_output(out: Path, i: int, rank: int) -> tuple[dict, dict[str, torch.Tensor]]:
    """What rank `rank` recorded for model `i`, and its local shards."""
    where = out / str(i)
    return (json.loads((where / f"rank{rank}.json").read_text()),
            load_file(where / f"rank{rank}.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("i, tied", [(0, True), (1, False)], ids=["tied", "untied"])
def test_every_rank_holds_exactly_its_rows(loaded, i, tied):
    dirs, out = loaded
    whole = whole_tensors(dirs[i])
    expected_names = set(whole) - ({"lm_head.weight"} if tied else set())
    covered = {}
    for rank in range(RANKS):
        info, shards = rank_output(out, i, rank)
        assert set(shards) == set(info["params"]) == expected_names
        assert info["tied"] is tied  # a tied head is the embedding's parameter itself, sharded once
        for name, (start, stop) in info["rows"].items():
            assert torch.equal(shards[name], whole[name][start:stop]), (rank, name)
            covered.setdefault(name, []).append((start, stop))
    # torch.chunk's split, by hand: ceil(n / 2) rows on rank 0, the rest on rank 1,
    # every row exactly once
    assert covered["model.embed_tokens.weight"] == [(0, 65), (65, 129)]
    for name, parts in covered.items():
        n = whole[name].shape[0]
        assert parts == [(0, math.ceil(n / 2)), (math.ceil(n / 2), n)], name


@pytest.mark.slow
@pytest.mark.parametrize("i", [0, 1], ids=["tied", "untied"])
def test_sharded_logits_equal_the_whole_model(loaded, i):
    """The ranks all-gather the same fp32 values the whole model holds (checked bitwise above) and
    run the same ops, so the logits may differ only by a kernel's summation order: a dot product of
    n ≤ 96 terms of size ~1 moves by ≤ n·eps ≈ 6e-6 at worst, far below what one wrong row
    would do."""
    dirs, out = loaded
    saved = load_file(out / str(i) / "logits.safetensors")
    with torch.no_grad():
        whole = load_model(dirs[i])(saved["ids"], attention_mask=saved["mask"])
    assert saved["logits"].shape == (2, 9, VOCAB)
    torch.testing.assert_close(saved["logits"], whole, rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("i", [0, 1], ids=["tied", "untied"])
def test_no_rank_reads_a_whole_tensor(loaded, i):
    """Each tensor is read once per rank, as that rank's rows only, one file open at a time."""
    dirs, out = loaded
    whole = whole_tensors(dirs[i])
    for rank in range(RANKS):
        info, _ = rank_output(out, i, rank)
        assert info["full_reads"] == []  # no get_tensor (and the worker made load_file raise)
        assert info["max_open"] == 1
        reads = {r["name"]: r["shape"] for r in info["slices"]}
        assert len(reads) == len(info["slices"]) and set(reads) == set(info["rows"])
        for name, shape in reads.items():
            start, stop = info["rows"][name]
            assert shape == [stop - start, *whole[name].shape[1:]]
            assert shape[0] <= math.ceil(whole[name].shape[0] / RANKS) < whole[name].shape[0]


@pytest.mark.slow
def test_a_missing_tensor_is_one_line_on_every_rank(loaded):
    dirs, out = loaded
    for rank in range(RANKS):
        assert not (out / "2" / f"rank{rank}.json").exists()
        message = (out / "2" / f"error{rank}.txt").read_text()
        assert message == f"{dirs[2]}: missing tensor model.norm.weight"


def test_train_ilql_shards_only_a_frozen_lm(monkeypatch):
    """--fsdp loads ILQL's frozen LM sharded; a trained one would change the output matrix the
    heads read."""
    import train_ilql
    from nanorlhf.errors import UserError

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    train_ilql.Config(fsdp=True).check()  # the default: frozen LM
    with pytest.raises(UserError, match="--fsdp shards a frozen LM only"):
        train_ilql.Config(fsdp=True, train_lm=True).check()
