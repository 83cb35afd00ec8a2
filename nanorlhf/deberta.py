"""A DeBERTa-v2/v3 encoder reward model in one file, as transformers'
DebertaV2ForSequenceClassification computes it.

OpenAssistant's reward-model-deberta-v3-large is one: it reads (question, answer) as its tokenizer's
pair encoding, [CLS] q [SEP] a [SEP], and maps the [CLS] token's final state to one score. What sets
DeBERTa apart is disentangled attention (He et al. 2021, arXiv 2006.03654, eq. 4): besides
content-to-content, each score adds content-to-position and position-to-content terms read from a
table of relative-distance embeddings,

    A_ij = (q_i·k_j + q_i·kr_δ(i,j) [c2p] + k_j·qr_δ(i,j) [p2c]) / sqrt(d · (1 + number of terms)),

δ(i,j) = clamp(bucket(i - j) + span, 0, 2·span - 1). (The paper writes δ(j,i) in the p2c term;
transformers' code, ported from Microsoft's, reads the row of distance i - j in both terms, and we
follow the code: δ(j,i) moves the tiny test models' scores by ~5e-2, far outside the tests' 1e-4.)
v3 buckets distances log-spaced beyond position_buckets/2, so 2·position_buckets embeddings cover
any length.

Our module names are short; HF_NAMES maps them to the checkpoint's names
(deberta.encoder.layer.0...), and errors name the checkpoint's tensors. Dropout is left out: this
module only scores.
"""

import math
import re
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nanorlhf.checkpoint import read_safetensors
from nanorlhf.model import autocast
from nanorlhf.data import check_vocab, fit_to_length
from nanorlhf.step import collate
from nanorlhf.errors import UserError

ACTIVATIONS = {"gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
               "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
               "relu": F.relu, "tanh": torch.tanh, "silu": F.silu, "swish": F.silu}


@dataclass
class DebertaConfig:  # the config.json keys of DebertaV2Config that change what is computed
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    embedding_size: int = 0  # 0: hidden_size; else the embeddings are projected up to hidden_size
    max_position_embeddings: int = 512
    type_vocab_size: int = 0  # 0: token_type_ids are ignored (v3)
    layer_norm_eps: float = 1e-7
    hidden_act: str = "gelu"
    pooler_hidden_act: str = "gelu"
    # absolute position embeddings added to the input (v3: False)
    position_biased_input: bool = True
    relative_attention: bool = False
    # a subset of ("c2p", "p2c"); config.json may say "p2c|c2p" or a list
    pos_att_type: tuple[str, ...] = ()
    position_buckets: int = -1  # > 0: log-bucketed distances, and span = position_buckets
    max_relative_positions: int = -1  # < 1: max_position_embeddings
    # relative embeddings go through query_proj/key_proj, not their own
    share_att_key: bool = False
    norm_rel_ebd: str = "none"  # holds "layer_norm": a LayerNorm over the relative embedding table
    # > 0: a Conv1d branch after the first layer (DeBERTa-v2 xlarge/xxlarge)
    conv_kernel_size: int = 0
    conv_groups: int = 1
    conv_act: str = "tanh"

    @property
    def span(self) -> int:
        """Relative distances per side that have their own embedding: the table has 2·span rows."""
        return self.position_buckets if self.position_buckets > 0 else self.max_relative_positions


