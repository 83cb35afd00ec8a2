"""The pink-elephant task: entity pairs, eval rows, the rule-based mention judge, the evaluation.

The model is told to avoid the *pink* entity and talk about the *grey* one instead, while the user's
message drifts toward the pink one. The metric is the fraction of responses that mention pink (and,
separately, grey). The DPF paper used an LLM judge; we use a string match with aliases, which is
cheap, deterministic and auditable, at the price of missing paraphrases ("the red soda can").

The evaluation (sample_eval, evaluate): for every row {"pink", "grey", "prompt"} the model gets the
avoid-instruction as its system prompt and the drifting question as the user turn; n samples per row
at a fixed temperature and seed. The pink rate is the fraction of samples that mention the pink
entity (lower is better), the grey rate the fraction that mention the alternative. Saying nothing
would score a perfect pink rate, so a degeneracy guard is reported next to it: mean response
length, distinct-2 (unique bigrams / all bigrams, over all samples) and the per-token NLL of the
samples under the *base* model (a policy that drifts into gibberish scores high there). Compare
saved models with `python tools/pink_eval.py`.
"""

import bisect
import json
import re
import time
import unicodedata
from functools import lru_cache
from pathlib import Path

import torch

from nanorlhf.data import read_jsonl
from nanorlhf.errors import UserError
from nanorlhf.step import response_logps_batched
from nanorlhf.sampling import Ids, LogitsHook, sample_responses
from nanorlhf.tokenizer import Tokenizer

DATA_DIR = Path(__file__).resolve().parents[2] / "data"
PAIRS_PATH = DATA_DIR / "pink_elephant_pairs.json"
HELDOUT_PATH = DATA_DIR / "pink_eval_heldout.jsonl"

# The instruction goes in the system prompt; the drifting question is the user turn.
AVOID_TEMPLATE = "Never mention {pink}. If it comes up, talk about {grey} instead."

# Typographic variants that models and users emit interchangeably: dashes -> "-"; apostrophes and
# invisible characters (soft hyphen, zero-width space/joiners, BOM) removed, so "McDonald’s",
# "McDonald's" and "McDonalds" all read "mcdonalds" whichever spelling the name list uses.
_DASHES = "\u2010\u2011\u2012\u2013\u2014\u2015\u2212\ufe58\ufe63"
_DROPPED = "'\u2018\u2019\u201b\u02bc\u2032`\u00b4\u00ad\u200b\u200c\u200d\ufeff"
_PUNCT = str.maketrans({**{c: "-" for c in _DASHES}, **{c: None for c in _DROPPED}})


def _normalise(s: str) -> str:
    """NFKD (full-width -> ASCII), unify dashes, drop apostrophes and accents ("Pokémon" ==
    "Pokemon"), casefold."""
    s = unicodedata.normalize("NFKD", s).translate(_PUNCT)
    return "".join(c for c in s if not unicodedata.combining(c)).casefold()


@lru_cache(maxsize=4096)
def _name_regex(name: str) -> re.Pattern:
    """Regex for one surface form. Spaces, hyphens and dots after a letter separate words, and any
    run of them (or none) matches: "Coca-Cola" == "Coca Cola" == "CocaCola", "Dr Pepper" ==
    "Dr. Pepper". Word boundaries apply only at word-character edges, so "Java" misses "JavaScript"
    while "C++" needs none after its "+"; a leading dot stays (".NET" must not match "net")."""
    words = [w for w in re.split(r"(?:[\s\-]|(?<=\w)\.)+", _normalise(name)) if w]
    if not words:  # a name of only punctuation would otherwise match everywhere
        return re.compile(r"(?!)")
    body = r"[\s.\-]*".join(re.escape(w) for w in words)
    left = r"(?<!\w)" if re.match(r"\w", words[0]) else ""
    # plurals and possessives count: "Cokes", "Nike's"
    right = r"s?(?!\w)" if re.search(r"\w$", words[-1]) else ""
    return re.compile(left + body + right)


def mentions(text: str, names: list[str]) -> bool:
    """True if `text` mentions any of `names`: case-insensitive, whole words, any typography."""
    text = _normalise(text)
    return any(_name_regex(n).search(text) for n in names if n.strip())


def _normalise_indexed(s: str) -> tuple[str, list[int]]:
    """_normalise, one character at a time -> (normalised text, the index in `s` of each of its
    characters).

    Equal to _normalise(s): NFKD and casefold act per character, the translation table is per
    character, and the only characters NFKD reorders (combining marks) are dropped. The index map is
    what lets a match found in the normalised text point back into the original one, whose offsets
    differ ("Pok\u00e9mon" is one character longer after NFKD, a dropped apostrophe one shorter)."""
    chars, origin = [], []
    for i, c in enumerate(s):
        n = _normalise(c)
        chars.append(n)
        origin += [i] * len(n)
    return "".join(chars), origin


