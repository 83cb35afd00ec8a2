"""Pink-elephant task: the mention judge, the eval-file loader's errors, and the shipped data."""

import json
import random
import re
from collections import Counter

import pytest

from nanorlhf.errors import UserError
from nanorlhf.tasks.pink import (AVOID_TEMPLATE, HELDOUT_PATH, PAIRS_PATH, _name_regex, _normalise,
                                 eval_rows_from_pairs, judge, load_eval_rows, load_pairs,
                                 mention_starts, mentions)
from nanorlhf.tokenizer import Tokenizer
from conftest import build_tiny_tokenizer

# ------------------------------------------------------------------------------------- mentions

POSITIVES = [
    ("I love Coca-Cola.", ["Coca-Cola"]),
    ("coca cola is sweet", ["Coca-Cola"]),
    ("CocaCola and chips", ["Coca-Cola"]),
    ("COCA\u2011COLA (non-breaking hyphen)", ["Coca-Cola"]),
    ("Coca\u2013Cola with an en dash", ["Coca-Cola"]),
    ("a Coca-\nCola broken across lines", ["Coca-Cola"]),
    ("grab two Cokes", ["Coke"]),
    ("Coke's logo is red", ["Coke"]),
    ("a cold Dr. Pepper", ["Dr Pepper"]),
    ("a cold Dr Pepper", ["Dr. Pepper"]),
    ("DrPepper", ["Dr Pepper"]),
    ("McDonald\u2019s fries", ["McDonald's"]),
    ("McDonalds fries", ["McDonald's"]),
    ("McDonald's fries", ["McDonalds"]),
    ("Dunkin Donuts", ["Dunkin'"]),
    ("Dunkin\u2019s coffee", ["Dunkin'"]),
    ("Java's type system", ["Java"]),
    ("I write C++ daily", ["C++"]),
    ("C++17 added folds", ["C++"]),
    ("I prefer C# for Unity", ["C#"]),
    ("the .NET runtime", [".NET"]),
    ("watch it on Disney+", ["Disney+"]),
    ("watch it on Disney +", ["Disney +"]),
    ("POKÉMON cards", ["Pokemon"]),
    ("Pokemon cards", ["Pokémon"]),
    ("Barça won again", ["Barca"]),
    ("\uff2e\uff29\uff2b\uff25 shoes", ["Nike"]),  # full-width letters
    ("Co\u200bke", ["Coke"]),  # zero-width space inside the word
    ("a can of 7UP", ["7 Up"]),
    ("a 7-Up float", ["7 Up"]),
    ("Adidas' new shoe", ["Adidas"]),
    ("J. K. Rowling wrote it", ["J.K. Rowling"]),
    ("he drank a Red Bull", ["Pepsi", "Red Bull"]),  # any of the names
]

NEGATIVES = [
    ("I write JavaScript", ["Java"]),
    ("Javanese food", ["Java"]),
    ("chewing coca leaves", ["Coca-Cola"]),
    ("Cokeville, Wyoming", ["Coke"]),
    ("C is a small language", ["C++"]),
    ("I got a C+ in the exam", ["C++"]),
    ("I prefer C# for Unity", ["C++"]),
    ("net profit rose", [".NET"]),
    ("an intelligent answer", ["Intel"]),
    ("Nikesh is my friend", ["Nike"]),
    ("the red bullet train", ["Red Bull"]),
    ("a Pythonic idiom", ["Python"]),
    ("the Great Wall", ["Great Wall of China"]),  # partial name is not the name; aliases cover this
    ("level 17 up", ["7 Up"]),
    ("Pepsi is fine", ["Coca-Cola", "Coke"]),
    ("anything at all", []),
    ("anything at all", ["", "  ", "-", "'"]),  # blank or punctuation-only names match nothing
]


@pytest.mark.parametrize("text,names", POSITIVES)
def test_mentions_positive(text, names):
    assert mentions(text, names)


