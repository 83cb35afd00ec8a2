"""data.fit_to_length and fit_prompts: the truncation rules, by hand on their edge cases."""

import re

import pytest

from nanorlhf.checkpoint import load_model
from nanorlhf.data import fit_prompts, fit_to_length
from nanorlhf.errors import UserError
from nanorlhf.sampling import generate_batched, sample_responses
from nanorlhf.tokenizer import Tokenizer
from tools import chat

P, R = list(range(10)), list(range(100, 150))  # a 10-token prompt, a 50-token response


@pytest.mark.parametrize("prompt,response,max_len,min_response,want", [
    (P, R[:20], 30, 16, (P, R[:20], False)),  # exact fit: untouched
    (P, R, 30, 16, (P, R[:20], True)),  # the response is cut first
    # then the prompt, from the left
    (list(range(40)), R, 30, 16, (list(range(26, 40)), R[:16], True)),
    (P, R[:5], 12, 16, (P[3:], R[:5], True)),  # a response shorter than min_response is kept whole
    # max_len < min_response: the response's first max_len tokens only
    (P, R, 10, 16, ([], R[:10], True)),
    (P, R[:12], 10, 16, ([], R[:10], True)),
    ([], R, 10, 16, ([], R[:10], True)),  # empty prompt
    ([], R[:10], 10, 16, ([], R[:10], False)),  # empty prompt, exact fit
    (P, R, 1, 16, ([], R[:1], True)),
    (P, R, 26, 16, (P, R[:16], True)),  # exactly prompt + min_response
])
def test_fit_to_length(prompt, response, max_len, min_response, want):
    got = fit_to_length(prompt, response, max_len, min_response)
    assert got == want
    assert len(got[0]) + len(got[1]) <= max_len


# --- data.fit_prompts: the rule for prompts the model cannot read whole with its reply ---

@pytest.mark.parametrize("lengths,context,new,want_lengths", [
    ([5, 10], 20, 10, [5, 10]),  # exactly context - new: untouched
    ([5, 11], 20, 10, [5, 10]),  # one token over: the first one goes
    ([1000, 3], 20, 19, [1, 1]),  # one token of room
])
def test_fit_prompts_keeps_the_last_tokens(lengths, context, new, want_lengths, capsys):
    prompts = [list(range(100, 100 + n)) for n in lengths]
    got = fit_prompts(prompts, context, new)
    assert [len(p) for p in got] == want_lengths
    for full, kept in zip(prompts, got):
        assert kept == full[len(full) - len(kept):]  # a suffix: cut from the left
    cut = sum(a != b for a, b in zip(lengths, want_lengths))
    err = capsys.readouterr().err
    assert (f"{cut} of {len(prompts)} prompts" in err) == bool(cut) and err.count("\n") == bool(cut)


@pytest.mark.parametrize("new", [20, 21])
def test_fit_prompts_refuses_a_reply_as_long_as_the_context(new):
    with pytest.raises(UserError, match=f"--max-new-tokens {new} leaves no room.*context of 20"):
        fit_prompts([[1, 2]], 20, new)


def test_sampling_cuts_a_prompt_longer_than_the_context(tiny_chat_model, capsys):
    """A prompt past the model's context (256 here) is sampled from its last 256 - 8 tokens: the
    same reply as for those tokens given directly, and the returned prompt ids are what was read."""
    model, tok = load_model(tiny_chat_model).eval(), Tokenizer(tiny_chat_model)
    long_text = "Never mention the pink elephant. " * 200  # ~1,200 tokens
    full = tok.chat_prompt(long_text)
    room = model.cfg.max_position_embeddings - 8
    assert len(full) > room
    prompts, responses, _ = sample_responses(model, tok, [long_text], 2, 1.0, 3, 8, 2)
    assert prompts == [full[-room:]] * 2
    assert f"2 of 2 prompts longer than the model's context allows (256 tokens less 8 new): " \
        f"each keeps its last {room}" in capsys.readouterr().err
    direct = generate_batched(model, [full[-room:]] * 2, 8, tok.stop_ids, tok.pad_id, 2, 1.0, 3)
    assert responses == direct


def test_chat_reads_a_million_character_prompt_by_the_rule(tiny_chat_model, capsys):
    """tools/chat.py on a 1M-character prompt: bounded work, the reply, and the rule's one line."""
    chat.main(["x y " * 250_000, "--model", str(tiny_chat_model), "--max-new-tokens", "4"])
    out, err = capsys.readouterr()
    assert "1 of 1 prompts longer than the model's context allows (256 tokens less 4 new): each " \
        "keeps its last 252" in err
    assert re.fullmatch(r"\[[1-4] tokens in \d+\.\ds, torch threads: \d+\]", out.splitlines()[-1])
