"""jsonl readers (TRL preference format) and padded batches with response-only loss masks.

Every bad line is reported as `file:line: what is wrong`, before anything is trained or written.
"""

import json
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from nanorlhf import distributed
from nanorlhf.cli import autocast
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
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value):
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


def fit_to_length(prompt: list[int], response: list[int], max_len: int,
                  min_response: int = 16) -> tuple[list[int], list[int], bool]:
    """Make prompt + response fit max_len tokens. Returns (prompt, response, truncated?).

    The rule: cut the response at the right first, but keep at least min(len(response), min_response)
    of its tokens; if that is not enough, drop prompt tokens from the left (the end of a prompt - the
    question and the assistant header - matters most). The result never exceeds max_len: when even
    the response's kept part is longer than max_len, its first max_len tokens are all that remain."""
    if len(prompt) + len(response) <= max_len:
        return prompt, response, False
    keep_response = min(max(min(len(response), min_response), max_len - len(prompt)), max_len)
    response = response[:keep_response]
    prompt = prompt[max(len(prompt) + len(response) - max_len, 0):]  # the last max_len - len(response)
    return prompt, response, True


def check_vocab(ids: list[int], vocab_size: int, where: str) -> None:
    """A token id the model has no embedding for means tokenizer and model do not belong together."""
    if ids and max(ids) >= vocab_size:
        raise UserError(f"{where}: token id {max(ids)} is outside the model's vocabulary ({vocab_size}): "
                        "tokenizer and model do not match")


def epoch_batches(items: list, batch_size: int, epochs: int, seed: int) -> list[list[list]]:
    """Per epoch, `items` shuffled (one seeded RNG across the epochs) and cut into micro-batches of
    batch_size (the last may be short). Same seed, same order: under torchrun every rank builds the same
    batches, and a resumed run needs only its step number."""
    rng = random.Random(seed)
    out = []
    for _ in range(epochs):
        order = items[:]
        rng.shuffle(order)
        out.append([order[i:i + batch_size] for i in range(0, len(order), batch_size)])
    return out


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


def sequence_logps(logits: Tensor, input_ids: Tensor, loss_mask: Tensor, average: bool = False) -> Tensor:
    """Log-prob of the masked tokens of each row: logits (B, T, V), input_ids (B, T), loss_mask (B, T) -> (B,).

    The result is fp32 for bf16/fp16/fp32 logits (fp64 stays fp64).
    loss_mask is aligned with input_ids: 1 where the token is a target (the completion, including its
    EOS), 0 on prompt and padding. Logits at position t predict token t+1, so token t+1 is scored by
    logits[:, t] and loss_mask[:, 0] is never used (the first token has nothing predicting it).
    average=False gives the sum over the masked tokens (DPO); True gives their mean (IPO), and 0 for a
    row with no masked tokens.
    """
    # At least fp32 before log_softmax: in bf16/fp16 the normaliser loses precision and fp16 can
    # overflow (trl#878). promote_types keeps fp64 as fp64 (the tests' precision) instead of narrowing it.
    logits = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))
    logps = logits.log_softmax(dim=-1)  # (B, T-1, V)
    targets = input_ids[:, 1:]  # (B, T-1)
    token_logps = logps.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    mask = loss_mask[:, 1:].to(token_logps.dtype)
    # where(), not token_logps * mask: an unscored position holding -inf would give -inf * 0 = nan.
    total = torch.where(mask > 0, token_logps, 0.0).sum(dim=-1)
    if average:
        return total / mask.sum(dim=-1).clamp(min=1)
    return total


def response_logps(model, batch: dict[str, Tensor], average: bool = False) -> Tensor:
    """sequence_logps(model(input_ids), ...) for a collate() batch, but the vocabulary projection runs
    only where a token is scored: prompt and padding positions (a third of a typical pair) skip the
    largest matmul and the log-softmax over the vocabulary. -> (B,) fp32."""
    scored = batch["loss_mask"][:, 1:].bool()  # (B, T-1): position t predicts token t+1
    at = F.pad(scored, (0, 1))  # (B, T): the last position predicts nothing
    # one call of model's forward (DDP and FSDP hook it); fp32 before the log-softmax even under bf16 autocast
    logits = model(batch["input_ids"], batch["attention_mask"], logits_at=at).float()  # (N, V), N = scored tokens
    targets = batch["input_ids"][:, 1:][scored]  # (N,)
    token_logps = logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)  # (N,)
    rows = torch.arange(scored.shape[0], device=scored.device)[:, None].expand_as(scored)[scored]  # (N,)
    total = torch.zeros(scored.shape[0], device=scored.device).index_add(0, rows, token_logps)
    return total / scored.sum(-1).clamp(min=1) if average else total


@torch.no_grad()
def response_logps_batched(model, prompts: list[list[int]], responses: list[list[int]], pad_id: int,
                           batch_size: int = 16) -> list[float]:
    """log p(response | prompt), summed over each response's tokens: response_logps in right-padded batches
    on the model's device (bf16 autocast on CUDA)."""
    device, out = next(model.parameters()).device, []
    for i in range(0, len(prompts), batch_size):
        batch = collate(prompts[i:i + batch_size], responses[i:i + batch_size], pad_id)
        with autocast(device):
            out += response_logps(model, {k: v.to(device) for k, v in batch.items()}).tolist()
    return out


# --- preference pairs: one forward pass scores a batch's chosen and rejected responses together ---

def pair_batch(pairs: list[dict], pad_id: int) -> dict[str, Tensor]:
    """B pairs -> one batch of 2B rows: chosen rows first, then rejected (one forward pass for both)."""
    prompts = [p["prompt"] for p in pairs]
    return collate(prompts + prompts, [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs], pad_id)


def batch_logps(model, batch: dict[str, Tensor], dev: torch.device, average: bool) -> tuple[Tensor, Tensor]:
    """-> (chosen_logps, rejected_logps), each (B,), for a pair_batch."""
    batch = {k: v.to(dev) for k, v in batch.items()}
    with autocast(dev):
        logps = response_logps(model, batch, average)  # (2B,), fp32; = sequence_logps of the full logits
    return logps.chunk(2)


@torch.no_grad()
def reference_logps(model, batches: list[list[dict]], pad_id: int, dev, average: bool) -> None:
    """π_ref never changes, so score every pair once before training and store it on the pair.
    With LoRA, call it inside lora.disabled(model): the reference is the base network, no second copy."""
    model.eval()
    for chunk in distributed.bar(batches, desc="reference log-probs", unit="batch"):
        chosen, rejected = batch_logps(model, pair_batch(chunk, pad_id), dev, average)
        for pair, c, r in zip(chunk, chosen.tolist(), rejected.tolist()):
            pair["ref_chosen"], pair["ref_rejected"] = c, r