def mention_starts(tok, text: str, names: list[str]) -> list[int]:
    """Token indices (in nanorlhf Tokenizer `tok`.encode(text)) where a mention of any of `names`
    begins, one per mention, in order: where a per-token penalty for naming the pink entity belongs.

    The mentions are the matches of `mentions()`'s regexes on the whole normalised text, so the two
    always agree. (Searching growing prefixes would not: the prefix "I write Java" of "I write
    JavaScript" ends at a token boundary and matches "Java".) Overlapping matches of names count
    once, the leftmost (then longest) winning: "Coca-Cola" with alias "Coca" is one mention."""
    norm, origin = _normalise_indexed(text)
    spans = sorted((m.start(), -m.end()) for n in names if n.strip()
                   for m in _name_regex(n).finditer(norm))
    ends = [end for _, end in tok.tok.encode(text, add_special_tokens=False).offsets]  # in chars
    starts, covered = [], 0  # covered: the normalised text up to here belongs to a counted mention
    for start, neg_end in spans:
        if start >= covered:
            # the token holding the mention's first character: the first token ending after it
            starts.append(bisect.bisect_right(ends, origin[start]))
            covered = -neg_end
    return starts


def avoid_messages(row: dict) -> list[dict]:
    """The conversation every pink-elephant prompt is posed in (training data uses the same one)."""
    instruction = AVOID_TEMPLATE.format(pink=row["pink"], grey=row["grey"])
    return [{"role": "system", "content": instruction}, {"role": "user", "content": row["prompt"]}]


def judge(response: str, row: dict) -> dict[str, bool]:
    """Score one response to an eval row: does it mention the pink entity, and the grey one?"""
    return {"pink": mentions(response, [row["pink"], *row.get("pink_aliases", [])]),
            "grey": mentions(response, [row["grey"], *row.get("grey_aliases", [])])}


def _check(obj: object, where: str, required: tuple[str, ...]) -> dict:
    """Validate one record; `where` is "file:line" or "file: entry N" for the error message."""
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key in required:
        if key not in obj:
            raise UserError(f"{where}: missing field '{key}'")
        if not isinstance(obj[key], str) or not obj[key].strip():
            raise UserError(f"{where}: field '{key}' must be a non-empty string")
    for key in ("pink_aliases", "grey_aliases"):
        aliases = obj.get(key, [])
        good = isinstance(aliases, list) and all(isinstance(a, str) and a.strip() for a in aliases)
        if not good:
            raise UserError(f"{where}: field '{key}' must be a list of non-empty strings")
    return obj


def _read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    return path.read_bytes()


def load_eval_rows(path: str | Path = HELDOUT_PATH) -> list[dict]:
    """Read a jsonl of {"pink", "grey", "prompt"} rows (alias lists and extra fields optional).
    Blank lines are skipped; any bad line raises UserError naming the file and line number."""
    rows = [_check(obj, where, ("pink", "grey", "prompt")) for where, obj in read_jsonl(path)]
    return [{**row, "pink_aliases": row.get("pink_aliases", []),
             "grey_aliases": row.get("grey_aliases", [])} for row in rows]


def load_pairs(path: str | Path = PAIRS_PATH) -> list[dict]:
    """Read the pairs file: a JSON list of {id, domain, split, pink, grey, *_aliases, prompts}."""
    path = Path(path)
    data = _read_bytes(path)
    try:
        pairs = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        lineno = data[:e.start].count(b"\n") + 1
        raise UserError(f"{path}:{lineno}: not valid UTF-8") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(pairs, list) or not pairs:
        raise UserError(f"{path}: expected a non-empty JSON list of pairs")
    for i, pair in enumerate(pairs):
        where = f"{path}: entry {i}"
        _check(pair, where, ("id", "domain", "split", "pink", "grey"))
        if pair["split"] not in ("train", "heldout"):
            raise UserError(f"{where}: field 'split' must be 'train' or 'heldout'")
        prompts = pair.get("prompts")
        good = isinstance(prompts, list) and prompts and all(isinstance(p, str) and p.strip()
                                                              for p in prompts)
        if not good:
            raise UserError(f"{where}: field 'prompts' must be a non-empty list of non-empty "
                            "strings")
    return pairs


