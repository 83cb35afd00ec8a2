"""Reward models: a Backbone with a scalar head, the Bradley-Terry loss, and pluggable gold scorers.

An RM maps (prompt, response) to one number: the head applied to the last hidden state of the last
real token. Two checkpoint layouts load and save, told apart by the head's tensor name:

  score.weight            (1, H)  transformers' *ForSequenceClassification with num_labels=1
  regression_head.weight  (1, H)  UltraRM-13b (openbmb)

How (prompt, response) becomes the tokens an RM reads is its *template* (TEMPLATES): a message list
or a prompt string in, ids out. Each RM scores best on the format it was trained on, so the template
comes with the checkpoint: config.json's "nanorlhf_template" if set, else by layout
(regression_head: ultrarm; a DeBERTa encoder: pair; else chat). `rm:PATH@TEMPLATE` overrides it
(make_gold_scorer).

Which token is "last" comes from the attention mask, never from the pad id: with pad == eos
(SmolLM2) transformers' rightmost-non-pad rule reads the token before a final EOS. We append no EOS
(as UltraRM's card does), so the last real token is the response's last text token and transformers
agrees with us.

An RM trained on texts alone (train_rm.py: sentiment of a text, whatever was asked) records the one
prompt it saw as "nanorlhf_fixed_prompt" in its config.json; RMScorer then scores every response
under that prompt, so a gold or a fitness sees what the RM was trained on rather than requests it
never read.
"""

import copy
import math
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nanorlhf.checkpoint import (config_from_hf, hf_config_of, load_state_into, plain_tensors,
                                 read_config, read_safetensors, resolve_model, write_checkpoint_dir)
from nanorlhf.model import Backbone, ModelConfig, Transformer, autocast
from nanorlhf.data import fit_to_length
from nanorlhf.step import collate, pair_batch
from nanorlhf.deberta import DebertaRewardModel, load_deberta_reward_model, score_pairs
from nanorlhf.errors import UserError

HEAD_NAMES = ("score", "regression_head")  # transformers' SequenceClassification, UltraRM
# the RM templates; pair_ids documents the causal ones, deberta.encode_pairs the pair encoding
TEMPLATES = {"chat": "the tokenizer's chat format for the prompt, then the response (RMs trained "
                     "in nanorlhf)",
             "ultrarm": "BOS + 'Human: {prompt}\\n\\nAssistant: {response}' (UltraRM-13b's card)",
             "pair": "the tokenizer's (question, answer) pair encoding, [CLS] q [SEP] a [SEP] "
                     "(DeBERTa RMs)"}
# openbmb/UltraRM-13b's model card (README.md, "Usage"):
# `ultrarm_template = """Human: {instruction}\n\nAssistant: {completion}"""`, scored as
# `tokenizer(text)`: LlamaTokenizer adds BOS, no EOS. (The card's two WebGPT examples are written
# with a single newline; the template it declares has a blank line, and we follow that.)
ULTRARM_TEMPLATE = "Human: {instruction}\n\nAssistant: {completion}"
ARCH_PREFIX = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}


def last_token_index(attention_mask: Tensor) -> Tensor:
    """(B, T) 1 = token, 0 = pad -> (B,) index of each row's last real token (left, right or no
    padding)."""
    T = attention_mask.shape[1]
    positions = torch.arange(T, device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(-1)  # the largest position whose mask is 1


class RewardModel(nn.Module):
    """Backbone + bias-free Linear(H, 1). `rm(ids, mask)` -> scores (B,), fp32."""

    def __init__(self, cfg: ModelConfig, head_name: str = "score"):
        super().__init__()
        assert head_name in HEAD_NAMES, head_name
        # head_name: the tensor name save_reward_model writes
        self.cfg, self.head_name = cfg, head_name
        # how (prompt, response) is turned into ids: pair_ids
        self.template = default_template(head_name)
        self.fixed_prompt: str | None = None  # set: the RM was trained on (this prompt, text) only
        self.model = Backbone(cfg)
        self.score = nn.Linear(cfg.hidden_size, 1, bias=False)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        hidden = self.model(input_ids, attention_mask)  # (B, T, H)
        if attention_mask is None:
            last = torch.full((input_ids.shape[0],), input_ids.shape[1] - 1,
                              device=input_ids.device)
        else:
            last = last_token_index(attention_mask)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, H)
        return self.score(pooled).squeeze(-1).float()  # (B,)


