"""Reward models against transformers' LlamaForSequenceClassification (the oracle), in both head
layouts.

Expected loss values are computed by hand (reference notes §5.5), never by the code under test.
"""

import json
import math
import shutil
import sys

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from nanorlhf.checkpoint import load_model
from nanorlhf.errors import UserError
from nanorlhf.reward import (bradley_terry_loss, last_token_index, load_reward_model,
                             make_gold_scorer, pair_ids, parse_rm_spec, reward_model_from_lm,
                             save_reward_model, score_texts)
from nanorlhf.tokenizer import Tokenizer
from conftest import build_tiny_tokenizer

VOCAB = 300  # the tiny tokenizer's size, so the `rm:` scorer can run on real text


def make_hf_rm(pad_token_id: int, seed: int = 0) -> transformers.LlamaForSequenceClassification:
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=256,
                                   rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                                   pad_token_id=pad_token_id, num_labels=1)
    torch.manual_seed(seed)
    model = transformers.LlamaForSequenceClassification(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
        model.score.weight.mul_(20)  # scores of order 1, so a 1e-4 tolerance means something
    return model


@pytest.fixture(scope="module")
def rm_dirs(tmp_path_factory):
    """The same random RM as transformers writes it (score.weight) and as UltraRM ships
    (regression_head.weight)."""
    hf = make_hf_rm(pad_token_id=0)
    score_dir = tmp_path_factory.mktemp("rm-score")
    hf.save_pretrained(score_dir)
    ultra_dir = tmp_path_factory.mktemp("rm-ultra")
    shutil.copy(score_dir / "config.json", ultra_dir / "config.json")
    tensors = load_file(score_dir / "model.safetensors")
    tensors["regression_head.weight"] = tensors.pop("score.weight")
    save_file(tensors, ultra_dir / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((ultra_dir / "config.json").read_text())
    (ultra_dir / "config.json").write_text(json.dumps({**config,
                                                       "architectures": ["LlamaRewardModel"]}))
    return {"hf": hf, "score": score_dir, "regression_head": ultra_dir}


def right_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, mask


def left_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


gen = torch.Generator().manual_seed(1)
# no pad/eos ids inside
ROWS = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (7, 12, 3, 9)]


# ---- Bradley-Terry loss: hand-computed values ----------------------------------------------------

def test_bt_loss_hand_values():
    chosen = torch.tensor([1.0, 2.0, 2.0, -0.3], dtype=torch.float64)
    rejected = torch.tensor([1.0, 0.0, 0.0, -0.3], dtype=torch.float64)
    losses, _ = bradley_terry_loss(chosen, rejected)
    # equal scores: -log σ(0) = log 2; r_w=2, r_l=0: log(1 + e^-2) = 0.1269280
    expected = torch.tensor([0.6931472, 0.1269280, 0.1269280, 0.6931472], dtype=torch.float64)
    torch.testing.assert_close(losses, expected, atol=1e-7, rtol=0)


def test_bt_loss_margin_and_centering():
    chosen, rejected = torch.tensor([2.0]), torch.tensor([0.0])
    losses, _ = bradley_terry_loss(chosen, rejected, margin=0.5)
    assert losses.item() == pytest.approx(0.2014133, abs=1e-6)  # -log σ(1.5)
    # per-pair margins too
    losses, _ = bradley_terry_loss(chosen, rejected, margin=torch.tensor([0.5]))
    assert losses.item() == pytest.approx(0.2014133, abs=1e-6)
    losses, _ = bradley_terry_loss(chosen, rejected, center_coef=0.01)
    assert losses.item() == pytest.approx(0.1269280 + 0.04, abs=1e-6)  # + 0.01 · (2 + 0)²


def test_bt_accuracy_is_strict():
    _, acc = bradley_terry_loss(torch.tensor([2.0, 1.0, 0.0]), torch.tensor([0.0, 1.0, 1.0]))
    assert acc.tolist() == [1.0, 0.0, 0.0]  # a tie counts as wrong


def test_bt_loss_gradient_hand_value():
    # d/dr_w of -log σ(r_w - r_l) = -σ(-(r_w - r_l)); at r_w = r_l that is -1/2
    chosen = torch.tensor([0.7], requires_grad=True)
    bradley_terry_loss(chosen, torch.tensor([0.7]))[0].sum().backward()
    assert chosen.grad.item() == pytest.approx(-0.5)


# ---- pooling -------------------------------------------------------------------------------------

def test_last_token_index_hand_values():
    mask = torch.tensor([[1, 1, 1, 0, 0],   # right padded: last real token at 2
                         [0, 0, 1, 1, 1],   # left padded: 4
                         [1, 1, 1, 1, 1],   # no padding: 4
                         [1, 0, 0, 0, 0]])  # one token: 0
    assert last_token_index(mask).tolist() == [2, 4, 4, 0]


def test_pad_equal_to_eos_reads_the_final_eos(rm_dirs):
    """pad == eos and the row ends in EOS: the mask, not the pad id, says the EOS is the last real
    token."""
    rm = load_reward_model(rm_dirs["score"]).eval()
    eos = 2
    rows = [[5, 6, eos, 7, 8, eos], [9, 10, eos]]  # EOS inside the prompt and at the end
    ids, mask = right_padded(rows, pad=eos)
    assert last_token_index(mask).tolist() == [5, 2]
    with torch.no_grad():
        batch = rm(ids, mask)
        for i, row in enumerate(rows):
            assert batch[i].item() == pytest.approx(rm(torch.tensor([row])).item(), abs=1e-5)


@pytest.mark.parametrize("layout", ["score", "regression_head"])
def test_left_right_no_padding_and_one_by_one_agree(rm_dirs, layout):
    rm = load_reward_model(rm_dirs[layout]).eval()
    with torch.no_grad():
        alone = torch.stack([rm(torch.tensor([r]))[0] for r in ROWS])
        right = rm(*right_padded(ROWS, pad=0))
        left = rm(*left_padded(ROWS, pad=0))
    assert right.shape == (len(ROWS),) and right.dtype == torch.float32
    torch.testing.assert_close(right, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(left, alone, atol=1e-5, rtol=0)
    assert alone.std() > 0.1  # the rows really score differently


# ---- layouts: load, save, transformers agrees ----------------------------------------------------

@pytest.mark.parametrize("layout", ["score", "regression_head"])
def test_both_layouts_match_transformers(rm_dirs, layout):
    rm = load_reward_model(rm_dirs[layout]).eval()
    assert rm.head_name == layout
    ids, mask = right_padded(ROWS, pad=0)
    with torch.no_grad():
        expected = rm_dirs["hf"](input_ids=ids, attention_mask=mask).logits.squeeze(-1)
        assert (rm(ids, mask) - expected).abs().max().item() <= 1e-4


def test_saved_score_layout_loads_in_transformers(rm_dirs, tmp_path):
    rm = load_reward_model(rm_dirs["score"]).eval()
    with torch.no_grad():
        for p in rm.parameters():  # new weights, so the saved file is not the original
            p.mul_(1.1)
    ids, mask = right_padded(ROWS, pad=0)
    with torch.no_grad():
        ours = rm(ids, mask)
    out = save_reward_model(rm, tmp_path / "saved")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    assert config["num_labels"] == 1 and config["pad_token_id"] == 0
    assert "score.weight" in load_file(out / "model.safetensors")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
        assert (theirs - ours).abs().max().item() <= 1e-4
        torch.testing.assert_close(load_reward_model(out)(ids, mask), ours)


def test_saved_regression_head_layout_keeps_its_name(rm_dirs, tmp_path):
    rm = load_reward_model(rm_dirs["regression_head"]).eval()
    out = save_reward_model(rm, tmp_path / "saved")
    names = set(load_file(out / "model.safetensors"))
    assert "regression_head.weight" in names and "score.weight" not in names
    reloaded = load_reward_model(out)
    assert reloaded.head_name == "regression_head"
    ids, mask = right_padded(ROWS, pad=0)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids, mask), rm(ids, mask))


