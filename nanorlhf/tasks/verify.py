"""Verifiable problems: questions whose answer is one integer, and the checker that grades a reply.

A problem is a jsonl row {"id", "task", "prompt", "answer"} (data/build_verify.py writes them):

    add1   "What is 3 + 5? Answer with the number only."        a, b in 1..9
    add2   the same with a, b in 10..99                          add3: 100..999
    mul1   "What is 3 * 5? ..."                                   a, b in 2..9
    count1 "How many times does the word "cat" appear in this list: cat, dog, cat? ..."

The one extraction rule (`extract_answer`): the reply's answer is the LAST number written in it
with digits: an optional sign (- or the minus sign U+2212, only where no letter, digit or dot
precedes it: "10-3" holds 10 and 3, not -3), digits with optional thousands commas in groups of
three ("1,234"), an optional decimal part ("12.0"). A reply is correct when that number equals the
answer exactly (12.0 == 12; 12.5 != 12). No number at all -> wrong. Number words ("twelve") are not
numbers; nor are digits glued to a letter ("H2O"). The last number, not the first, because a chatty
reply restates the question first ("3 + 5 = 8"), and one rule for every family keeps the reward easy
to predict (the base model's replies decide nothing).

    check("3 + 5 = 8.", 8)   -> True
    check("It is 8, not 9", 8) -> False   (the last number is 9)

For an RL script (train_ppo.py --reward verify): `chat_rows` asks each problem as one user turn,
`score` grades the replies, `pass_at_k_by_problem` turns per-problem pass rates into pass@k.
"""

import json
import re
from fractions import Fraction
from pathlib import Path

from nanorlhf.errors import UserError
from nanorlhf.tasks.stats import pass_at_k

DATA_DIR = Path(__file__).resolve().parents[2] / "data"
TRAIN_PATH, HELDOUT_PATH = DATA_DIR / "verify_train.jsonl", DATA_DIR / "verify_heldout.jsonl"
TASKS = ("add1", "add2", "add3", "mul1", "count1")

# a sign only where no letter, digit or dot precedes it; digits, thousands groups, a decimal part
NUMBER = re.compile(r"(?<![\w.])([-\u2212]?)(?<![\w.])(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?")


def extract_answer(reply: str) -> Fraction | None:
    """The last number written with digits in `reply` (the module docstring's rule), or None."""
    found = None
    for match in NUMBER.finditer(reply):
        found = match
    if found is None:
        return None
    sign, digits, decimals = found.groups()
    value = Fraction(digits.replace(",", "") + (decimals or ""))
    return -value if sign else value


def check(reply: str, answer: int) -> bool:
    """Is the reply's extracted answer (extract_answer) exactly `answer`?"""
    value = extract_answer(reply)
    return value is not None and value == answer


def reward(reply: str, answer: int) -> float:
    """The verifiable reward: 1.0 for a correct reply, else 0.0."""
    return float(check(reply, answer))


def read_problems(path: str | Path, tasks: tuple[str, ...]) -> list[dict]:
    """The rows of a problems jsonl whose "task" is in `tasks`, each checked for its fields."""
    rows = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{n}: not JSON ({e.msg})") from None
        missing = [k for k in ("prompt", "answer", "task") if k not in row]
        if missing or not isinstance(row.get("answer"), int):
            raise UserError(f"{path}:{n}: needs \"prompt\", \"task\" and an integer \"answer\"")
        if row["task"] in tasks:
            rows.append(row)
    if not rows:
        raise UserError(f"{path}: no problems of task {', '.join(tasks)}")
    return rows


def parse_tasks(text: str) -> tuple[str, ...]:
    """--tasks "add1,mul1" -> ("add1", "mul1"); an unknown name is one line."""
    tasks = tuple(t.strip() for t in text.split(",") if t.strip())
    unknown = [t for t in tasks if t not in TASKS] or ([] if tasks else [""])
    if unknown:
        raise UserError(f"--tasks {text!r}: unknown task {unknown[0]!r}; "
                        f"choose from {','.join(TASKS)}")
    return tasks


def chat_rows(tasks: str) -> tuple[list[dict], list[dict]]:
    """--tasks "add1" -> (TRAIN_PATH's problems, HELDOUT_PATH's), of those families, each row with
    its chat "messages": the problem's prompt as one user turn, as train_grpo.py asks it."""
    families = parse_tasks(tasks)
    ask = lambda rows: [{**r, "messages": [{"role": "user", "content": r["prompt"]}]} for r in rows]
    return ask(read_problems(TRAIN_PATH, families)), ask(read_problems(HELDOUT_PATH, families))


def score(rows: list[dict], replies: list[str]) -> list[float]:
    """The reward of each reply to its row's problem, 1.0 or 0.0 (a policy_eval Scorer)."""
    return [reward(reply, row["answer"]) for row, reply in zip(rows, replies, strict=True)]


def pass_at_k_by_problem(pass_rates: list[float], n: int, k: int) -> list[float]:
    """Each problem's share of correct replies among n samples (a 0/1 reward's per-prompt mean,
    as policy_eval reports it) -> its unbiased pass@k (stats.pass_at_k), with c = rate · n."""
    counts = [round(rate * n) for rate in pass_rates]
    if any(abs(c - rate * n) > 1e-6 for c, rate in zip(counts, pass_rates)):
        raise ValueError(f"pass rates {pass_rates} are not multiples of 1/{n}")
    return [pass_at_k(n, c, k) for c in counts]
