"""The DeBERTa-v2/v3 reward model against transformers' DebertaV2ForSequenceClassification (the
oracle).

Tolerance: tiny fp32 models (hidden 32, 2 layers) whose scores are O(1); the two implementations
differ only in summation order (q·k/scale vs q·(k/scale), fused vs unfused matmuls), a few fp32 ulps
per op, so differences are ~1e-7 and 1e-4 leaves three orders of magnitude for other CPUs' BLAS
kernels. A swapped relative-position index (δ(j,i) for δ(i,j) in p2c) moves these scores by ~5e-2,
so 1e-4 catches it.
"""

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from nanorlhf.deberta import DebertaRewardModel, encode_pairs, log_bucket_position
from nanorlhf.errors import UserError
from nanorlhf.reward import load_reward_model, make_gold_scorer, score_texts
from nanorlhf.tokenizer import Tokenizer

# reward-model-deberta-v3-large's
V3 = dict(relative_attention=True, position_biased_input=False, pos_att_type="p2c|c2p",
          position_buckets=8, share_att_key=True, norm_rel_ebd="layer_norm",
          max_relative_positions=-1)
CONFIGS = {
    "v3": V3,
    "c2p-list-no-buckets": dict(relative_attention=True, pos_att_type=["c2p"], position_buckets=-1,
                                max_relative_positions=6, share_att_key=False),
    "p2c-string-buckets-0": dict(relative_attention=True, pos_att_type="p2c", position_buckets=0,
                                 max_relative_positions=6, share_att_key=False),
    "both-list-256-token-types": dict(relative_attention=True, pos_att_type=["p2c", "c2p"],
                                      position_buckets=256, share_att_key=False,
                                      type_vocab_size=2),
    "c2p-shared-key": dict(relative_attention=True, pos_att_type="c2p", position_buckets=8,
                           share_att_key=True),
    "p2c-shared-key": dict(relative_attention=True, pos_att_type=["p2c"], position_buckets=8,
                           share_att_key=True, position_biased_input=False),
    # without relative attention the scale still counts the pos_att_type terms, as transformers'
    # does
    "no-relative-attention": dict(relative_attention=False, pos_att_type="c2p|p2c",
                                  type_vocab_size=2),
    "embedding-proj": dict(V3, embedding_size=16, hidden_act="gelu_new", pooler_hidden_act="tanh"),
    "conv": dict(V3, conv_kernel_size=3, conv_groups=2, conv_act="gelu"),
}
VOCAB = 100


def make_hf_deberta(seed: int = 0, **extra) -> transformers.DebertaV2ForSequenceClassification:
    cfg = transformers.DebertaV2Config(**{**dict(vocab_size=VOCAB, hidden_size=32,
                                                 intermediate_size=48, num_hidden_layers=2,
                                                 num_attention_heads=4, max_position_embeddings=64,
                                                 num_labels=1), **extra})
    torch.manual_seed(seed)
    model = transformers.DebertaV2ForSequenceClassification(cfg).eval()
    # weights large enough that every term moves the score; random biases and norms
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0, 0.2 if "embeddings" in name else p.shape[1] ** -0.5)
            else:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="module")
def rm_dirs(tmp_path_factory) -> dict:
    out = {}
    for name, extra in CONFIGS.items():
        path = tmp_path_factory.mktemp(name)
        make_hf_deberta(**extra).save_pretrained(path)
        out[name] = path
    return out


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """3 right-padded rows of 40, 25 and 7 tokens (40 > 8 buckets / 2: log-bucketed distances
    occur)."""
    ids = torch.randint(4, VOCAB, (3, 40), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 25:], mask[2, 7:] = 0, 0
    types = torch.zeros_like(ids)
    types[:, 10:] = 1
    return ids, types, mask


@pytest.mark.parametrize("name", CONFIGS)
def test_scores_match_transformers(rm_dirs, name):
    hf = transformers.DebertaV2ForSequenceClassification.from_pretrained(rm_dirs[name]).eval()
    rm = load_reward_model(rm_dirs[name])
    assert isinstance(rm, DebertaRewardModel)
    ids, types, mask = batch()
    with torch.no_grad():
        expected = hf(input_ids=ids, token_type_ids=types, attention_mask=mask).logits.squeeze(-1)
        got = rm(ids, types, mask)
    assert expected.std() > 0.05  # rows differ: the scores depend on the input
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["v3", "both-list-256-token-types", "conv",
                                  "no-relative-attention"])
def test_padded_rows_equal_rows_alone(rm_dirs, name):
    rm = load_reward_model(rm_dirs[name])
    ids, types, mask = batch()
    with torch.no_grad():
        padded = rm(ids, types, mask)
        alone = torch.cat([rm(ids[i:i + 1, :n], types[i:i + 1, :n])
                           for i, n in enumerate(mask.sum(1).tolist())])
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=0)


