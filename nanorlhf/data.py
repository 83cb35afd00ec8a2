"""jsonl readers (TRL preference format) and padded batches with response-only loss masks.

Every bad line is reported as `file:line: what is wrong`, before anything is trained or written.
"""

import json
from pathlib import Path

import torch

from nanorlhf.errors import UserError


def read_jsonl(path: str | Path) -> list[tuple[str, dict]]:
    """-> [(\"file:line\", object)] for every non-blank line; one clear UserError for the first bad one."""
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


def _messages(value, where: str, key: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and value and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value):
        return value
    raise UserError(f"{where}: field '{key}' must be a string or a list of {{role, content}} messages")


def _response(value, where: str, key: str) -> str:
    if isinstance(value, list):  # conversational: [{"role": "assistant", "content": ...}]
        value = value[-1].get("content") if value and isinstance(value[-1], dict) else None
    if not isinstance(value, str):
        raise UserError(f"{where}: field '{key}' must be a string or a list of messages")
    if not value.strip():
        raise UserError(f"{where}: field '{key}' is an empty response")
    return value


def read_preferences(path: str | Path) -> list[dict]:
    """TRL preference rows -> [{"prompt": messages, "chosen": str, "rejected": str, ...extra fields}].

    Accepts the standard form {"prompt": str, "chosen": str, "rejected": str} and the conversational
    one (prompt = list of messages, chosen/rejected = [{"role": "assistant", "content": ...}]).
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


def fit_to_length(prompt: list[int], response: list[int], max_len: int, min_response: int = 16) -> tuple[list[int], list[int], bool]:
    """Make prompt + response fit max_len tokens. The rule: cut the response at the right first, but
    keep at least `min_response` of its tokens; if that is not enough, drop prompt tokens from the
    left (the end of a prompt - the question and the assistant header - matters most).
    Returns (prompt, response, truncated?)."""
    if len(prompt) + len(response) <= max_len:
        return prompt, response, False
    keep_response = max(min(len(response), min_response), max_len - len(prompt))
    response = response[:keep_response]
    prompt = prompt[len(prompt) + len(response) - max_len:] if len(prompt) + len(response) > max_len else prompt
    return prompt, response, True


def collate(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch of prompt+response rows.

    -> input_ids (B, T), attention_mask (B, T) 1 on real tokens, loss_mask (B, T) 1 on response tokens
    only: the tokens whose log-probability the losses score.
    """
    width = max(len(p) + len(r) for p, r in zip(prompts, responses))
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    loss_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, (p, r) in enumerate(zip(prompts, responses)):
        input_ids[row, :len(p) + len(r)] = torch.tensor(p + r, dtype=torch.long)
        attention_mask[row, :len(p) + len(r)] = 1
        loss_mask[row, len(p):len(p) + len(r)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}
