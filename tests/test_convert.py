"""python tools/convert.py: tiny checkpoints in the published pickle layouts -> safetensors, checked
against transformers (the UltraRM card's own class) and sentencepiece, plus every way the input can
be wrong.

The UltraRM layout is openbmb/UltraRM-13b's: pytorch_model-0000N-of-0000M.bin shards +
pytorch_model.bin.index.json, keys model.* and regression_head.weight, config.json architectures
["LlamaRewardModel"], a Llama sentencepiece tokenizer.model (BPE, byte fallback, <unk> <s> </s> at
ids 0 1 2). No hub: everything is written here.
"""

import hashlib
import json
import pickle
import re
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file
from torch import nn

from tools import convert
from nanorlhf.checkpoint import load_model
from nanorlhf.errors import UserError, run_cli
from nanorlhf.reward import load_reward_model, make_gold_scorer, pair_ids, score_texts
from nanorlhf.tokenizer import Tokenizer

sentencepiece = pytest.importorskip("sentencepiece")
REPO = Path(__file__).resolve().parents[1]

# digits, accents, CJK, runs of spaces / tabs / newlines, emoji and a snowman (not in the training
# text: byte fallback), a leading space
MIXED = " 12345 + 6.78 = 12351.78\n\n\tnaïve   café, 東京 — Ünïcödé?  🦄🎉☃  x\t\ty  "
# openbmb/UltraRM-13b's model card, "Usage":
#     ultrarm_template = """Human: {instruction}\n\nAssistant: {completion}"""
CARD_TEMPLATE = "Human: {instruction}\n\nAssistant: {completion}"
PROMPTS = ["What is 2 + 2?", "Write a haiku about   the sea.", "東京 or Paris?"]
RESPONSES = ["4.", "Waves fold into foam,\nsalt wind 🦄 over the dunes,\tthe tide keeps its time.",
             "Paris"]


class LlamaRewardModel(transformers.LlamaPreTrainedModel):
    """The class on openbmb/UltraRM-13b's model card: LlamaModel + a bias-free Linear(H, 1) head,
    each row's reward gathered at attention_mask.cumsum(1).argmax(1), its last real token."""

    def __init__(self, config):
        super().__init__(config)
        self.model = transformers.LlamaModel(config)
        self.regression_head = nn.Linear(config.hidden_size, 1, bias=False)
        self.post_init()

    def forward(self, input_ids, attention_mask):
        hidden_states = self.model(input_ids, attention_mask=attention_mask)[0]
        rewards = self.regression_head(hidden_states).squeeze(-1)
        ends = attention_mask.cumsum(dim=1).argmax(dim=1).view(-1, 1)
        return torch.gather(rewards, 1, ends)


