"""The verifiable task: the one answer-extraction rule on hand cases (adversarial ones included),
the problem files (seeded, disjoint, answers right) and their reader, and what an RL script takes
from it (chat rows, the scorer, pass@k from per-problem pass rates)."""

import json
import re
import sys
from fractions import Fraction
from pathlib import Path

import pytest

from nanorlhf.errors import UserError
from nanorlhf.tasks.verify import (HELDOUT_PATH, TRAIN_PATH, chat_rows, check, extract_answer,
                                   parse_tasks, pass_at_k_by_problem, read_problems, reward, score)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
import build_verify  # noqa: E402


@pytest.mark.parametrize("reply, value", [
    ("8", 8),
    ("3 + 5 = 8", 8),                                 # the question restated first: the last number
    ("The answer is 8.", 8),                          # a full stop is not a decimal part
    ("8, not 9", 9),                                  # several numbers: the last one, even if wrong
    ("Sure! Question 1 asks for 3 + 5, which is 8", 8),  # numbers in the preamble
    ("8 is the answer to question 2", 2),             # ... the rule, not the intent: 2
    ("12.0", 12),                                     # a decimal equal to an integer
    ("12.50", Fraction(25, 2)),
    ("-5", -5), ("The result is −7", -7),             # ASCII minus and U+2212
    ("10-3", 3),                                      # a hyphen after a digit is no sign
    ("1,234", 1234), ("12,345,678", 12345678),        # thousands commas
    ("3, 4", 4), ("1,23", 23),                        # a list, not a thousands group
    ("**42**\n", 42), ("$8", 8), ("7%", 7), ("3rd", 3),
    ("H2O", None),                                    # digits glued to a letter are no number
    ("twelve", None), ("", None), ("   \n", None), ("no digits here.", None),
])
def test_extract_answer_hand_cases(reply, value):
    assert extract_answer(reply) == value


@pytest.mark.parametrize("reply, answer, ok", [
    ("12", 12, True), ("12.0", 12, True), ("12.5", 12, False), ("twelve", 12, False),
    ("", 12, False), ("-12", 12, False), ("-12", -12, True), ("1,012", 1012, True),
    ("It is 8, not 9", 8, False), ("What is 3 + 5? 8", 8, True), ("08", 8, True),
])
def test_check_and_reward(reply, answer, ok):
    assert check(reply, answer) is ok
    assert reward(reply, answer) == (1.0 if ok else 0.0)


def test_the_shipped_files_are_what_the_seeded_script_writes(tmp_path):
    build_verify.main(tmp_path)
    for path in (TRAIN_PATH, HELDOUT_PATH):
        assert (tmp_path / path.name).read_text() == path.read_text()


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_train_and_heldout_are_disjoint_and_answers_are_right():
    train, held = rows(TRAIN_PATH), rows(HELDOUT_PATH)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    # arithmetic is split by the unordered pair: 3 + 5 held out keeps 5 + 3 out of training too
    pair = lambda r: (r["task"], frozenset(map(int, re.findall(r"\d+", r["prompt"]))))
    arith = lambda rs: {pair(r) for r in rs if r["task"] != "count1"}
    assert not arith(train) & arith(held)
    for r in train + held:
        if r["task"] == "count1":
            target = re.search(r'word "(\w+)"', r["prompt"]).group(1)
            words = r["prompt"].split(": ", 1)[1].split("?")[0].split(", ")
            assert r["answer"] == words.count(target) >= 1
        else:
            a, op, b = re.search(r"What is (\d+) ([+*]) (\d+)\?", r["prompt"]).groups()
            assert r["answer"] == (int(a) + int(b) if op == "+" else int(a) * int(b))
    add1 = [r for r in train + held if r["task"] == "add1"]
    assert len(add1) == 81  # every ordered a + b with a, b in 1..9, once
    assert {r["task"] for r in held} == {"add1", "add2", "add3", "mul1", "count1"}


def test_read_problems_and_tasks(tmp_path):
    assert {r["task"] for r in read_problems(HELDOUT_PATH, ("add1", "mul1"))} == {"add1", "mul1"}
    assert parse_tasks(" add1, count1 ") == ("add1", "count1")
    with pytest.raises(UserError, match="unknown task 'add9'"):
        parse_tasks("add1,add9")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "task": "add1", "answer": 3}\n'
                   '{"prompt": "y", "task": "add1"}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: needs"):
        read_problems(bad, ("add1",))
    one = tmp_path / "one.jsonl"
    one.write_text('{"prompt": "x", "task": "add1", "answer": 3}\n')
    with pytest.raises(UserError, match="no problems of task mul1"):
        read_problems(one, ("mul1",))


def test_chat_rows_and_score_for_an_rl_script():
    train, held = chat_rows("add1,mul1")
    assert (len(train), len(held)) == (55 + 46, 26 + 18)  # the task table in docs/rlvr.md
    assert all(r["messages"] == [{"role": "user", "content": r["prompt"]}] for r in train + held)
    assert [r["id"] for r in held] == [r["id"] for r in read_problems(HELDOUT_PATH,
                                                                      ("add1", "mul1"))]
    rows = [{"answer": 8}, {"answer": 8}, {"answer": 9}]
    assert score(rows, ["3 + 5 = 8", "8, not 9", "9"]) == [1.0, 0.0, 1.0]
    with pytest.raises(UserError, match="unknown task 'add9'"):
        chat_rows("add9")


def test_pass_at_k_by_problem_by_hand():
    """Pass rates of n = 4 replies -> counts 0, 1, 2, 4 -> pass@2 = 1 - C(4-c, 2)/C(4, 2): 1 - 6/6,
    1 - 3/6, 1 - 1/6, and 1 (fewer than 2 wrong replies to draw)."""
    got = pass_at_k_by_problem([0.0, 0.25, 0.5, 1.0], 4, 2)
    assert got == pytest.approx([0.0, 0.5, 5 / 6, 1.0], abs=1e-15)
    assert pass_at_k_by_problem([3 / 8], 8, 1) == pytest.approx([3 / 8], abs=1e-15)  # pass@1 = c/n
    with pytest.raises(ValueError, match="not multiples of 1/4"):
        pass_at_k_by_problem([0.3], 4, 2)  # not a pass rate of 4 replies