def test_bf16_weights_under_autocast_stay_close(rm_dirs):
    """RMScorer on CUDA: bf16 weights, bf16 autocast (run here on the CPU's autocast). bf16 keeps 8
    bits, so each rounding is ~4e-3 relative; two layers of them move O(1) scores by ~1e-2 (measured
    5e-3..1.3e-2). 0.05 is well under the 0.2+ spread between rows, so a broken dtype path (say, a
    mask in the wrong dtype) still shows."""
    ids, types, mask = batch()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = load_reward_model(rm_dirs["v3"], dtype=torch.bfloat16)(ids, types, mask)
    with torch.no_grad():
        expected = load_reward_model(rm_dirs["v3"])(ids, types, mask)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=0.05, rtol=0)


def test_log_bucket_positions_by_hand():
    # buckets 8 (mid 4), max_position 64: |d| <= 4 exact; else
    # ceil(ln(|d|/4) / ln(63/4) · 3) + 4, signed.
    # d=5: ln 1.25 / ln 15.75 · 3 = 0.243 -> 5;  d=10: 0.997 -> 5;  d=11: 1.101 -> 6;
    # d=30: 2.193 -> 7
    rel = torch.tensor([-30, -11, -5, -4, -3, 0, 3, 4, 5, 10, 11, 30])
    expected = [-7, -6, -5, -4, -3, 0, 3, 4, 5, 5, 6, 7]
    assert log_bucket_position(rel, 8, 64).tolist() == expected


def write_spm_tokenizer(out_dir) -> transformers.PreTrainedTokenizerBase:
    """A DeBERTa-v3-style tokenizer: a unigram sentencepiece model trained here on a small text (ids
    0-3: [PAD] [CLS] [SEP] [UNK], as Microsoft's spm.model), turned into transformers'
    DebertaV2TokenizerFast, which writes tokenizer.json with the [CLS] A [SEP] B [SEP]
    post-processor."""
    spm = pytest.importorskip("sentencepiece")
    words = ("the quick brown fox jumps over lazy dog what is capital of france paris city river "
             "poem").split()
    lines = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(8)) + f" {i} {i * 37}."
             for i in range(300)]
    lines += ["Ünïcödé wörds, naïve café, 東京 — 3.14 and 2718.",
              "What is the capital of France? Paris."] * 20
    (out_dir / "corpus.txt").write_text("\n".join(lines))
    spm.SentencePieceTrainer.train(input=str(out_dir / "corpus.txt"),
                                   model_prefix=str(out_dir / "spm"), vocab_size=150, pad_id=0,
                                   pad_piece="[PAD]", bos_id=1, bos_piece="[CLS]", eos_id=2,
                                   eos_piece="[SEP]", unk_id=3, unk_piece="[UNK]", minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(out_dir / "spm.model"))
    # transformers 5 reads spm.model only through protobuf (not installed here); these pieces and
    # scores are exactly what its SentencePieceExtractor would take from the model
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    tok = transformers.DebertaV2TokenizerFast(vocab=vocab)
    tok.save_pretrained(out_dir)
    return tok


QUESTIONS = ["What is the capital of France?", "Write a poem about   the river\tand 3.14 cafés.",
             "東京?"]
ANSWERS = ["Paris.", "The quick brown fox, 2718 times — naïve!",
           "A city of 12 rivers and a long, long answer."]


def test_pair_encoding_equals_transformers(tmp_path):
    hf_tok = write_spm_tokenizer(tmp_path)
    ids, types, mask = encode_pairs(Tokenizer(tmp_path), QUESTIONS, ANSWERS, max_len=512)
    expected = hf_tok(QUESTIONS, ANSWERS, padding=True, return_tensors="pt")
    assert ids.tolist() == expected["input_ids"].tolist()
    assert types.tolist() == expected["token_type_ids"].tolist()
    assert mask.tolist() == expected["attention_mask"].tolist()
    assert types[0].sum() > 0 and ids[0, 0] == hf_tok.cls_token_id  # two segments, [CLS] first
    # and like sentencepiece itself on plain text: [CLS] q [SEP] a [SEP]
    import sentencepiece
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "spm.model"))
    q, a = sp.encode(QUESTIONS[0]), sp.encode(ANSWERS[0])
    assert ids[0, :len(q) + len(a) + 3].tolist() == [1] + q + [2] + a + [2]


def test_long_pair_is_cut_to_max_len(tmp_path):
    write_spm_tokenizer(tmp_path)
    tok = Tokenizer(tmp_path)
    q, a = tok.encode(" ".join(QUESTIONS * 3)), tok.encode(" ".join(ANSWERS * 3))
    ids, types, mask = encode_pairs(tok, [" ".join(QUESTIONS * 3)], [" ".join(ANSWERS * 3)],
                                    max_len=30)
    # budget 27 = 30 - 3 specials: the answer keeps its first 16 tokens, the question its last 11
    assert ids[0].tolist() == [1] + q[-11:] + [2] + a[:16] + [2]
    assert types[0].tolist() == [0] * 13 + [1] * 17 and mask.sum() == 30