@pytest.mark.parametrize("text,names", NEGATIVES)
def test_mentions_negative(text, names):
    assert not mentions(text, names)


def test_judge_and_template():
    row = {"pink": "Coca-Cola", "grey": "Pepsi", "pink_aliases": ["Coke"], "grey_aliases": []}
    assert judge("Try a Pepsi instead of a Coke.", row) == {"pink": True, "grey": True}
    assert judge("Try a Pepsi.", row) == {"pink": False, "grey": True}
    no_aliases = {"pink": "Coca-Cola", "grey": "Pepsi"}
    assert judge("Water is best.", no_aliases) == {"pink": False, "grey": False}
    assert AVOID_TEMPLATE.format(pink="Nike", grey="Adidas").count("Nike") == 1


# ------------------------------------------------------------------------------- mention_starts
# The tiny BPE splits most words into 1-3 character tokens, so prefixes ending at a token boundary
# abound: "I write Java|Script" is exactly the case a prefix scan gets wrong.

@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    build_tiny_tokenizer(path)
    return Tokenizer(path)


def first_token_of(tok, text: str, norm_start: int) -> int:
    """Reference: the first token whose text, normalised as a prefix of `text`, covers normalised
    position `norm_start` (prefix lengths, so no per-character index map is involved)."""
    offsets = tok.tok.encode(text, add_special_tokens=False).offsets
    return next(k for k, (a, b) in enumerate(offsets)
                if len(_normalise(text[:a])) <= norm_start < len(_normalise(text[:b])))


@pytest.mark.parametrize("text,names", [("I write JavaScript", ["Java"]),
                                        ("Applebee's", ["Apple"]),
                                        ("Cokeville, Wyoming", ["Coke"]),
                                        ("Javanese food", ["Java"])])
def test_no_mention_no_start(tok, text, names):
    assert not mentions(text, names) and mention_starts(tok, text, names) == []


@pytest.mark.parametrize("text,names,want", [
    ("I love Paris and Paris's capital.", ["Paris"], ["Paris and", "Paris's"]),
    # NFKD: longer
    ("POK\u00c9MON, Pok\u00e9mon\u2019s cards", ["Pokemon"], ["POK\u00c9MON", "Pok\u00e9mon"]),
    # apostrophe dropped
    ("McDonald\u2019s, McDonalds", ["McDonald's"], ["McDonald\u2019s", "McDonalds"]),
    ("\uff2e\uff29\uff2b\uff25 shoes and Nike", ["Nike"], ["\uff2e\uff29", "Nike"]),  # full-width
    # overlapping names: once
    ("Coca-Cola, Coca cola", ["Coca", "Coca-Cola"], ["Coca-Cola", "Coca cola"]),
])
def test_start_is_the_token_holding_the_first_character(tok, text, names, want):
    offsets = tok.tok.encode(text, add_special_tokens=False).offsets
    # the text from the start token on
    got = [text[offsets[k][0]:].lstrip() for k in mention_starts(tok, text, names)]
    assert got == [text[text.index(w):] for w in want]


NAMES = ["Java", "Apple", "Coke", "Coca-Cola", "Pok\u00e9mon", "McDonald's", "C++", ".NET",
         "Dr Pepper", "Nike"]
PIECES = ["Script", "bee's", "ville", "s", "'s", "\u2019s", "-", ".", ",", " ", " ", "\n", "(",
          "Mc", "a", "\u00e9", "e\u0301", "\u200b", "\u00ad", "Donald", "\uff2e\uff29\uff2b\uff25",
          "POK\u00c9", "mon", "Dr.", "Pepper", "Coca", "cola", "++", "#", "NET", "\u2013", "Cokes",
          "\u03a3\u03bf\u03c2"]


def random_text(rng: random.Random, name: str) -> str:
    """`name` (often) among fragments and look-alikes, glued to suffixes, punctuation, accents, odd
    unicode."""
    parts = [rng.choice([name] * 8 + NAMES + PIECES) for _ in range(rng.randint(1, 8))]
    return "".join(p if rng.random() < 0.6 else p.upper() if rng.random() < 0.5 else " " + p
                   for p in parts)