def default_template(head_name: str) -> str:
    """The template of a causal RM whose config.json names none: UltraRM's for its layout, else
    chat."""
    return "ultrarm" if head_name == "regression_head" else "chat"


def check_template(template: str, deberta: bool, where: str) -> str:
    """`template` if it is one the RM can read: pair for an encoder, chat or ultrarm for a causal
    LM."""
    if template not in TEMPLATES:
        raise UserError(f"{where}: unknown reward-model template {template!r} (one of "
                        f"{', '.join(TEMPLATES)})")
    if (template == "pair") != deberta:
        kind = ("a DeBERTa encoder RM reads only 'pair'" if deberta
                else "'pair' is for DeBERTa encoder RMs")
        raise UserError(f"{where}: template {template!r} does not fit this reward model: {kind}")
    return template


def load_reward_model(path: str | Path, dtype: torch.dtype = torch.float32,
                      device: str | torch.device = "cpu",
                      template: str | None = None) -> RewardModel | DebertaRewardModel:
    """Load either layout (detected from the head's tensor name) from a directory or local HF cache
    id; a config.json with model_type deberta-v2 (OpenAssistant's RMs) loads the DeBERTa encoder RM
    instead. `template` (a TEMPLATES key) overrides the checkpoint's own (the module docstring says
    how it is chosen)."""
    model_dir = resolve_model(str(path))
    hf = read_config(model_dir)
    where = str(model_dir / "config.json")
    if hf.get("model_type") == "deberta-v2":
        rm = load_deberta_reward_model(model_dir, hf, dtype, device)
        rm.template = check_template(template or hf.get("nanorlhf_template") or "pair", True, where)
        return rm
    tensors = read_safetensors(model_dir)
    found = [h for h in HEAD_NAMES if f"{h}.weight" in tensors]
    if not found:
        hint = (" (it has lm_head.weight: a causal LM, not a reward model)"
                if "lm_head.weight" in tensors else "")
        raise UserError(f"{model_dir}: no reward head: expected a tensor named 'score.weight' "
                        f"(*ForSequenceClassification) or 'regression_head.weight' (UltraRM){hint}")
    head_name = found[0]
    head = tensors.pop(f"{head_name}.weight")
    if head.ndim != 2 or head.shape[0] != 1:
        raise UserError(f"{model_dir}: {head_name}.weight has shape {list(head.shape)}; "
                        "a reward model has one output (num_labels = 1)")
    tensors["score.weight"] = head
    cfg = config_from_hf(hf, set(tensors), where=str(model_dir / "config.json"))
    with torch.device("meta"):
        rm = RewardModel(cfg, head_name)
    load_state_into(rm, tensors, str(model_dir), dtype, ignore=("lm_head.weight",))
    rm.model_dir = model_dir
    rm.fixed_prompt = hf.get("nanorlhf_fixed_prompt")
    rm.template = check_template(template or hf.get("nanorlhf_template") or rm.template, False,
                                 where)
    return rm.to(device)


def save_reward_model(rm: RewardModel, out_dir: str | Path,
                      copy_from: str | Path | None = None) -> Path:
    """Write `rm` in its own layout. The score layout loads with transformers'
    AutoModelForSequenceClassification: num_labels 1 and a pad_token_id (it refuses batches without
    one)."""
    dtype = next(rm.parameters()).dtype
    tensors = plain_tensors(rm)
    tensors[f"{rm.head_name}.weight"] = tensors.pop("score.weight")
    copy_from = copy_from or getattr(rm, "model_dir", None)
    config = hf_config_of(rm.cfg, dtype)
    prefix = ARCH_PREFIX.get(config["model_type"], "Llama")
    config["architectures"] = ["LlamaRewardModel" if rm.head_name == "regression_head"
                               else f"{prefix}ForSequenceClassification"]
    config.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    if getattr(rm, "fixed_prompt", None) is not None:
        # transformers keeps unknown keys as attributes
        config["nanorlhf_fixed_prompt"] = rm.fixed_prompt
    config.pop("nanorlhf_template", None)
    # recorded only where the layout would not imply it
    if rm.template != default_template(rm.head_name):
        config["nanorlhf_template"] = rm.template
    if config.get("pad_token_id") is None:
        eos = config.get("eos_token_id")
        config["pad_token_id"] = ((eos[0] if isinstance(eos, list) else eos)
                                  if eos is not None else 0)
    return write_checkpoint_dir(Path(out_dir), config, tensors, copy_from)


