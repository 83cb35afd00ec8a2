"""nanorlhf/tasks/qdaif_judge.py: option log-probs from one prompt-tree forward against plain full
forwards, in float64 (and in fp32, through the packed matmuls, within fp32 rounding)."""

import pytest
import torch

from nanorlhf.checkpoint import load_model
from nanorlhf.sampling import common_prefix
from nanorlhf.tasks.qdaif_judge import option_logprobs

# options of three questions: multi-token ones, several sharing a first token, one-token ones
OPTIONS = [[[5], [5, 7], [5, 7, 9], [11, 12]], [[3], [4]], [[20, 21, 22, 23], [20, 30], [5]]]


def prompts_for(gen: torch.Generator, template: int) -> list[list[list[int]]]:
    """Texts whose three prompts share prefixes of different lengths: long, short, none (the first
    tokens differ), one prompt a prefix of another, all three identical; rows of different lengths
    (right padding). Every prompt of every text begins with the same `template` tokens (a chat
    template's opening)."""
    rand = lambda n: torch.randint(3, 128, (n,), generator=gen).tolist()
    opening, texts = rand(template), []
    for n_shared in (17, 2, 0):
        shared = rand(n_shared)
        texts.append([shared + [40 + q] + rand(int(torch.randint(1, 9, (1,), generator=gen)))
                      for q in range(3)])
    base = rand(6)
    texts.append([base, base + rand(3), base[:4]])  # the shortest is a prefix of the others
    texts.append([base] * 3)
    return [[opening + p for p in text] for text in texts]


def reference(model, prompt: list[int], option: list[int]) -> float:
    """log p(option | prompt): one forward of the plain sequence prompt + option, no cache, no
    mask."""
    with torch.no_grad():
        logps = model(torch.tensor([prompt + option]))[0].log_softmax(-1)  # (T, V)
    return sum(logps[len(prompt) - 1 + i, t].item() for i, t in enumerate(option))


def test_common_prefix_keeps_a_token_of_each_sequence():
    assert common_prefix([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert common_prefix([[1, 2, 3], [1, 2, 3]]) == 2  # identical: the last token stays each's own
    assert common_prefix([[1, 2, 3], [1]]) == 0
    assert common_prefix([[7, 1], [8, 1]]) == 0


@pytest.mark.parametrize("name, template, n_texts",
                         [("llama-gqa-tied", 0, 5), ("llama3-rope-mqa", 7, 5), ("qwen2-bias", 7, 5),
                          ("llama-gqa-tied", 7, 1)])
def test_tree_forward_equals_plain_forwards_float64(tiny_dirs, name, template, n_texts):
    model = load_model(tiny_dirs[name]).double().eval()
    texts = prompts_for(torch.Generator().manual_seed(0), template)[:n_texts]
    shared = template if n_texts > 1 else template + 17
    assert common_prefix([p for text in texts for p in text]) == shared
    got = option_logprobs(model, texts, OPTIONS, pad_id=0)
    assert [g.shape for g in got] == [(len(texts), len(o)) for o in OPTIONS]
    for q, options in enumerate(OPTIONS):
        want = torch.tensor([[reference(model, t[q], o) for o in options] for t in texts],
                            dtype=torch.float64)
        # float64 (ε = 2.2e-16): sums over a few hundred terms of size < 100 in another order differ
        # by < 1e-11
        torch.testing.assert_close(got[q].double(), want, rtol=0, atol=1e-10)


def test_fp32_judge_runs_the_packed_matmuls_and_stays_within_fp32_rounding(tiny_dirs):
    # QDAIF's fp32 judge multiplies through oneDNN (nanorlhf/fast/packed.py, inside packed_linears
    # as qdaif.py runs it) when this torch has it. Against the float64 reference: the tiny models'
    # fp32 logits carry ~1e-5 of rounding (tests/test_fast_decode.py's bound) and an option sums up
    # to 4 log-softmax terms, so 1e-4; a wrong weight moves them by O(1e-2)
    from nanorlhf.fast.packed import PackedLinear, available, packed_linears

    model = load_model(tiny_dirs["qwen2-bias"]).eval()
    kinds = []
    model.lm_head.register_forward_pre_hook(lambda mod, args: kinds.append(type(mod)))
    texts = prompts_for(torch.Generator().manual_seed(1), 7)
    with packed_linears(model):  # as qdaif.py's PoetryDomain.ask runs the judge
        got = option_logprobs(model, texts, OPTIONS, pad_id=0)
    # every forward packed
    assert kinds and set(kinds) == {PackedLinear if available() else torch.nn.Linear}
    exact = model.double()
    for q, options in enumerate(OPTIONS):
        want = torch.tensor([[reference(exact, t[q], o) for o in options] for t in texts],
                            dtype=torch.float64)
        torch.testing.assert_close(got[q].double(), want, rtol=0, atol=1e-4)


def test_one_question_and_one_token_options(tiny_dirs):
    """No shared prefix to speak of and no option columns: the logits at each prompt's last token
    only."""
    model = load_model(tiny_dirs["llama-gqa-tied"]).double().eval()
    texts = [[[9, 8, 7, 6]], [[5]], [[4, 4]]]
    got = option_logprobs(model, texts, [[[1], [2], [3]]], pad_id=0)[0]
    want = torch.tensor([[reference(model, t[0], [v]) for v in (1, 2, 3)] for t in texts],
                        dtype=torch.float64)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-10)


def test_a_4d_mask_needs_positions(tiny_dirs):
    model = load_model(tiny_dirs["llama-gqa-tied"]).eval()
    with pytest.raises(ValueError, match="position_ids"):
        model(torch.ones(1, 3, dtype=torch.long), torch.ones(1, 1, 3, 3, dtype=torch.bool))
