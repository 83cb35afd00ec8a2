"""Log-probabilities of the answer options of several questions about one text, in one forward: a
prompt tree.

QDAIF asks three questions about every poem (its genre, its tone, is it good?) and scores each
question's answer options (the labels, in two spellings). Every question's prompt begins with the
same tokens: the chat template, the system prompt and the poem. Instead of a forward per question
and one more per option, each text gets one row holding a tree:

    [ shared prefix | rest of question 1 | option 1a | option 1b | ... | rest of question 2 | ... ]

and a 4-D attention mask lets each token see only its ancestors: the prefix sees itself (causally),
a question's rest sees the prefix and itself, an option sees the prefix, its question's rest and
itself. Position ids continue each branch where its parent ended. So every token has the same
context and position as in the plain sequence prompt + option, and its logits equal that sequence's
full forward up to the order of float sums (tests/test_judge.py, float64). Options need no cache
rows or copies, and every token is computed once. An option's last token is never fed (nothing is
predicted from it): a one-token option adds no column. What all texts' prompts share (the chat
template's opening: system prompt, user header) is computed once per call into a KV cache that every
row's tree attends to.

The matmuls are the model's own: qdaif.py runs this judge inside nanorlhf.fast.packed.packed_linears
(oneDNN's packed fp32 matmuls), a choice that belongs to the script, not to the task.
"""

import torch
from torch import Tensor

from nanorlhf.model import Transformer, autocast
from nanorlhf.sampling import common_prefix, prefix_cache


def tree_row(prompts: list[list[int]], options: list[list[list[int]]], start: int):
    """One text's questions prompts[q] and their options[q] as one row, from token `start` on (the
    tokens before it, which every text's prompts share, are in a KV cache): -> ids, positions,
    branch (one (question, option) pair per token: (-1, -1) the shared prefix, (q, -1) question q's
    rest, (q, o) option o), and picks: (q, o, column, token) for each token of each option, the
    column whose logits predict it."""
    L = common_prefix(prompts)
    ids, pos, branch = list(prompts[0][start:L]), list(range(start, L)), [(-1, -1)] * (L - start)
    picks = []
    for q, (prompt, opts) in enumerate(zip(prompts, options)):
        rest = prompt[L:]
        ids += rest
        pos += range(L, len(prompt))
        branch += [(q, -1)] * len(rest)
        last = len(ids) - 1  # its logits predict every option's first token
        for o, option in enumerate(opts):
            # the option's tokens 0..n-2 go in columns start.., at positions len(prompt)..
            start = len(ids)
            ids += option[:-1]
            pos += range(len(prompt), len(prompt) + len(option) - 1)
            branch += [(q, o)] * (len(option) - 1)
            picks += [(q, o, last, option[0])]
            picks += [(q, o, start + k - 1, t) for k, t in enumerate(option[1:], 1)]
    return ids, pos, branch, picks


def tree_mask(branch: Tensor) -> Tensor:
    """branch (B, T, 2) each token's (question, option), -1 = none -> bool (B, 1, T, T), True = may
    attend: a key is visible to a query at or after it on the same path from the root (prefix,
    question, option)."""
    q, o = branch[..., 0], branch[..., 1]
    T = branch.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=branch.device).tril()
    same_q = (q[:, None, :] == -1) | (q[:, None, :] == q[:, :, None])  # (B, query, key)
    same_o = (o[:, None, :] == -1) | (o[:, None, :] == o[:, :, None])
    return (causal & same_q & same_o)[:, None]


@torch.no_grad()
def option_logprobs(model: Transformer, prompts: list[list[list[int]]],
                    options: list[list[list[int]]], pad_id: int) -> list[Tensor]:
    """prompts[b][q]: the ids of question q about text b; options[q]: question q's answer options
    (ids, >= 1 token each) -> per question a (B, len(options[q])) tensor of log p(option | prompt),
    summed over the option's tokens (fp32; fp64 for a float64 model). One forward over B
    right-padded tree rows. A pad (at a row's end, after every real token) counts as prefix: no real
    token can see it, and it sees itself (no empty softmax row)."""
    dev = next(model.parameters()).device
    # the chat template's opening (system prompt, user header) is the same for every text: one
    # forward, then a KV cache that each row copies
    S = common_prefix([p for text in prompts for p in text])
    rows = [tree_row(p, options, S) for p in prompts]
    T = max(len(r[0]) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    pos = torch.zeros((len(rows), T), dtype=torch.long)
    branch = torch.full((len(rows), T, 2), -1, dtype=torch.long)
    for b, (row_ids, row_pos, row_branch, _) in enumerate(rows):
        ids[b, :len(row_ids)], pos[b, :len(row_pos)] = torch.tensor(row_ids), torch.tensor(row_pos)
        branch[b, :len(row_branch)] = torch.tensor(row_branch)
    # every (row, question, option, column, token) that some option's score sums
    b_, q_, o_, col, tok = torch.tensor([(b, *pick) for b, r in enumerate(rows) for pick in r[3]]).T
    at = torch.zeros((len(rows), T), dtype=torch.bool)
    at[b_, col] = True
    prefix_seen = torch.ones(len(rows), 1, T, S, dtype=torch.bool)
    mask = torch.cat([prefix_seen, tree_mask(branch)], -1)  # (B, 1, T, S + T)
    with autocast(dev):
        cache = prefix_cache(model, prompts[0][0][:S]).repeat(len(rows), S + T)
        logits = model(ids.to(dev), mask.to(dev), cache, position_ids=pos.to(dev),
                       logits_at=at.to(dev))
    # (N, V), N = the columns where `at` is True, in row-major order; fp32 (bf16 upcast), fp64 stays
    logps = logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)
    index = at.flatten().cumsum(0).sub(1).view(at.shape)  # (B, T): column -> its row in logits
    token_lp = logps[index[b_, col].to(dev), tok.to(dev)]  # (len(picks),)
    offsets = torch.tensor([0] + [len(opts) for opts in options]).cumsum(0)
    flat = torch.zeros(len(rows), int(offsets[-1]), dtype=logps.dtype, device=dev).index_put_(
        (b_.to(dev), (offsets[q_] + o_).to(dev)), token_lp, accumulate=True)
    return list(flat.split([len(opts) for opts in options], dim=1))