def deberta_config_from_hf(hf: dict, where: str) -> DebertaConfig:
    """DebertaConfig from a config.json with model_type deberta-v2; refuses what we cannot
    compute."""
    names = {f.name for f in fields(DebertaConfig)}
    cfg = DebertaConfig(**{k: v for k, v in hf.items() if k in names and v is not None})
    types = (cfg.pos_att_type.lower().split("|") if isinstance(cfg.pos_att_type, str)
             else cfg.pos_att_type)
    # like transformers, only c2p and p2c have an effect (v1's p2p does nothing in v2)
    cfg.pos_att_type = tuple(t.strip() for t in types if t.strip() in ("c2p", "p2c"))
    cfg.embedding_size = cfg.embedding_size or cfg.hidden_size
    if cfg.max_relative_positions < 1:
        cfg.max_relative_positions = cfg.max_position_embeddings
    for key in ("hidden_act", "pooler_hidden_act", "conv_act"):
        if getattr(cfg, key) not in ACTIVATIONS:
            raise UserError(f"{where}: {key} {getattr(cfg, key)!r} is not supported "
                            f"({', '.join(ACTIVATIONS)})")
    if cfg.hidden_size % cfg.num_attention_heads:
        raise UserError(f"{where}: hidden_size is not a multiple of num_attention_heads")
    if cfg.conv_kernel_size > 0 and cfg.conv_kernel_size % 2 == 0:
        raise UserError(f"{where}: conv_kernel_size {cfg.conv_kernel_size} is even (the conv keeps "
                        "length if odd)")
    return cfg


def log_bucket_position(rel: Tensor, buckets: int, max_position: int) -> Tensor:
    """Relative distances (long) -> bucketed distances (long): |rel| < buckets/2 stays exact,
    larger ones are log-spaced so that max_position maps near buckets. The sign is kept. Arithmetic
    in fp32, as transformers'."""
    mid = buckets // 2
    near = (rel < mid) & (rel > -mid)
    # a placeholder where near: avoids log(0), and the exact distance is kept below
    abs_pos = torch.where(near, torch.full_like(rel, mid - 1), rel.abs())
    log_pos = torch.ceil(torch.log(abs_pos / mid)
                         / torch.log(torch.tensor((max_position - 1) / mid)) * (mid - 1)) + mid
    return torch.where(abs_pos <= mid, rel.float(), log_pos * torch.sign(rel)).long()


class Layer(nn.Module):
    """Disentangled self-attention + feed-forward, each followed by a post-residual LayerNorm (BERT
    order)."""

    def __init__(self, cfg: DebertaConfig):
        super().__init__()
        self.cfg, self.n_head, h = cfg, cfg.num_attention_heads, cfg.hidden_size
        self.query_proj, self.key_proj = nn.Linear(h, h), nn.Linear(h, h)
        self.value_proj = nn.Linear(h, h)
        if cfg.relative_attention and not cfg.share_att_key:
            if "c2p" in cfg.pos_att_type:
                self.pos_key_proj = nn.Linear(h, h)
            if "p2c" in cfg.pos_att_type:
                self.pos_query_proj = nn.Linear(h, h)
        self.attn_out, self.attn_norm = nn.Linear(h, h), nn.LayerNorm(h, cfg.layer_norm_eps)
        self.ffn_in = nn.Linear(h, cfg.intermediate_size)
        self.ffn_out = nn.Linear(cfg.intermediate_size, h)
        self.ffn_norm = nn.LayerNorm(h, cfg.layer_norm_eps)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def heads(self, x: Tensor) -> Tensor:
        """(..., T, H) -> (..., heads, T, d)."""
        return x.unflatten(-1, (self.n_head, -1)).transpose(-3, -2)

    def relative_scores(self, q: Tensor, k: Tensor, rel_emb: Tensor, rel_pos: Tensor,
                        scale: float) -> Tensor:
        """c2p and p2c terms, (B, nh, T, T). rel_emb: (2·span, H); rel_pos: (T, T) bucketed
        i - j."""
        span, (B, nh, T, _) = self.cfg.span, q.shape
        idx = (rel_pos + span).clamp(0, 2 * span - 1).expand(B, nh, T, T)  # δ(i, j)
        shared = self.cfg.share_att_key
        scores = torch.zeros_like(q[..., :1]).expand(B, nh, T, T)
        # c2p: query i's content against the embedding of distance i - j
        if "c2p" in self.cfg.pos_att_type:
            # (nh, 2span, d)
            pos_k = self.heads((self.key_proj if shared else self.pos_key_proj)(rel_emb))
            # (B, nh, T, 2span) gathered -> (B, nh, T, T)
            scores = scores + (q @ pos_k.transpose(-1, -2)).gather(-1, idx) / scale
        # p2c: key j's content against the embedding of distance i - j
        if "p2c" in self.cfg.pos_att_type:
            # (nh, 2span, d)
            pos_q = self.heads((self.query_proj if shared else self.pos_query_proj)(rel_emb))
            # row j of k @ pos_q^T, gathered at clamp(-(j - i) + span) = δ(i, j), then transposed to
            # (i, j)
            flipped = (-rel_pos + span).clamp(0, 2 * span - 1).expand(B, nh, T, T)
            p2c = (k @ pos_q.transpose(-1, -2)).gather(-1, flipped).transpose(-1, -2)
            scores = scores + p2c / scale
        return scores

    def forward(self, x: Tensor, mask: Tensor, rel_emb: Tensor | None,
                rel_pos: Tensor | None) -> Tensor:
        """x: (B, T, H); mask: (B, 1, T, T) bool, True = query i may attend key j."""
        q, k = self.heads(self.query_proj(x)), self.heads(self.key_proj(x))
        v = self.heads(self.value_proj(x))
        # every term in the sum is divided by the same sqrt(d · terms), so the sum keeps unit scale
        scale = math.sqrt(q.shape[-1] * (1 + len(self.cfg.pos_att_type)))
        scores = q @ k.transpose(-1, -2) / scale  # (B, nh, T, T)
        if rel_emb is not None:
            scores = scores + self.relative_scores(q, k, rel_emb, rel_pos, scale)
        # the dtype's min, not -inf: a pad query's row is all masked and would be NaN under -inf
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        y = (scores.softmax(-1) @ v).transpose(1, 2).flatten(2)  # (B, nh, T, d) -> (B, T, H)
        x = self.attn_norm(self.attn_out(y) + x)
        return self.ffn_norm(self.ffn_out(self.act(self.ffn_in(x))) + x)