def reward_model_from_lm(lm: Transformer, seed: int = 0) -> RewardModel:
    """A proxy RM: a copy of `lm`'s backbone (lm itself is untouched) and a fresh head drawn from
    N(0, 1/(H+1)) as in Stiennon et al. 2020 (arXiv 2009.01325, p. 11): initial scores are small."""
    param = next(lm.parameters())
    with torch.device("meta"):
        rm = RewardModel(lm.cfg, "score")
    rm.model = copy.deepcopy(lm.model)
    gen = torch.Generator().manual_seed(seed)
    std = 1.0 / math.sqrt(lm.cfg.hidden_size + 1)
    weight = torch.randn((1, lm.cfg.hidden_size), generator=gen) * std
    rm.score = nn.Linear(lm.cfg.hidden_size, 1, bias=False, device=param.device, dtype=param.dtype)
    with torch.no_grad():
        rm.score.weight.copy_(weight)
    if getattr(lm, "model_dir", None) is not None:
        rm.model_dir = lm.model_dir  # its tokenizer files travel with the saved RM
    return rm


def bradley_terry_loss(chosen_scores: Tensor, rejected_scores: Tensor,
                       margin: Tensor | float | None = None,
                       center_coef: float = 0.0) -> tuple[Tensor, Tensor]:
    """Per-pair Bradley-Terry loss and accuracy; nothing is reduced (the caller takes the mean).

        loss = -log σ(r_w - r_l - m) + c · (r_w + r_l)²

    P(y_w ≻ y_l) = σ(r_w - r_l) is the Bradley-Terry model; m is an optional per-pair margin
    (Llama 2); c > 0 (0.01 in arXiv 2312.09244) pins the scores near zero, which BT alone leaves
    free (adding a constant to every score changes nothing). -log σ(x) is computed as softplus(-x).
    Returns (losses (B,), accuracy (B,) = 1.0 where r_w > r_l strictly: ties count as wrong).
    """
    diff = chosen_scores - rejected_scores
    if margin is not None:
        diff = diff - margin
    losses = F.softplus(-diff)
    if center_coef:
        losses = losses + center_coef * (chosen_scores + rejected_scores) ** 2
    return losses, (chosen_scores > rejected_scores).to(chosen_scores.dtype)


def bradley_terry_sum(rm, pairs: list[dict], pad_id: int, dev: torch.device,
                      center_coef: float = 0.0) -> tuple[Tensor, int]:
    """Token-id pairs {prompt, chosen, rejected} -> (bradley_terry_loss summed over the pairs, their
    count), from one forward of `rm` (a RewardModel, or the DDP net around one) over the chosen rows
    then the rejected rows (logprobs.pair_batch). The sum and count let a caller take the mean of a
    batch split over ranks (rest_loop.fit)."""
    batch = pair_batch(pairs, pad_id)  # chosen rows, then rejected rows
    with autocast(dev):
        scores = rm(batch["input_ids"].to(dev), batch["attention_mask"].to(dev))
    chosen, rejected = scores.chunk(2)
    return bradley_terry_loss(chosen, rejected, center_coef=center_coef)[0].sum(), len(pairs)


