"""Tokenizer + chat formatting, from a checkpoint directory's tokenizer files.

`tokenizers` does the BPE; this module adds what lives in tokenizer_config.json (special tokens,
the chat template) and renders conversations in the two formats our models use:

ChatML (SmolLM2, Qwen2):            Llama-3 headers:
  <|im_start|>system                  <|begin_of_text|><|start_header_id|>system<|end_header_id|>
  {system}<|im_end|>                  (blank line){system}<|eot_id|><|start_header_id|>user...
  <|im_start|>user ...                ...<|start_header_id|>assistant<|end_header_id|>(blank line)
  <|im_start|>assistant

Prompt and response are encoded separately and concatenated as ids, so no BPE merge crosses the
boundary and the loss mask is exact. Nothing is ever BOS'ed twice: we build ids, not strings.
"""

import json
import re
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from nanorlhf.errors import UserError

# Llama 3.1/3.2 templates always emit this block; a fixed date keeps rollouts reproducible
LLAMA3_DATE_BLOCK = "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"


def _token_text(value, key: str = "token",
                where: Path | str = "tokenizer_config.json") -> str | None:
    """A special token in tokenizer_config.json: a string or {"content": string, ...}
    (tools/convert.py reads them too)."""
    text = value.get("content") if isinstance(value, dict) else value
    if text is not None and not isinstance(text, str):
        raise UserError(f"{where}: {key} is {value!r}; expected a token string")
    return text


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected a JSON object, got a {type(value).__name__}")
    return value


def _eos_ids(path: Path) -> set[int]:
    """eos_token_id of a config.json / generation_config.json: an id or a list of ids."""
    eos = _read_json(path).get("eos_token_id")
    ids = eos if isinstance(eos, list) else [eos]
    if not all(i is None or isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise UserError(f"{path}: eos_token_id is {eos!r}; expected a token id or a list of them")
    return set(ids)


class Tokenizer:
    def __init__(self, model_dir: str | Path):
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise UserError(f"{model_dir}: no tokenizer.json (nanorlhf needs the fast-tokenizer "
                            "file)")
        try:
            self.tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # `tokenizers` raises a bare Exception for a malformed file
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(f"{path}: not a readable tokenizer file ({reason})") from None
        config_path = model_dir / "tokenizer_config.json"
        config = _read_json(config_path)
        # newer saves keep the template in a file beside the config
        template_file = model_dir / "chat_template.jinja"
        try:
            template = (template_file.read_text() if template_file.is_file()
                        else config.get("chat_template"))
        except UnicodeDecodeError as e:
            raise UserError(f"{template_file}: not UTF-8 text ({e})") from None
        if not isinstance(template or "", str):  # a list of named templates: not one we can read
            raise UserError(f"{config_path}: chat_template is not a string")
        self.chat_template = template or ""
        self.format = self._detect_format()

        def token_id(key: str) -> int | None:
            text = _token_text(config.get(key), key, config_path)
            return self.tok.token_to_id(text) if text else None

        turn_end = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}.get(self.format)
        self.eos_id = self.tok.token_to_id(turn_end) if turn_end else token_id("eos_token")
        self.bos_id = token_id("bos_token")
        self.pad_id = token_id("pad_token")
        if self.pad_id is None:
            # pads are masked out anyway
            self.pad_id = self.eos_id if self.eos_id is not None else 0
        # stop on every end-of-sequence id anybody declares (config, generation config, template)
        stops = {self.eos_id, token_id("eos_token")}
        for name in ("config.json", "generation_config.json"):
            stops |= _eos_ids(model_dir / name)
        self.stop_ids = sorted(i for i in stops if i is not None)
        self.default_system = self._default_system()

    def _detect_format(self) -> str:
        chatml_template = "<|im_start|>" in self.chat_template or not self.chat_template
        if self.tok.token_to_id("<|im_start|>") is not None and chatml_template:
            return "chatml"
        if self.tok.token_to_id("<|start_header_id|>") is not None:
            return "llama3"
        return "plain"

    def _default_system(self) -> str | None:
        """ChatML templates (SmolLM2, Qwen) inject a system turn when none is given; keep that
        behaviour."""
        # the template's newline is a real one, or a "\n" escape inside a Jinja string literal
        match = re.search(r"<\|im_start\|>system(?:\n|\\n)(.+?)<\|im_end\|>", self.chat_template)
        return match.group(1) if match else None

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def chat_prompt(self, messages: list[dict] | str, system: str | None = None) -> list[int]:
        """Ids of a conversation up to and including the assistant's generation prompt.

        `messages`: [{"role": "system"|"user"|"assistant", "content": str}, ...] or one user string.
        """
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        if system is not None:
            messages = ([{"role": "system", "content": system}]
                        + [m for m in messages if m["role"] != "system"])
        if self.format == "chatml":
            if messages[0]["role"] != "system" and self.default_system:
                messages = [{"role": "system", "content": self.default_system}] + messages
            text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
            return self.encode(text + "<|im_start|>assistant\n")
        if self.format == "llama3":
            date = LLAMA3_DATE_BLOCK if "Cutting Knowledge Date" in self.chat_template else ""
            if date and messages[0]["role"] != "system":
                messages = [{"role": "system", "content": ""}] + messages
            turns = []
            for i, m in enumerate(messages):
                content = (date if i == 0 and m["role"] == "system" else "") + m["content"].strip()
                role = f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n"
                turns.append(f"{role}{content}<|eot_id|>")
            header = "<|start_header_id|>assistant<|end_header_id|>\n\n"
            return self.encode("<|begin_of_text|>" + "".join(turns) + header)
        # plain (base) models: BOS + the text of the turns
        text = "\n\n".join(m["content"] for m in messages) + "\n"
        return ([self.bos_id] if self.bos_id is not None else []) + self.encode(text)

    def response_ids(self, response: str) -> list[int]:
        """A response's ids, ending with the end-of-turn token the model must learn to emit."""
        return self.encode(response) + ([self.eos_id] if self.eos_id is not None else [])