class DebertaRewardModel(nn.Module):
    """Embeddings + encoder + ContextPooler + Linear(H, 1). `rm(ids, types, mask)` -> scores (B,),
    fp32."""

    def __init__(self, cfg: DebertaConfig):
        super().__init__()
        self.cfg, self.fixed_prompt = cfg, None  # fixed_prompt: what RMScorer asks of every RM
        e, h, eps = cfg.embedding_size, cfg.hidden_size, cfg.layer_norm_eps
        self.word_embeddings = nn.Embedding(cfg.vocab_size, e)
        if cfg.position_biased_input:
            self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, e)
        if cfg.type_vocab_size > 0:
            self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, e)
        self.embed_proj = nn.Linear(e, h, bias=False) if e != h else None
        self.embed_norm = nn.LayerNorm(h, eps)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_hidden_layers))
        if cfg.relative_attention:
            self.rel_embeddings = nn.Embedding(2 * cfg.span, h)
            self.rel_norm = (nn.LayerNorm(h, eps) if "layer_norm" in cfg.norm_rel_ebd.lower()
                             else None)
        if cfg.conv_kernel_size > 0:
            k = cfg.conv_kernel_size
            self.conv = nn.Conv1d(h, h, k, padding=(k - 1) // 2, groups=cfg.conv_groups)
            self.conv_norm = nn.LayerNorm(h, eps)
        self.pooler = nn.Linear(h, h)
        self.classifier = nn.Linear(h, 1)

    def embed(self, input_ids: Tensor, token_type_ids: Tensor, keep: Tensor) -> Tensor:
        """(B, T) ids -> (B, T, H); pad positions are zeroed (keep: (B, T, 1) 1 = token)."""
        x = self.word_embeddings(input_ids)  # (B, T, E)
        # absolute positions 0..T-1: right padding leaves them unchanged
        if self.cfg.position_biased_input:
            x = x + self.position_embeddings(torch.arange(input_ids.shape[1], device=x.device))
        if self.cfg.type_vocab_size > 0:
            x = x + self.token_type_embeddings(token_type_ids)
        if self.embed_proj is not None:
            x = self.embed_proj(x)  # (B, T, E) -> (B, T, H)
        return self.embed_norm(x) * keep

    def forward(self, input_ids: Tensor, token_type_ids: Tensor | None = None,
                attention_mask: Tensor | None = None) -> Tensor:
        """input_ids, token_type_ids, attention_mask: (B, T), right-padded -> scores (B,) fp32."""
        token_type_ids = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        real = attention_mask.bool()
        keep = real[..., None].to(self.embed_norm.weight.dtype)  # (B, T, 1)
        mask = (real[:, :, None] & real[:, None, :])[:, None]  # (B, 1, T, T): both ends real tokens
        rel_emb = rel_pos = None
        if self.cfg.relative_attention:
            rel_emb = self.rel_embeddings.weight  # (2·span, H), shared by every layer
            rel_emb = self.rel_norm(rel_emb) if self.rel_norm is not None else rel_emb
            pos = torch.arange(input_ids.shape[1], device=input_ids.device)
            # (T, T): the distance i - j from query i to key j
            rel_pos = pos[:, None] - pos[None, :]
            if self.cfg.position_buckets > 0:
                rel_pos = log_bucket_position(rel_pos, self.cfg.position_buckets,
                                              self.cfg.max_relative_positions)
        x = embedded = self.embed(input_ids, token_type_ids, keep)
        for i, layer in enumerate(self.layers):
            x = layer(x, mask, rel_emb, rel_pos)
            # local n-gram features from the embeddings
            if i == 0 and self.cfg.conv_kernel_size > 0:
                conv = self.conv(embedded.transpose(1, 2)).transpose(1, 2) * keep  # (B, T, H)
                x = self.conv_norm(x + ACTIVATIONS[self.cfg.conv_act](conv)) * keep
        # ContextPooler: the [CLS] state
        pooled = ACTIVATIONS[self.cfg.pooler_hidden_act](self.pooler(x[:, 0]))
        return self.classifier(pooled).squeeze(-1).float()


# our name -> the checkpoint's (first match wins): DebertaV2ForSequenceClassification's module tree
HF_NAMES = [
    (r"embed_norm\.", "deberta.embeddings.LayerNorm."),
    (r"(word|position|token_type)_embeddings\.|embed_proj\.", r"deberta.embeddings.\g<0>"),
    (r"layers\.(\d+)\.attn_out\.", r"deberta.encoder.layer.\1.attention.output.dense."),
    (r"layers\.(\d+)\.attn_norm\.", r"deberta.encoder.layer.\1.attention.output.LayerNorm."),
    (r"layers\.(\d+)\.ffn_in\.", r"deberta.encoder.layer.\1.intermediate.dense."),
    (r"layers\.(\d+)\.ffn_out\.", r"deberta.encoder.layer.\1.output.dense."),
    (r"layers\.(\d+)\.ffn_norm\.", r"deberta.encoder.layer.\1.output.LayerNorm."),
    # query/key/value(/pos) projections
    (r"layers\.(\d+)\.", r"deberta.encoder.layer.\1.attention.self."),
    (r"rel_embeddings\.", "deberta.encoder.rel_embeddings."),
    (r"rel_norm\.", "deberta.encoder.LayerNorm."),
    (r"conv\.", "deberta.encoder.conv.conv."),
    (r"conv_norm\.", "deberta.encoder.conv.LayerNorm."),
    (r"pooler\.", "pooler.dense."),
]


def hf_name(name: str) -> str:
    for pattern, replacement in HF_NAMES:
        if re.match(pattern, name):
            return re.sub(f"^{pattern}", replacement, name, count=1)
    return name  # classifier.weight / classifier.bias are named alike


def load_deberta_reward_model(model_dir: Path, hf: dict, dtype: torch.dtype = torch.float32,
                              device: str | torch.device = "cpu") -> DebertaRewardModel:
    """Build on the meta device, check every tensor by its checkpoint name, assign (one copy in
    memory)."""
    cfg = deberta_config_from_hf(hf, where=str(Path(model_dir) / "config.json"))
    tensors = read_safetensors(model_dir)
    with torch.device("meta"):
        rm = DebertaRewardModel(cfg)
    ours = {hf_name(name): name for name in rm.state_dict()}
    # a buffer transformers saves, and absolute positions a v3 model has but does not use
    # (transformers drops them)
    ignored = {"deberta.embeddings.position_ids"}
    if not cfg.position_biased_input:
        ignored.add("deberta.embeddings.position_embeddings.weight")
    if tensors.get("classifier.weight", torch.empty(1)).shape[0] != 1:
        raise UserError(f"{model_dir}: classifier.weight has "
                        f"{tensors['classifier.weight'].shape[0]} rows; a reward model has one "
                        "output (num_labels = 1)")
    expected = rm.state_dict()
    problems = ([f"missing tensor {n}" for n in ours if n not in tensors]
                + [f"unexpected tensor {n}" for n in tensors if n not in ours and n not in ignored]
                + [f"tensor {n} has shape {list(tensors[n].shape)}, config.json implies "
                   f"{list(expected[o].shape)}"
                   for n, o in ours.items()
                   if n in tensors and tensors[n].shape != expected[o].shape])
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UserError(f"{model_dir}: {problems[0]}{more}: not a DeBERTa-v2 reward model as "
                        "config.json describes")
    rm.load_state_dict({o: tensors[n].to(dtype) for n, o in ours.items()}, strict=True, assign=True)
    rm.model_dir = Path(model_dir)
    return rm.to(device)


def encode_pairs(tok, questions: list[str], answers: list[str], max_len: int,
                 pad_id: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """The tokenizer's pair encoding, [CLS] q [SEP] a [SEP] with token types 0...0 1...1,
    right-padded.

    `tok`: a nanorlhf Tokenizer; its tokenizer.json's post-processor adds the special tokens, as
    `transformers' tokenizer(q, a)` does. Too long a pair is cut by fit_to_length (the answer's end
    first, then the question's start). -> input_ids, token_type_ids, attention_mask, each (B, T)
    long.
    """
    specials = tok.tok.num_special_tokens_to_add(True)
    # the pooler reads token 0: without [CLS] it would read the question's first word
    if specials == 0:
        raise UserError("the reward model's tokenizer.json has no pair post-processor "
                        "([CLS] q [SEP] a [SEP])")
    budget = max_len - specials
    rows = []
    for q, a in zip(questions, answers):
        eq = tok.tok.encode(q, add_special_tokens=False)
        ea = tok.tok.encode(a, add_special_tokens=False)
        q_ids, a_ids, _ = fit_to_length(eq.ids, ea.ids, budget)
        eq.truncate(len(q_ids), direction="left")
        ea.truncate(len(a_ids))
        pair = tok.tok.post_process(eq, ea, add_special_tokens=True)
        rows.append((pair.ids, pair.type_ids))
    # right-padded, mask 1 on tokens
    padded = collate([ids for ids, _ in rows], [[]] * len(rows), pad_id)
    token_type_ids = collate([types for _, types in rows], [[]] * len(rows), 0)["input_ids"]
    return padded["input_ids"], token_type_ids, padded["attention_mask"]


@torch.no_grad()
def score_pairs(rm: DebertaRewardModel, tok, prompts: list, responses: list[str],
                batch_size: int = 8, max_len: int | None = None) -> list[float]:
    """Score (prompt, response) pairs; a message-list prompt is scored by its last message (the
    question)."""
    rm.eval()
    device = next(rm.parameters()).device
    max_len = max_len or rm.cfg.max_position_embeddings
    questions = [p if isinstance(p, str) else p[-1]["content"] for p in prompts]
    scores = []
    for i in range(0, len(questions), batch_size):
        ids, types, mask = encode_pairs(tok, questions[i:i + batch_size],
                                        responses[i:i + batch_size], max_len, tok.pad_id)
        check_vocab(ids.flatten().tolist(), rm.cfg.vocab_size,
                    str(getattr(rm, "model_dir", "reward model")))
        # bf16 on CUDA, like every other forward; the scores come back fp32
        with autocast(device):
            scores += rm(ids.to(device), types.to(device), mask.to(device)).tolist()
    return scores