def test_bfloat16_load(rm_dirs):
    rm = load_reward_model(rm_dirs["score"], dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in rm.parameters())
    with torch.no_grad():
        assert rm(*right_padded(ROWS, pad=0)).dtype == torch.float32


def test_proxy_rm_from_lm(tiny_dirs, tmp_path):
    lm = load_model(tiny_dirs["llama-gqa-tied"]).eval()
    rm = reward_model_from_lm(lm, seed=0).eval()
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _, hidden = lm(ids, return_hidden=True)
        w = rm.score.weight
        # small: std 1/sqrt(H+1)
        assert w.shape == (1, 64) and 0 < w.std().item() < 2 / math.sqrt(65)
        torch.testing.assert_close(rm(ids), hidden[:, -1] @ w[0])
        rm.model.embed_tokens.weight.add_(1.0)  # the RM owns a copy: the LM is untouched
        assert not torch.equal(rm.model.embed_tokens.weight, lm.model.embed_tokens.weight)
        ours = rm(ids)
    out = save_reward_model(rm, tmp_path / "proxy")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    with torch.no_grad():
        assert (hf(input_ids=ids).logits.squeeze(-1) - ours).abs().max().item() <= 1e-4


# ---- clear errors --------------------------------------------------------------------------------

def test_checkpoint_without_head_is_a_clear_error(tiny_dirs):
    with pytest.raises(UserError) as info:
        load_reward_model(tiny_dirs["llama-mha-untied"])  # a causal LM: lm_head, no reward head
    message = str(info.value)
    assert str(tiny_dirs["llama-mha-untied"]) in message and "\n" not in message
    assert "score.weight" in message and "regression_head.weight" in message


