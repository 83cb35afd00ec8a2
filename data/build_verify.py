"""Write data/verify_train.jsonl and data/verify_heldout.jsonl: verifiable problems, graded.

    python data/build_verify.py            # seeded: the same files every time

Each row: {"id", "task", "prompt", "answer"} (an integer; nanorlhf/tasks/verify.py grades replies).
Train and held-out problems are disjoint: addition and multiplication are split by the unordered
pair {a, b} (3 + 5 held out means 5 + 3 is held out too), counting by the whole list and word.

    task    problems                              train   held out
    add1    a + b, a, b in 1..9                   all other ordered pairs   15 unordered pairs
    add2    a + b, a, b in 10..99                 1000    200
    add3    a + b, a, b in 100..999               1000    200
    mul1    a * b, a, b in 2..9                   all other ordered pairs   10 unordered pairs
    count1  occurrences of a word in a list of 4-8 words from 5 (answers 1..5)   1000    200
"""

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent
SEED = 26
SUFFIX = " Answer with the number only."
WORDS = ("cat", "dog", "apple", "tree", "book", "river", "stone", "bird", "house", "cloud")


def arithmetic(task: str, op: str, lo: int, hi: int, heldout_pairs: int, train_n: int | None,
               rng: random.Random) -> tuple[list[dict], list[dict]]:
    """Problems "What is a op b?" -> (train, held-out), disjoint by the unordered pair {a, b}.
    train_n None: every ordered pair not held out; else train_n drawn from them (and the held-out
    set is heldout_pairs drawn problems, one order each)."""
    pairs = [(a, b) for a in range(lo, hi + 1) for b in range(a, hi + 1)]  # unordered, a <= b
    rng.shuffle(pairs)
    held, rest = pairs[:heldout_pairs], pairs[heldout_pairs:]
    value = (lambda a, b: a + b) if op == "+" else (lambda a, b: a * b)

    def row(a: int, b: int) -> dict:
        return {"task": task, "prompt": f"What is {a} {op} {b}?{SUFFIX}", "answer": value(a, b)}

    if train_n is None:  # small tasks: both orders of every pair
        both = lambda ps: [row(*o) for a, b in ps for o in sorted({(a, b), (b, a)})]
        return both(rest), both(held)
    flip = lambda a, b: (a, b) if rng.random() < 0.5 else (b, a)
    return [row(*flip(*p)) for p in rest[:train_n]], [row(*flip(*p)) for p in held]


def counting(train_n: int, heldout_n: int, rng: random.Random) -> tuple[list[dict], list[dict]]:
    """How many times a word occurs in a short list (4-8 words from 5 of WORDS), all distinct."""
    seen, rows = set(), []
    while len(rows) < train_n + heldout_n:
        vocab = rng.sample(WORDS, 5)
        words = tuple(rng.choice(vocab) for _ in range(rng.randint(4, 8)))
        target = rng.choice(words)
        if (words, target) in seen:
            continue
        seen.add((words, target))
        rows.append({"task": "count1", "answer": words.count(target),
                     "prompt": f'How many times does the word "{target}" appear in this list: '
                               f'{", ".join(words)}?{SUFFIX}'})
    return rows[:train_n], rows[train_n:]


def main(out: Path = OUT) -> None:
    rng = random.Random(SEED)
    splits = [arithmetic("add1", "+", 1, 9, 15, None, rng),
              arithmetic("add2", "+", 10, 99, 200, 1000, rng),
              arithmetic("add3", "+", 100, 999, 200, 1000, rng),
              arithmetic("mul1", "*", 2, 9, 10, None, rng),
              counting(1000, 200, rng)]
    for name, rows in (("train", [r for s in splits for r in s[0]]),
                       ("heldout", [r for s in splits for r in s[1]])):
        path = out / f"verify_{name}.jsonl"
        lines = [json.dumps({"id": f"{name}-{i}", **r}) for i, r in enumerate(rows)]
        path.write_text("\n".join(lines) + "\n")
        print(f"{path}: {len(rows)} problems")


if __name__ == "__main__":
    main()
