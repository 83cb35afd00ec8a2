"""The degeneracy-guard statistics of the pink-elephant evaluation."""

import pytest
import torch

from nanorlhf.checkpoint import load_model
from nanorlhf.tasks.pink import distinct_n, format_table, mean_nll


def test_distinct_n_by_hand():
    assert distinct_n([[1, 2, 1, 2]], 2) == pytest.approx(2 / 3)  # (1,2) (2,1) (1,2)
    # bigrams never cross responses
    assert distinct_n([[1, 2], [1, 2], [3]], 2) == pytest.approx(1 / 2)
    assert distinct_n([[5]], 2) == 0.0


def test_mean_nll_is_token_weighted(tiny_chat_model):
    model = load_model(tiny_chat_model).eval()
    prompts, responses = [[5, 6], [7]], [[8, 9, 10], [11]]
    with torch.no_grad():
        total, count = 0.0, 0
        for p, r in zip(prompts, responses):  # one row at a time, straight from the logits
            seq = torch.tensor([p + r])
            logp = model(seq)[0].log_softmax(-1)
            total -= sum(logp[len(p) - 1 + i, t].item() for i, t in enumerate(r))
            count += len(r)
    assert mean_nll(model, prompts, responses, pad_id=2) == pytest.approx(total / count, rel=1e-5)


def test_table_has_one_column_per_model():
    row = {"pink_rate": 0.5, "grey_rate": 0.25, "mean_tokens": 10.0, "distinct_2": 0.5,
           "base_nll": 1.0}
    table = format_table({"base": row, "DPO": {**row, "pink_rate": 0.125}})
    assert table.splitlines()[0] == "| metric | base | DPO |"
    assert "| pink mention rate (lower is better) | 50.0% | 12.5% |" in table