def test_tokenizer_without_pair_template_is_refused(tmp_path):
    write_spm_tokenizer(tmp_path)
    config = json.loads((tmp_path / "tokenizer.json").read_text())
    (tmp_path / "tokenizer.json").write_text(json.dumps({**config, "post_processor": None}))
    with pytest.raises(UserError, match="no pair post-processor"):
        encode_pairs(Tokenizer(tmp_path), QUESTIONS, ANSWERS, max_len=512)


@pytest.fixture(scope="module")
def scorer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("rm-with-tokenizer")
    hf_tok = write_spm_tokenizer(path)
    # 512 positions as the published RM (scoring cuts pairs to max_position_embeddings; these fit
    # uncut)
    make_hf_deberta(**V3, vocab_size=len(hf_tok), max_position_embeddings=512).save_pretrained(path)
    return path, hf_tok


def test_rm_scorer_equals_transformers_on_pair_encoding(scorer_dir):
    path, hf_tok = scorer_dir
    lengths = [len(hf_tok(q, a)["input_ids"]) for q, a in zip(QUESTIONS, ANSWERS)]
    assert len(set(lengths)) == 3  # every batch below is padded
    hf = transformers.DebertaV2ForSequenceClassification.from_pretrained(path).eval()
    # OpenAssistant's card: tokenizer(question, answer), the logit is the score
    with torch.no_grad():
        expected = [hf(**hf_tok(q, a, return_tensors="pt")).logits[0, 0].item()
                    for q, a in zip(QUESTIONS, ANSWERS)]
    # what --fitness rm:PATH / --gold rm:PATH build
    scorer = make_gold_scorer(f"rm:{path}", batch_size=2)
    assert isinstance(scorer.rm, DebertaRewardModel)
    assert scorer.score(QUESTIONS, ANSWERS) == pytest.approx(expected, abs=1e-4)
    # a message-list prompt is scored by its last message
    messages = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": q}]
                for q in QUESTIONS]
    got = score_texts(scorer.rm, scorer.tok, messages, ANSWERS, batch_size=3)
    assert got == pytest.approx(expected, abs=1e-4)


def test_ignored_tensors_load(rm_dirs, tmp_path):
    """transformers' position_ids buffer and an unused absolute-position table (v3) are not
    refused."""
    tensors = load_file(rm_dirs["v3"] / "model.safetensors")
    tensors["deberta.embeddings.position_ids"] = torch.arange(64)[None]
    tensors["deberta.embeddings.position_embeddings.weight"] = torch.zeros(64, 32)
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((rm_dirs["v3"] / "config.json").read_text())
    ids, types, mask = batch()
    with torch.no_grad():
        torch.testing.assert_close(load_reward_model(tmp_path)(ids, types, mask),
                                   load_reward_model(rm_dirs["v3"])(ids, types, mask), atol=1e-6,
                                   rtol=0)


def rewrite(src, dst, drop: str | None = None, add: dict | None = None,
            config: dict | None = None) -> None:
    tensors = load_file(src / "model.safetensors")
    tensors.pop(drop, None)
    tensors.update(add or {})
    save_file(tensors, dst / "model.safetensors")
    saved = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**saved, **(config or {})}))


@pytest.mark.parametrize("change, message", [
    (dict(drop="deberta.encoder.layer.1.attention.self.query_proj.weight"),
     "missing tensor deberta.encoder.layer.1.attention.self.query_proj.weight: not a DeBERTa-v2 "
     "reward model"),
    (dict(drop="deberta.encoder.rel_embeddings.weight"),
     "missing tensor deberta.encoder.rel_embeddings.weight"),
    (dict(add={"lm_predictions.lm_head.bias": torch.zeros(VOCAB)}),
     "unexpected tensor lm_predictions.lm_head.bias"),
    (dict(add={"classifier.weight": torch.zeros(2, 32), "classifier.bias": torch.zeros(2)}),
     "num_labels = 1"),
    (dict(config={"position_buckets": 16}),
     "deberta.encoder.rel_embeddings.weight has shape [16, 32]"),
    (dict(config={"hidden_act": "mish"}), "hidden_act 'mish' is not supported"),
    (dict(config={"conv_kernel_size": 4}), "conv_kernel_size 4 is even"),
])
def test_bad_checkpoint_is_one_user_error(rm_dirs, tmp_path, change, message):
    rewrite(rm_dirs["v3"], tmp_path, **change)
    with pytest.raises(UserError) as e:
        load_reward_model(tmp_path)
    assert message in str(e.value) and "\n" not in str(e.value)