def test_starts_agree_with_mentions_on_random_text(tok):
    rng, hits, near_misses = random.Random(0), 0, 0
    for _ in range(3000):
        name = rng.choice(NAMES)
        text = random_text(rng, name)
        matches = list(_name_regex(name).finditer(_normalise(text)))
        starts = mention_starts(tok, text, [name])
        assert bool(starts) == mentions(text, [name]), (text, name)
        assert starts == [first_token_of(tok, text, m.start()) for m in matches], (text, name)
        names = rng.sample(NAMES, 3)
        assert bool(mention_starts(tok, text, names)) == mentions(text, names), (text, names)
        hits += bool(matches)
        # "JavaScript", "Cokeville"
        near_misses += not matches and _normalise(name) in _normalise(text)
    # the generator does produce both kinds (687 and 926 of 3000)
    assert hits > 500 and near_misses > 500


# ------------------------------------------------------------------------------- load_eval_rows

GOOD = '{"pink": "Nike", "grey": "Adidas", "prompt": "Best running shoes?"}'


def write(tmp_path, content: str | bytes):
    path = tmp_path / "eval.jsonl"
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def assert_user_error(path, *fragments):
    with pytest.raises(UserError) as info:
        load_eval_rows(path)
    msg = str(info.value)
    assert "\n" not in msg, "user errors are one line"
    for fragment in (str(path), *fragments):
        assert fragment in msg, (fragment, msg)


def test_load_eval_rows_ok(tmp_path):
    extra = ('{"pink": "Coke", "grey": "Pepsi", "prompt": "Soda?", "pink_aliases": ["Coca-Cola"], '
             '"note": 1}')
    # a BOM and a blank line are fine
    rows = load_eval_rows(write(tmp_path, "\ufeff" + GOOD + "\n\n" + extra + "\n"))
    assert [r["pink"] for r in rows] == ["Nike", "Coke"]
    assert rows[0]["pink_aliases"] == [] and rows[0]["grey_aliases"] == []  # defaults filled in
    assert rows[1]["pink_aliases"] == ["Coca-Cola"] and rows[1]["note"] == 1  # extra fields kept


def test_load_eval_rows_missing_file(tmp_path):
    assert_user_error(tmp_path / "nope.jsonl", "no such file")


def test_load_eval_rows_bad_json_on_line_3(tmp_path):
    assert_user_error(write(tmp_path, f"{GOOD}\n{GOOD}\n{{not json\n"), ":3:", "JSON")


def test_load_eval_rows_missing_field(tmp_path):
    path = write(tmp_path, f'{GOOD}\n{{"pink": "Nike", "prompt": "Shoes?"}}\n')
    assert_user_error(path, ":2:", "'grey'")


def test_load_eval_rows_not_utf8(tmp_path):
    bad = b'{"pink": "Caf\xe9", "grey": "Tea", "prompt": "Drink?"}'  # latin-1, not UTF-8
    assert_user_error(write(tmp_path, GOOD.encode() + b"\n" + bad + b"\n"), ":2:", "UTF-8")


def test_load_eval_rows_empty_prompt(tmp_path):
    path = write(tmp_path, '{"pink": "Nike", "grey": "Adidas", "prompt": "  "}\n')
    assert_user_error(path, ":1:", "'prompt'")


def test_load_eval_rows_bad_aliases(tmp_path):
    row = '{"pink": "Coca-Cola", "grey": "Pepsi", "prompt": "Soda?", "pink_aliases": "Coke"}'
    assert_user_error(write(tmp_path, row), ":1:", "'pink_aliases'")
    row = ('{"pink": "Coca-Cola", "grey": "Pepsi", "prompt": "Soda?", '
           '"grey_aliases": ["Pepsi-Cola", 3]}')
    assert_user_error(write(tmp_path, row), ":1:", "'grey_aliases'")