def test_two_label_head_is_a_clear_error(tmp_path):
    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                   num_hidden_layers=1, num_attention_heads=2, num_labels=2,
                                   pad_token_id=0)
    transformers.LlamaForSequenceClassification(cfg).save_pretrained(tmp_path)
    with pytest.raises(UserError, match="num_labels = 1"):
        load_reward_model(tmp_path)


def test_unknown_gold_spec():
    for spec in ("nope", "rm:", "vader2"):
        with pytest.raises(UserError) as info:
            make_gold_scorer(spec)
        assert "rm:PATH" in str(info.value) and "'vader'" in str(info.value)


# ---- gold scorers --------------------------------------------------------------------------------

def test_vader_ranks_sentiment():
    scorer = make_gold_scorer("vader")
    good, bad = scorer.score(["Review it.", "Review it."],
                             ["I love this, wonderful!", "This is awful and I hate it."])
    assert good > 0.5 and bad < -0.5  # VADER compound is in [-1, 1]


def test_vader_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "vaderSentiment.vaderSentiment", None)  # makes the import fail
    with pytest.raises(UserError, match="pip install vaderSentiment"):
        make_gold_scorer("vader")


def test_rm_gold_scorer_matches_transformers_with_pad_equal_eos(tmp_path):
    """pad == eos == <|im_end|>, which also ends every prompt turn: batched scores still match
    transformers."""
    hf = make_hf_rm(pad_token_id=2, seed=3)
    hf.save_pretrained(tmp_path)
    build_tiny_tokenizer(tmp_path)
    tok = Tokenizer(tmp_path)
    assert tok.pad_id == tok.eos_id == 2
    prompts = ["The capital of France?", "Never mention the pink elephant.", "Paris"]
    responses = ["Paris.", "The elephant is pink and never mentioned, system user.", "The capital"]
    scores = make_gold_scorer(f"rm:{tmp_path}", batch_size=2).score(prompts, responses)
    rows = [tok.chat_prompt(p) + tok.encode(r) for p, r in zip(prompts, responses)]
    assert all(2 in row and row[-1] != 2 for row in rows)  # EOS inside every prompt, not at the end
    with torch.no_grad():
        expected = hf(*right_padded(rows, pad=2)).logits.squeeze(-1)
    assert max(abs(s - e) for s, e in zip(scores, expected.tolist())) <= 1e-4
    rm = load_reward_model(tmp_path)
    assert score_texts(rm, tok, prompts, responses, batch_size=1) == pytest.approx(scores, abs=1e-5)


# ---- templates: how (prompt, response) becomes the ids an RM reads -------------------------------

@pytest.fixture
def ultra_with_tokenizer(rm_dirs, tmp_path):
    """The regression_head (UltraRM) layout with the tiny tokenizer: BOS is <|im_start|> (id 1)."""
    path = tmp_path / "ultra"
    shutil.copytree(rm_dirs["regression_head"], path)
    build_tiny_tokenizer(path)
    return path


