"""jsonl readers (TRL preference format, prompts) and the token-level rules for fitting and
batching them.

Every bad line is reported as `file:line: what is wrong`, before anything is trained or written.
"""

import json
import random
import sys
from pathlib import Path

from nanorlhf.errors import UserError


def read_jsonl(path: str | Path) -> list[tuple[str, dict]]:
    """-> [(\"file:line\", object)] for every non-blank line; one clear UserError for the first
    bad one."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    rows = []
    for lineno, raw in enumerate(path.read_bytes().splitlines(), start=1):
        where = f"{path}:{lineno}"
        try:
            line = raw.decode("utf-8").lstrip("\ufeff")
        except UnicodeDecodeError:
            raise UserError(f"{where}: not valid UTF-8") from None
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise UserError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        rows.append((where, obj))
    if not rows:
        raise UserError(f"{path}: no rows")
    return rows


def read_prompts(path: str | Path) -> list[str]:
    """A jsonl of {"prompt": str} rows -> the prompts."""
    prompts = []
    for where, obj in read_jsonl(path):
        if not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
            raise UserError(f"{where}: field 'prompt' must be a non-empty string")
        prompts.append(obj["prompt"])
    return prompts


def _messages(value, where: str, key: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and value and all(
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
            for m in value):
        return value
    raise UserError(f"{where}: field '{key}' must be a string or a list of "
                    "{role, content} messages")


def _response(value, where: str, key: str) -> str:
    if isinstance(value, list):  # conversational: [{"role": "assistant", "content": ...}]
        value = value[-1].get("content") if value and isinstance(value[-1], dict) else None
    if not isinstance(value, str):
        raise UserError(f"{where}: field '{key}' must be a string or a list of messages")
    if not value.strip():
        raise UserError(f"{where}: field '{key}' is an empty response")
    return value


def read_preferences(path: str | Path) -> list[dict]:
    """TRL preference rows -> [{"prompt": messages, "chosen": str, "rejected": str, ...}].

    Accepts the standard form {"prompt": str, "chosen": str, "rejected": str} and the conversational
    one (prompt = list of messages, chosen/rejected = [{"role": "assistant", "content": ...}]).
    A row's extra fields are kept.
    """
    rows = []
    for where, obj in read_jsonl(path):
        for key in ("prompt", "chosen", "rejected"):
            if key not in obj:
                raise UserError(f"{where}: missing field '{key}'")
        rows.append({**obj, "prompt": _messages(obj["prompt"], where, "prompt"),
                     "chosen": _response(obj["chosen"], where, "chosen"),
                     "rejected": _response(obj["rejected"], where, "rejected"), "where": where})
    return rows


def fit_to_length(prompt: list[int], response: list[int], max_len: int,
                  min_response: int = 16) -> tuple[list[int], list[int], bool]:
    """Make prompt + response fit max_len tokens. Returns (prompt, response, truncated?).

    The rule: cut the response at the right first, but keep at least
    min(len(response), min_response) of its tokens; if that is not enough, drop prompt tokens from
    the left (the end of a prompt - the question and the assistant header - matters most). The
    result never exceeds max_len: when even the response's kept part is longer than max_len, its
    first max_len tokens are all that remain."""
    if len(prompt) + len(response) <= max_len:
        return prompt, response, False
    keep_response = min(max(min(len(response), min_response), max_len - len(prompt)), max_len)
    response = response[:keep_response]
    # the last max_len - len(response) prompt tokens
    prompt = prompt[max(len(prompt) + len(response) - max_len, 0):]
    return prompt, response, True


def fit_prompts(prompts: list[list[int]], context: int, max_new_tokens: int
                ) -> list[list[int]]:
    """The one rule for a prompt longer than the model can read with its reply: it keeps its last
    context - max_new_tokens tokens (cut from the left, as fit_to_length cuts training prompts: the
    end, with the question and the assistant header, matters most), and one line says how many
    were cut. A --max-new-tokens that leaves no room for any prompt is refused."""
    room = context - max_new_tokens
    if room < 1:
        raise UserError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the "
                        f"model's context of {context} tokens")
    cut = sum(len(p) > room for p in prompts)
    if cut:
        print(f"{cut} of {len(prompts)} prompts longer than the model's context allows ({context} "
              f"tokens less {max_new_tokens} new): each keeps its last {room}", file=sys.stderr)
    return [p[-room:] if len(p) > room else p for p in prompts]


def check_vocab(ids: list[int], vocab_size: int, where: str) -> None:
    """A token id the model has no embedding for means tokenizer and model do not belong
    together."""
    if ids and max(ids) >= vocab_size:
        raise UserError(f"{where}: token id {max(ids)} is outside the model's vocabulary "
                        f"({vocab_size}): tokenizer and model do not match")


def epoch_batches(items: list, batch_size: int, epochs: int, seed: int) -> list[list[list]]:
    """Per epoch, `items` shuffled (one seeded RNG across the epochs) and cut into micro-batches of
    batch_size (the last may be short). Same seed, same order: under torchrun every rank builds the
    same batches, and a resumed run needs only its step number."""
    rng = random.Random(seed)
    out = []
    for _ in range(epochs):
        order = items[:]
        rng.shuffle(order)
        out.append([order[i:i + batch_size] for i in range(0, len(order), batch_size)])
    return out