def pair_ids(tok, prompt: str | list[dict], response: str,
             template: str = "chat") -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) a causal RM scores, in its template. No EOS: the score is read on
    the response's last token (UltraRM's card gathers at attention_mask.cumsum(1).argmax(1): the
    last real token).

    chat:    tok.chat_prompt(prompt) and tok.encode(response), encoded apart (no merge across the
             boundary).
    ultrarm: BOS + ULTRARM_TEMPLATE as one string, as the card's `tokenizer(text)` encodes it;
             returned as prompt ids only, so a long pair is cut from its start, BOS and all
             (fit_to_length). A message list is scored by its last message, the instruction the
             response answers.
    """
    if template == "ultrarm":
        question = prompt if isinstance(prompt, str) else prompt[-1]["content"]
        bos = [tok.bos_id] if tok.bos_id is not None else []
        text = ULTRARM_TEMPLATE.format(instruction=question, completion=response)
        return bos + tok.encode(text), []
    if template != "chat":
        raise ValueError(f"pair_ids: template {template!r} is not a causal RM's (chat, ultrarm)")
    return tok.chat_prompt(prompt), tok.encode(response)


@torch.no_grad()
def score_texts(rm: RewardModel, tok, prompts: list, responses: list[str], batch_size: int = 8,
                max_len: int | None = None) -> list[float]:
    """Score (prompt, response) pairs in right-padded batches; prompts are strings or message
    lists."""
    # an encoder RM reads its tokenizer's (question, answer) pair encoding
    if isinstance(rm, DebertaRewardModel):
        return score_pairs(rm, tok, prompts, responses, batch_size, max_len)
    rm.eval()
    device = next(rm.parameters()).device
    max_len = max_len or rm.cfg.max_position_embeddings
    pairs = [fit_to_length(*pair_ids(tok, p, r, rm.template), max_len)[:2]
             for p, r in zip(prompts, responses)]
    scores = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        batch = collate([p for p, _ in chunk], [r for _, r in chunk], tok.pad_id)
        with autocast(device):  # bf16 on CUDA, like every other forward; the scores come back fp32
            scores += rm(batch["input_ids"].to(device), batch["attention_mask"].to(device)).tolist()
    return scores


class GoldScorer(Protocol):
    """Anything that scores responses to prompts: higher is better."""

    def score(self, prompts: list[str], responses: list[str]) -> list[float]: ...


class RMScorer:
    """A reward-model checkpoint (either layout) with the tokenizer from its own directory. An RM
    trained on texts alone (its fixed_prompt) scores every response under that prompt: the given
    ones are ignored."""

    def __init__(self, path: str | Path, dtype: torch.dtype | None = None,
                 device: str | torch.device = "cpu", batch_size: int = 8,
                 template: str | None = None):
        from nanorlhf.tokenizer import Tokenizer

        self.rm = load_reward_model(path, dtype or scorer_dtype(device), device,
                                    template=template).eval()
        self.tok = Tokenizer(self.rm.model_dir)
        self.batch_size = batch_size

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        if self.rm.fixed_prompt is not None:
            prompts = [self.rm.fixed_prompt] * len(responses)
        return score_texts(self.rm, self.tok, prompts, responses, self.batch_size)


class VaderScorer:
    """VADER sentiment (Hutto & Gilbert 2014, PyPI vaderSentiment): the response's compound score
    in [-1, 1]."""

    def __init__(self):
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError:
            raise UserError("gold scorer 'vader' needs the vaderSentiment package: "
                            "pip install vaderSentiment") from None
        self.analyzer = SentimentIntensityAnalyzer()

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        return [self.analyzer.polarity_scores(r)["compound"] for r in responses]


def scorer_dtype(device: str | torch.device) -> torch.dtype:
    """A frozen scorer's weights: bf16 on CUDA, where its forwards run under bf16 autocast anyway,
    so only the memory changes (a 13B RM takes 26 GB, not 52); fp32 on the CPU, which runs without
    autocast."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def parse_rm_spec(spec: str) -> tuple[str, str | None]:
    """'rm:PATH' or 'rm:PATH@TEMPLATE' -> (PATH, TEMPLATE or None). A PATH that itself holds '@'
    and exists is taken whole; an unknown '@word' is an error rather than a missing directory."""
    path = spec.removeprefix("rm:")
    head, at, tail = path.rpartition("@")
    if not at or not head or Path(path).expanduser().exists():
        return path, None
    if tail not in TEMPLATES:
        raise UserError(f"{spec}: unknown reward-model template {tail!r} after '@' (one of "
                        f"{', '.join(TEMPLATES)})")
    return head, tail


def make_gold_scorer(spec: str, dtype: torch.dtype | None = None,
                     device: str | torch.device = "cpu", batch_size: int = 8) -> GoldScorer:
    """'rm:PATH' or 'rm:PATH@TEMPLATE' (a reward-model checkpoint directory or local HF cache id,
    scored in its own template or TEMPLATE; loaded on `device`, in `dtype`, default
    scorer_dtype(device)) or 'vader'."""
    if spec.startswith("rm:") and len(spec) > 3:
        path, template = parse_rm_spec(spec)
        return RMScorer(path, dtype, device, batch_size, template)
    if spec == "vader":
        return VaderScorer()
    raise UserError(f"gold scorer {spec!r}: expected 'rm:PATH' (a reward-model checkpoint "
                    f"directory; rm:PATH@TEMPLATE picks its template: {' | '.join(TEMPLATES)}) "
                    "or 'vader' (VADER sentiment of the response)")