def test_ultrarm_template_is_the_cards(ultra_with_tokenizer):
    """BOS + "Human: {instruction}\\n\\nAssistant: {completion}" as one string
    (openbmb/UltraRM-13b's card), no EOS; a message list is scored by its last message."""
    tok = Tokenizer(ultra_with_tokenizer)
    text = "Human: The capital of France?\n\nAssistant: Paris."
    question = "The capital of France?"
    assert pair_ids(tok, question, "Paris.", "ultrarm") == ([1] + tok.encode(text), [])
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": question}]
    assert pair_ids(tok, messages, "Paris.", "ultrarm")[0] == [1] + tok.encode(text)
    assert pair_ids(tok, question, "Paris.", "chat") == (tok.chat_prompt(question),
                                                         tok.encode("Paris."))
    with pytest.raises(ValueError, match="pair"):
        pair_ids(tok, "q", "a", "pair")


def test_template_comes_from_the_checkpoint_or_the_spec(rm_dirs, ultra_with_tokenizer):
    """Scores equal transformers (the same weights as LlamaForSequenceClassification) on the ids of
    the template chosen: by layout (regression_head: ultrarm), by config.json's nanorlhf_template,
    or by rm:PATH@TEMPLATE."""
    hf, path = rm_dirs["hf"], ultra_with_tokenizer
    tok = Tokenizer(path)
    prompts = ["The capital of France?", "Never mention the pink elephant."]
    responses = ["Paris.", "The elephant."]
    ultra_rows = [[1] + tok.encode(f"Human: {p}\n\nAssistant: {r}")
                  for p, r in zip(prompts, responses)]
    chat_rows = [tok.chat_prompt(p) + tok.encode(r) for p, r in zip(prompts, responses)]
    with torch.no_grad():
        expected = {name: hf(*right_padded(rows, pad=0)).logits.squeeze(-1).tolist()
                    for name, rows in (("ultrarm", ultra_rows), ("chat", chat_rows))}
    # the template matters
    assert max(abs(a - b) for a, b in zip(expected["ultrarm"], expected["chat"])) > 1e-2
    assert load_reward_model(path).template == "ultrarm"
    assert load_reward_model(rm_dirs["score"]).template == "chat"
    score = lambda spec: make_gold_scorer(spec).score(prompts, responses)
    assert score(f"rm:{path}") == pytest.approx(expected["ultrarm"], abs=1e-4)
    assert score(f"rm:{path}@chat") == pytest.approx(expected["chat"], abs=1e-4)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "nanorlhf_template": "chat"}))
    assert load_reward_model(path).template == "chat"
    assert score(f"rm:{path}") == pytest.approx(expected["chat"], abs=1e-4)
    assert score(f"rm:{path}@ultrarm") == pytest.approx(expected["ultrarm"], abs=1e-4)


def test_bad_templates_are_one_line(rm_dirs, tmp_path):
    words = r"unknown reward-model template 'chta' after '@' \(one of chat, ultrarm, pair\)"
    with pytest.raises(UserError, match=words):
        make_gold_scorer(f"rm:{rm_dirs['score']}@chta")
    with pytest.raises(UserError, match="'pair' is for DeBERTa encoder RMs"):
        make_gold_scorer(f"rm:{rm_dirs['score']}@pair")
    path = tmp_path / "bad"
    shutil.copytree(rm_dirs["score"], path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "nanorlhf_template": "human"}))
    with pytest.raises(UserError, match=r"config.json: unknown reward-model template 'human'"):
        load_reward_model(path)


def test_a_path_with_an_at_sign_is_a_path(rm_dirs, tmp_path):
    path = tmp_path / "rm@v2"
    shutil.copytree(rm_dirs["score"], path)
    assert parse_rm_spec(f"rm:{path}") == (str(path), None)
    assert parse_rm_spec(f"rm:{path}@ultrarm") == (str(path), "ultrarm")
    assert parse_rm_spec("rm:org/name") == ("org/name", None)


def test_saved_template_travels_only_when_the_layout_does_not_imply_it(rm_dirs, tmp_path):
    rm = load_reward_model(rm_dirs["regression_head"], template="chat")
    out = save_reward_model(rm, tmp_path / "chat")
    assert json.loads((out / "config.json").read_text())["nanorlhf_template"] == "chat"
    assert load_reward_model(out).template == "chat"
    out = save_reward_model(load_reward_model(rm_dirs["regression_head"]), tmp_path / "ultra")
    assert "nanorlhf_template" not in json.loads((out / "config.json").read_text())
    assert load_reward_model(out).template == "ultrarm"