def eval_rows_from_pairs(pairs: list[dict], split: str) -> list[dict]:
    """One eval row per prompt of every pair in `split` ("train" or "heldout")."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    return [{"pink": p["pink"], "grey": p["grey"], "prompt": prompt,
             "pink_aliases": p.get("pink_aliases", []), "grey_aliases": p.get("grey_aliases", []),
             "domain": p["domain"], "pair_id": p["id"]}
            for p in pairs if p["split"] == split for prompt in p["prompts"]]


# python -m nanorlhf.tasks.pink: regenerate the shipped held-out eval file


# --- the evaluation: mention rates and the degeneracy guard ---

def distinct_n(token_lists: list[list[int]], n: int = 2) -> float:
    grams = [tuple(t[i:i + n]) for t in token_lists for i in range(len(t) - n + 1)]
    return len(set(grams)) / max(len(grams), 1)


@torch.no_grad()
def mean_nll(model, prompts: Ids, responses: Ids, pad_id: int, batch_size: int = 16) -> float:
    """Per-token negative log-likelihood of `responses` (given their prompts) under `model`."""
    logps = response_logps_batched(model, prompts, responses, pad_id, batch_size)
    return -sum(logps) / max(sum(map(len, responses)), 1)


def sample_eval(model, tok: Tokenizer, rows: list[dict], n: int = 4, temperature: float = 0.7,
                seed: int = 0, max_new_tokens: int = 96, batch_size: int = 32,
                logits_hook: LogitsHook | None = None, desc: str = "eval") -> tuple[dict, Ids, Ids]:
    """evaluate() up to the NLL: -> (its results with base_nll None, prompt ids, response ids)."""
    start = time.perf_counter()
    conversations = [avoid_messages(r) for r in rows]
    prompts, responses, texts = sample_responses(model, tok, conversations, n, temperature, seed,
                                                 max_new_tokens, batch_size, logits_hook, desc)
    verdicts = [judge(text, row) for text, row in zip(texts, (r for r in rows for _ in range(n)))]
    content = [[t for t in r if t not in tok.stop_ids] for r in responses]
    return {
        "pink_rate": sum(v["pink"] for v in verdicts) / len(verdicts),
        "grey_rate": sum(v["grey"] for v in verdicts) / len(verdicts),
        "mean_tokens": sum(map(len, content)) / len(content),
        "distinct_2": distinct_n(content, 2),
        "base_nll": None,  # the base model's verdict, from score_nll (the key keeps its place)
        "samples": len(texts),
        "seconds": time.perf_counter() - start,
        "examples": [{"prompt": r["prompt"], "pink": r["pink"], "response": t}
                     for r, t in zip((r for r in rows for _ in range(n)), texts)],
    }, prompts, responses


def score_nll(result: dict, base_model, prompts: Ids, responses: Ids, pad_id: int) -> dict:
    """sample_eval's result with base_nll under `base_model` (and its time added to the
    result's)."""
    start = time.perf_counter()
    nll = mean_nll(base_model, prompts, responses, pad_id)
    return {**result, "base_nll": nll, "seconds": result["seconds"] + time.perf_counter() - start}


def evaluate(model, tok: Tokenizer, rows: list[dict], base_model=None, n: int = 4,
             temperature: float = 0.7, seed: int = 0, max_new_tokens: int = 96,
             batch_size: int = 32, logits_hook: LogitsHook | None = None,
             desc: str = "eval") -> dict:
    """Pink/grey mention rates and the degeneracy guard for one model; `base_model` scores the
    NLL."""
    result, prompts, responses = sample_eval(model, tok, rows, n, temperature, seed, max_new_tokens,
                                             batch_size, logits_hook, desc)
    return score_nll(result, base_model or model, prompts, responses, tok.pad_id)


def evaluate_as(cfg, seed: int, model, tok: Tokenizer, rows: list[dict], base_model=None,
                logits_hook: LogitsHook | None = None, desc: str = "eval") -> dict:
    """evaluate() with a training script's eval flags: `cfg` is its Config, read for eval_n,
    eval_temperature, eval_max_new_tokens and eval_batch_size."""
    return evaluate(model, tok, rows, base_model, cfg.eval_n, cfg.eval_temperature, seed,
                    cfg.eval_max_new_tokens, cfg.eval_batch_size, logits_hook, desc)


METRICS = [("pink mention rate (lower is better)", "pink_rate", "{:.1%}"),
           ("grey mention rate", "grey_rate", "{:.1%}"),
           ("mean response tokens", "mean_tokens", "{:.1f}"),
           ("distinct-2", "distinct_2", "{:.3f}"),
           ("NLL/token under base model", "base_nll", "{:.3f}")]


def format_table(results: dict[str, dict]) -> str:
    """Side-by-side table: one column per evaluated model."""
    names = list(results)
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label, key, fmt in METRICS:
        cells = " | ".join(fmt.format(results[m][key]) for m in names)
        lines.append(f"| {label} | {cells} |")
    return "\n".join(lines)


if __name__ == "__main__":
    rows = eval_rows_from_pairs(load_pairs(), "heldout")
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    HELDOUT_PATH.write_text(text, encoding="utf-8")
    print(f"wrote {len(rows)} rows to {HELDOUT_PATH}")