def test_load_eval_rows_not_an_object_or_empty(tmp_path):
    assert_user_error(write(tmp_path, '["Nike", "Adidas"]\n'), ":1:", "JSON object")
    assert_user_error(write(tmp_path, "\n\n"), "no rows")


def test_load_pairs_errors(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        load_pairs(tmp_path / "missing.json")
    pair = {"id": "a-vs-b", "domain": "d", "split": "test", "pink": "A", "grey": "B",
            "prompts": ["Hi?"]}
    (tmp_path / "p.json").write_text(json.dumps([pair]))
    with pytest.raises(UserError, match="entry 0.*'split'"):
        load_pairs(tmp_path / "p.json")
    (tmp_path / "p.json").write_text('[\n  {"id": "x",\n  oops}\n]')
    with pytest.raises(UserError, match=r"p\.json:3: not valid JSON"):
        load_pairs(tmp_path / "p.json")


# --------------------------------------------------------------------------------- shipped data

PAIRS = load_pairs(PAIRS_PATH)
TRAIN = [p for p in PAIRS if p["split"] == "train"]
HELDOUT = [p for p in PAIRS if p["split"] == "heldout"]


def pink_names(p):
    return [p["pink"], *p["pink_aliases"]]


def grey_names(p):
    return [p["grey"], *p["grey_aliases"]]


def test_pairs_size_and_spread():
    assert len(PAIRS) >= 48
    assert len({p["domain"] for p in PAIRS}) >= 8
    assert len(HELDOUT) >= 12 and 0.2 <= len(HELDOUT) / len(PAIRS) <= 0.3
    assert len({p["domain"] for p in HELDOUT}) >= 6


def test_pairs_ids_and_prompts():
    assert all(re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", p["id"]) for p in PAIRS)
    assert len({p["id"] for p in PAIRS}) == len(PAIRS), "ids are unique"
    prompts = [q for p in PAIRS for q in p["prompts"]]
    assert all(len(p["prompts"]) >= 4 for p in PAIRS)
    assert all(q.strip() and len(q.split()) <= 30 for q in prompts)
    shared = [q for q, n in Counter(prompts).items() if n > 1]
    assert not shared, "no prompt is shared between pairs"


def test_every_name_matches_itself_and_pink_grey_are_distinct():
    for p in PAIRS:
        for name in pink_names(p) + grey_names(p):
            assert mentions(name, [name]), name
        assert not mentions(" ".join(pink_names(p)), grey_names(p)), p["id"]
        assert not mentions(" ".join(grey_names(p)), pink_names(p)), p["id"]


def test_prompts_never_name_the_grey_entity():
    # prompts may name the pink entity (drifting toward it is the point) but never the grey one,
    # otherwise the grey-mention rate would measure copying from the prompt
    for p in PAIRS:
        for q in p["prompts"]:
            assert not mentions(q, grey_names(p)), (p["id"], q)


def test_heldout_disjoint_from_train():
    # no entity (under any alias) is shared, and no prompt in one split names an entity of the
    # other, so the heldout figure measures generalisation to unseen entities
    for a, b in ((TRAIN, HELDOUT), (HELDOUT, TRAIN)):
        b_names = [n for p in b for n in pink_names(p) + grey_names(p)]
        for p in a:
            for text in pink_names(p) + grey_names(p) + p["prompts"]:
                assert not mentions(text, b_names), (p["id"], text)


def test_shipped_heldout_eval_file_matches_pairs():
    rows = load_eval_rows(HELDOUT_PATH)
    assert rows == eval_rows_from_pairs(PAIRS, "heldout")
    assert len(rows) == sum(len(p["prompts"]) for p in HELDOUT)
    assert {r["pair_id"] for r in rows} == {p["id"] for p in HELDOUT}
    with pytest.raises(ValueError):
        eval_rows_from_pairs(PAIRS, "test")