def train_llama_spm(out_dir: Path) -> "sentencepiece.SentencePieceProcessor":
    """A Llama-style sentencepiece model: BPE, byte fallback, digits split, identity normalisation,
    whitespace kept, <unk> <s> </s> = 0 1 2, no pad."""
    lines = [f"Human: what is {i} + {i * 7}? Assistant: the quick brown fox jumps over {i * 37} "
             "lazy dogs."
             for i in range(150)]
    lines += ["naïve café, 東京 and Ünïcödé words — a poem about the sea, salt wind, waves and "
              "foam."] * 20
    (out_dir / "corpus.txt").write_text("\n".join(lines))
    sentencepiece.SentencePieceTrainer.train(
        input=str(out_dir / "corpus.txt"), model_prefix=str(out_dir / "tokenizer"), vocab_size=400,
        model_type="bpe", byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, allow_whitespace_only_pieces=True,
        character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    (out_dir / "corpus.txt").unlink()
    (out_dir / "tokenizer.vocab").unlink()
    return sentencepiece.SentencePieceProcessor(model_file=str(out_dir / "tokenizer.model"))


def write_ultrarm(src: Path, seed: int = 0) -> LlamaRewardModel:
    """UltraRM's published layout, tiny: two torch.save shards + index, config.json, tokenizer.model
    + configs."""
    src.mkdir(parents=True, exist_ok=True)
    sp = train_llama_spm(src)
    cfg = transformers.LlamaConfig(vocab_size=sp.get_piece_size(), hidden_size=64,
                                   intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=256,
                                   rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                                   pad_token_id=None)
    torch.manual_seed(seed)
    model = LlamaRewardModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
        model.regression_head.weight.mul_(20)  # scores of order 1: the tolerance below matters
    state = model.state_dict()
    names = list(state)
    shards = {"pytorch_model-00001-of-00002.bin": names[:len(names) // 2],
              "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
    for shard, keys in shards.items():
        torch.save({k: state[k] for k in keys}, src / shard)
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
             "weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (src / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    (src / "config.json").write_text(json.dumps({**cfg.to_dict(),
                                                 "architectures": ["LlamaRewardModel"]}))
    (src / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
        "pad_token": None,
        "bos_token": {"content": "<s>", "lstrip": False, "normalized": True, "rstrip": False,
                      "single_word": False},
        "eos_token": "</s>", "unk_token": "<unk>",
        "model_max_length": 1000000000000000019884624838656}))
    (src / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<s>",
                                                             "eos_token": "</s>",
                                                             "unk_token": "<unk>"}))
    (src / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return model


@pytest.fixture(scope="module")
def ultrarm(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("ultrarm")
    model = write_ultrarm(root / "src")
    convert.convert(root / "src", root / "dst")
    sp = sentencepiece.SentencePieceProcessor(model_file=str(root / "src" / "tokenizer.model"))
    return {"src": root / "src", "dst": root / "dst", "model": model, "sp": sp}


def card_rows(sp, prompts, responses) -> list[list[int]]:
    """The card's inputs: tokenizer(ultrarm_template.format(...)) = BOS + sentencepiece ids, no
    EOS."""
    return [[sp.bos_id()] + sp.encode(CARD_TEMPLATE.format(instruction=p, completion=r))
            for p, r in zip(prompts, responses)]


def card_scores(model, rows: list[list[int]], dtype=torch.float32) -> list[float]:
    """The card's class on right-padded rows (pad id 0, masked), in `dtype`."""
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    with torch.no_grad():
        return model.to(dtype)(ids, mask).squeeze(-1).tolist()


# ---- UltraRM, end to end ------------------------------------------------------------------------

def test_ultrarm_layout_converts_and_scores_like_the_card(ultrarm):
    dst, sp = ultrarm["dst"], ultrarm["sp"]
    assert sorted(p.name for p in dst.glob("*.safetensors")) == ["model-00001-of-00002.safetensors",
                                                                 "model-00002-of-00002.safetensors"]
    rm = load_reward_model(dst).eval()
    assert rm.head_name == "regression_head" and rm.template == "ultrarm"
    tok = Tokenizer(dst)
    rows = card_rows(sp, PROMPTS, RESPONSES)
    # BOS once, no EOS
    assert [pair_ids(tok, p, r, "ultrarm")[0] for p, r in zip(PROMPTS, RESPONSES)] == rows
    assert len(set(map(len, rows))) == 3  # every batch below is padded
    ours = score_texts(rm, tok, PROMPTS, RESPONSES, batch_size=3)
    alone = [score_texts(rm, tok, [p], [r], batch_size=1)[0] for p, r in zip(PROMPTS, RESPONSES)]
    theirs = card_scores(ultrarm["model"], rows)
    truth = card_scores(ultrarm["model"], rows, torch.float64)
    # fp32 (eps 1.2e-7): a score is 2 layers of 64-wide dot products and softmax sums over <= 64
    # positions, some 500 roundings of unit-scale terms in all, so two fp32 orders of the same sum
    # differ by at most ~500·eps·max(1, |s|) = 6e-5·max(1, |s|); the assertion allows 1e-4·max(1,
    # |s|). The scores are of order 1.
    tol = [1e-4 * max(1.0, abs(t)) for t in truth]
    assert max(map(abs, truth)) > 0.3  # the head is not ~0: a wrong token would show
    for got in (ours, alone, theirs):
        assert all(abs(g - t) <= e for g, t, e in zip(got, truth, tol)), (got, truth)
    # what --gold rm:DST / --fitness rm:DST build: the same template, chosen from the checkpoint
    assert (make_gold_scorer(f"rm:{dst}", batch_size=2).score(PROMPTS, RESPONSES)
            == pytest.approx(ours, abs=1e-5))


def test_converted_ultrarm_loads_in_transformers(ultrarm):
    """The written safetensors shards + index are what transformers' from_pretrained reads."""
    model = LlamaRewardModel.from_pretrained(ultrarm["dst"]).eval()
    rows = card_rows(ultrarm["sp"], PROMPTS, RESPONSES)
    assert card_scores(model, rows) == card_scores(ultrarm["model"], rows)
    original = ultrarm["model"].float().state_dict()
    for name, t in model.state_dict().items():
        assert torch.equal(t, original[name]), name


def test_converted_tokenizer_encodes_like_sentencepiece(ultrarm):
    tok, sp = Tokenizer(ultrarm["dst"]), ultrarm["sp"]
    assert tok.encode(MIXED) == sp.encode(MIXED)
    assert any(sp.is_byte(i) for i in sp.encode(MIXED))  # the emoji went through byte fallback
    for text in PROMPTS + RESPONSES + ["", " ", "  two", "\n", "x" * 50]:
        assert tok.encode(text) == sp.encode(text), text
    assert tok.decode(sp.encode(MIXED)) == sp.decode(sp.encode(MIXED))
    assert tok.bos_id == sp.bos_id() == 1 and tok.eos_id == sp.eos_id() == 2


def test_files_are_copied_and_checksummed(ultrarm, capsys):
    src, dst = ultrarm["src"], ultrarm["dst"]
    names = {p.name for p in dst.iterdir()}
    assert {"config.json", "tokenizer_config.json", "special_tokens_map.json",
            "generation_config.json", "tokenizer.model", "tokenizer.json",
            "model.safetensors.index.json", "CHECKSUMS"} <= names
    assert not any(n.endswith(".bin") or n == "pytorch_model.bin.index.json" for n in names)
    for name in ("config.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (dst / name).read_bytes() == (src / name).read_bytes()
    lines = (dst / "CHECKSUMS").read_text().splitlines()
    listed = {}
    for line in lines:  # `sha256sum -c` format: 64 hex digits, two spaces, the file name
        digest, name = re.fullmatch(r"([0-9a-f]{64})  (\S+)", line).groups()
        listed[name] = digest
    assert set(listed) == names - {"CHECKSUMS"}
    for name, digest in listed.items():
        assert hashlib.sha256((dst / name).read_bytes()).hexdigest() == digest
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    state = ultrarm["model"].state_dict()
    assert set(index["weight_map"]) == set(state)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size()
                                                  for t in state.values())
    # and printed: run again into a fresh directory
    convert.convert(src, dst.with_name("again"))
    out = capsys.readouterr().out
    assert all(line in out for line in lines)
    again = (dst.with_name("again") / "CHECKSUMS").read_text()
    # deterministic: the same input gives the same bytes
    assert again == (dst / "CHECKSUMS").read_text()


# ---- tied, shared and non-contiguous tensors ----------------------------------------------------

def test_shared_and_non_contiguous_tensors_are_written_whole(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    emb = torch.randn(10, 4)
    fused = torch.randn(12, 4)
    state = {"model.embed_tokens.weight": emb, "lm_head.weight": emb,  # tied: one storage
             "q.weight": fused[:4], "k.weight": fused[4:8], "v.weight": fused[8:],  # views of one
             "t.weight": torch.randn(4, 6).t(), "scalar": torch.tensor(3.0),
             "empty": torch.zeros(0),
             "half": torch.randn(3, dtype=torch.float16), "ids": torch.arange(5)}
    torch.save(state, src / "pytorch_model.bin")
    (src / "config.json").write_text("{}")
    convert.convert(src, tmp_path / "dst")
    loaded = load_file(tmp_path / "dst" / "model.safetensors")
    assert set(loaded) == set(state)
    for name, t in state.items():
        assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t), name


def test_legacy_torch_save_format_converts(tmp_path):
    """Files from torch < 1.6 are not zip archives: they cannot be mmap'd and are read whole, still
    restricted."""
    (tmp_path / "src").mkdir()
    state = {"w": torch.randn(3, 2), "b": torch.arange(4)}
    torch.save(state, tmp_path / "src" / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    (tmp_path / "src" / "config.json").write_text("{}")
    convert.convert(tmp_path / "src", tmp_path / "dst")
    loaded = load_file(tmp_path / "dst" / "model.safetensors")
    assert all(torch.equal(loaded[k], v) for k, v in state.items()) and set(loaded) == set(state)


def test_tokenizer_that_does_not_encode_like_sentencepiece_is_not_written(sharded_src, capsys):
    """A sentencepiece model that collapses runs of spaces (nmt_nfkc, remove_extra_whitespaces: the
    trainer's defaults, not Llama's): the Llama conversion keeps them, the check against
    sentencepiece catches it."""
    (sharded_src / "corpus.txt").write_text("\n".join(f"the quick brown fox {i} jumps"
                                                      for i in range(100)))
    sentencepiece.SentencePieceTrainer.train(input=str(sharded_src / "corpus.txt"),
                                             model_prefix=str(sharded_src / "tokenizer"),
                                             vocab_size=60, model_type="bpe", unk_id=0, bos_id=1,
                                             eos_id=2, minloglevel=2)
    config = {"tokenizer_class": "LlamaTokenizer"}
    (sharded_src / "tokenizer_config.json").write_text(json.dumps(config))
    err = cli_error([sharded_src, sharded_src.parent / "dst"], capsys)
    assert ("tokenizer.model: the converted tokenizer encodes a test text differently from "
            "sentencepiece") in err
    assert nothing_written(sharded_src.parent / "dst")


# ---- pickle is opened by the converter only, and only through the restricted unpickler ----------

class MarkerOnUnpickle:
    """Unpickling this calls open(marker, 'w'): the file appears if any unrestricted unpickler
    ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def cli_error(argv: list[str], capsys) -> str:
    """Run `python tools/convert.py ARGV` in-process; -> its one-line error (exit status 2)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        run_cli(lambda: convert.main([str(a) for a in argv]))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def nothing_written(dst: Path) -> bool:
    return not dst.exists() and not list(dst.parent.glob(dst.name + ".*"))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path, capsys, writer):
    src, dst, marker = tmp_path / "src", tmp_path / "dst", tmp_path / "marker"
    src.mkdir()
    (src / "config.json").write_text("{}")
    payload = {"model.embed_tokens.weight": torch.zeros(2, 2), "evil": MarkerOnUnpickle(marker)}
    if writer == "torch.save":
        torch.save(payload, src / "pytorch_model.bin")
    else:
        with open(src / "pytorch_model.bin", "wb") as f:
            pickle.dump(payload, f)
    err = cli_error([src, dst], capsys)
    assert "pytorch_model.bin: refused: it holds more than tensors" in err
    if writer == "torch.save":  # the restricted unpickler names what it refused to call
        assert "Unsupported global: GLOBAL io.open" in err
    assert not marker.exists() and nothing_written(dst)


def test_load_paths_never_unpickle(ultrarm, tmp_path, monkeypatch):
    """Every loader runs with torch.load and pickle's loaders made to fail; a pickle-only directory
    is refused with a line that names the converter."""
    def refuse(*args, **kwargs):
        raise AssertionError("a loader unpickled")

    for module, name in ((torch, "load"), (pickle, "load"), (pickle, "loads"),
                         (pickle, "Unpickler")):
        monkeypatch.setattr(module, name, refuse)
    dst = ultrarm["dst"]
    assert load_reward_model(dst).template == "ultrarm"
    Tokenizer(dst)
    make_gold_scorer(f"rm:{dst}").score(PROMPTS[:1], RESPONSES[:1])
    lm_dir = tmp_path / "lm"  # a causal LM from the same shards, lm_head dropped (tied)
    lm_dir.mkdir()
    for p in dst.iterdir():
        (lm_dir / p.name).write_bytes(p.read_bytes())
    config = json.loads((lm_dir / "config.json").read_text())
    (lm_dir / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    with pytest.raises(UserError, match="unexpected tensor regression_head.weight"):
        load_model(lm_dir)  # read (safetensors) and checked, never unpickled
    for loader in (load_model, load_reward_model):
        with pytest.raises(UserError, match=r"python tools/convert\.py .* DST"):
            loader(ultrarm["src"])


def test_only_the_converter_calls_torch_load():
    """A grep over the package and the scripts: torch.load and pickle's loaders appear in
    tools/convert.py only."""
    pattern = re.compile(r"torch\.load\b|\bpickle\.(load|loads|Unpickler)\b"
                         r"|\bload\(.*weights_only|\bmmap=True")
    folders = (REPO, REPO / "nanorlhf", REPO / "nanorlhf" / "tasks", REPO / "nanorlhf" / "fast",
               REPO / "tools", REPO / "experiments", REPO / "bench")
    sources = [p for folder in folders for p in sorted(folder.glob("*.py"))]
    users = {str(p.relative_to(REPO)) for p in sources if pattern.search(p.read_text())}
    assert users == {"tools/convert.py"}


# ---- bad input: one line each, nothing half-written ---------------------------------------------

def test_missing_src(tmp_path, capsys):
    assert "no such directory" in cli_error([tmp_path / "nope", tmp_path / "dst"], capsys)
    assert nothing_written(tmp_path / "dst")


def test_src_without_weights(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text("{}")
    # a pickle, but not weights
    (tmp_path / "src" / "training_args.bin").write_bytes(b"\x80\x04 not weights")
    assert "no weights to convert" in cli_error([tmp_path / "src", tmp_path / "dst"], capsys)
    assert nothing_written(tmp_path / "dst")


def test_src_without_config(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    torch.save({"w": torch.zeros(1)}, tmp_path / "src" / "pytorch_model.bin")
    assert "no config.json" in cli_error([tmp_path / "src", tmp_path / "dst"], capsys)
    assert nothing_written(tmp_path / "dst")


@pytest.fixture
def sharded_src(tmp_path) -> Path:
    """Two tiny .bin shards and their index, no tokenizer."""
    src = tmp_path / "src"
    src.mkdir()
    torch.save({"a": torch.ones(2)}, src / "pytorch_model-00001-of-00002.bin")
    torch.save({"b": torch.zeros(3)}, src / "pytorch_model-00002-of-00002.bin")
    (src / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {
        "a": "pytorch_model-00001-of-00002.bin", "b": "pytorch_model-00002-of-00002.bin"}}))
    (src / "config.json").write_text("{}")
    return src


@pytest.mark.parametrize("index, expected", [
    ("{not json", "not valid JSON"),
    ('{"metadata": {}}', "weight_map"),
    ('{"weight_map": {"a": 3}}', "weight_map"),
    ('{"weight_map": {"a": "../elsewhere.bin"}}', "not a file name inside"),
])
def test_malformed_index(sharded_src, capsys, index, expected):
    (sharded_src / "pytorch_model.bin.index.json").write_text(index)
    err = cli_error([sharded_src, sharded_src.parent / "dst"], capsys)
    assert "pytorch_model.bin.index.json" in err and expected in err
    assert nothing_written(sharded_src.parent / "dst")


def test_missing_shard(sharded_src, capsys):
    (sharded_src / "pytorch_model-00002-of-00002.bin").unlink()
    err = cli_error([sharded_src, sharded_src.parent / "dst"], capsys)
    assert ("shard pytorch_model-00002-of-00002.bin listed in pytorch_model.bin.index.json is "
            "missing") in err
    assert nothing_written(sharded_src.parent / "dst")


def test_shard_without_the_tensor_its_index_names(sharded_src, capsys):
    torch.save({"c": torch.ones(2)}, sharded_src / "pytorch_model-00002-of-00002.bin")
    err = cli_error([sharded_src, sharded_src.parent / "dst"], capsys)
    assert "pytorch_model-00002-of-00002.bin: has no tensor b" in err
    assert nothing_written(sharded_src.parent / "dst")


def test_truncated_shard(sharded_src, capsys):
    data = (sharded_src / "pytorch_model-00002-of-00002.bin").read_bytes()
    (sharded_src / "pytorch_model-00002-of-00002.bin").write_bytes(data[:len(data) // 2])
    err = cli_error([sharded_src, sharded_src.parent / "dst"], capsys)
    assert "pytorch_model-00002-of-00002.bin: not a readable torch.save file" in err
    assert nothing_written(sharded_src.parent / "dst")


def test_not_a_state_dict(sharded_src, capsys):
    torch.save({"model": {"b": torch.zeros(3)}}, sharded_src / "pytorch_model-00002-of-00002.bin")
    assert "flat {name: tensor} state dict" in cli_error([sharded_src, sharded_src.parent / "dst"],
                                                         capsys)
    assert nothing_written(sharded_src.parent / "dst")


def test_dst_exists(sharded_src, capsys):
    dst = sharded_src.parent / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    assert "exists and is not empty (--force true replaces it)" in cli_error([sharded_src, dst],
                                                                             capsys)
    assert ((dst / "keep.txt").read_text() == "mine"
            and [p.name for p in dst.iterdir()] == ["keep.txt"])
    (sharded_src.parent / "file").write_text("")
    assert "exists and is a file" in cli_error([sharded_src, sharded_src.parent / "file"], capsys)
    assert "must be outside SRC" in cli_error([sharded_src, sharded_src / "out"], capsys)
    convert.main([str(sharded_src), str(dst), "--force", "true"])  # --force true replaces it, whole
    assert sorted(p.name for p in dst.iterdir()) == ["CHECKSUMS", "config.json",
                                                     "model-00001-of-00002.safetensors",
                                                     "model-00002-of-00002.safetensors",
                                                     "model.safetensors.index.json"]
    assert load_file(dst / "model-00002-of-00002.safetensors")["b"].tolist() == [0.0, 0.0, 0.0]
    assert not list(dst.parent.glob("dst.*"))
    empty = sharded_src.parent / "empty"
    empty.mkdir()
    convert.main([str(sharded_src), str(empty)])  # an empty DST is simply filled
    assert (empty / "model.safetensors.index.json").is_file()


def test_failure_after_writing_leaves_nothing(sharded_src, monkeypatch):
    """A crash late in the conversion (here: while checksumming) leaves neither DST nor a temporary
    sibling."""
    def crash(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert, "sha256", crash)
    with pytest.raises(KeyboardInterrupt):
        convert.convert(sharded_src, sharded_src.parent / "dst")
    assert nothing_written(sharded_src.parent / "dst")


# ---- DeBERTa: spm.model + pytorch_model.bin (OpenAssistant's layout) ----------------------------

def test_deberta_pickle_and_spm_convert_and_score_like_transformers(tmp_path):
    from test_deberta import ANSWERS, QUESTIONS, V3, make_hf_deberta, write_spm_tokenizer

    ref = tmp_path / "ref"  # transformers' own tokenizer (built from the same pieces) and the model
    ref.mkdir()
    hf_tok = write_spm_tokenizer(ref)
    hf = make_hf_deberta(**V3, vocab_size=len(hf_tok), max_position_embeddings=512)
    src = tmp_path / "src"  # the published layout: pickle weights, spm.model, no tokenizer.json
    src.mkdir()
    torch.save(hf.state_dict(), src / "pytorch_model.bin")
    hf.config.to_json_file(src / "config.json")
    (src / "spm.model").write_bytes((ref / "spm.model").read_bytes())
    (src / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "DebertaV2Tokenizer",
                                                           "do_lower_case": False,
                                                           "vocab_type": "spm"}))
    convert.convert(src, tmp_path / "dst")
    tok = Tokenizer(tmp_path / "dst")
    sp = sentencepiece.SentencePieceProcessor(model_file=str(src / "spm.model"))
    assert tok.encode(MIXED) == sp.encode(MIXED)
    scorer = make_gold_scorer(f"rm:{tmp_path / 'dst'}", batch_size=2)
    assert scorer.rm.template == "pair"
    with torch.no_grad():  # OpenAssistant's card: tokenizer(question, answer); the logit: score
        expected = [hf(**hf_tok(q, a, return_tensors="pt")).logits[0, 0].item()
                    for q, a in zip(QUESTIONS, ANSWERS)]
    assert scorer.score(QUESTIONS, ANSWERS) == pytest.approx(expected, abs=1e-4)


def test_unknown_tokenizer_class_is_refused(sharded_src, capsys):
    train_llama_spm(sharded_src)
    config = {"tokenizer_class": "T5Tokenizer"}
    (sharded_src / "tokenizer_config.json").write_text(json.dumps(config))
    err = cli_error([sharded_src, sharded_src.parent / "dst"], capsys)
    assert "tokenizer.model: cannot convert a sentencepiece tokenizer of class 'T5Tokenizer'" in err
    assert nothing_written(sharded_src.parent / "dst")
