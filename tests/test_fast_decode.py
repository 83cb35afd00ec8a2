"""generate(decode="static" | "compiled") against the eager decode loop (itself tested against
transformers and full forwards in test_generate.py): same logits and hidden states at every step,
same tokens, on every tiny config, with left padding, several stop ids and the logits hook."""

import pytest
import torch

from nanorlhf.checkpoint import load_model
from nanorlhf.fast.decode import generate

from conftest import TINY_CONFIGS

PROMPTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16], [17]]  # 4 padding widths: 2, 4, 0, 5
# The fast step computes the same fp32 operations as the eager one, but sums the softmax over the
# whole cache (masked keys add exact zeros) and reduces in another order where kernels differ. Each
# such sum of n <= 64 terms of size ~1 is off by at most ~n * 2^-24 ~ 4e-6 relative, and the tiny
# models' logits are O(1): 1e-5 bounds it with room for the layers' accumulation, and a real bug (a
# wrong position, a missing mask column, a stale cache entry) moves logits by O(1e-2) or more.
TOL = dict(atol=1e-5, rtol=1e-5)


def record(model, decode: str, **kwargs):
    """-> (generated ids, per-step logits (B, V) and hidden (B, h) the hook saw)."""
    seen = []

    def hook(logits, hidden, step):
        seen.append((logits.clone(), hidden.clone()))
        return logits

    out = generate(model, PROMPTS, kwargs.pop("n", 12), pad_id=0, logits_hook=hook, decode=decode,
                   **kwargs)
    return out.ids, seen


def assert_same(eager, fast):
    (ids_e, seen_e), (ids_f, seen_f) = eager, fast
    assert ids_f == ids_e
    assert len(seen_f) == len(seen_e)
    for (le, he), (lf, hf) in zip(seen_e, seen_f):
        torch.testing.assert_close(lf, le, **TOL)
        torch.testing.assert_close(hf, he, **TOL)


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_static_greedy_equals_eager(tiny_dirs, name):
    model = load_model(tiny_dirs[name]).eval()
    kw = dict(stop_ids=[], temperature=0)
    assert_same(record(model, "eager", **kw), record(model, "static", **kw))


def test_static_sampling_with_stops_equals_eager(tiny_dirs):
    # several stop ids that rows hit at different steps: finished rows keep decoding pad tokens
    model = load_model(tiny_dirs["llama-gqa-tied"]).eval()
    kw = dict(stop_ids=[3, 17, 40, 99], temperature=1.3, top_k=20, top_p=0.9, seed=5, n=24)
    eager = record(model, "eager", **kw)
    assert len({len(r) for r in eager[0]}) > 1, "the rows should stop at different lengths"
    assert_same(eager, record(model, "static", **kw))


def test_static_hook_changes_tokens_as_in_eager(tiny_dirs):
    # a hook that reads the hidden state (as ILQL's heads do) and rewrites the logits
    model = load_model(tiny_dirs["qwen2-bias"]).eval()
    head = torch.randn(model.cfg.hidden_size, model.cfg.vocab_size,
                       generator=torch.Generator().manual_seed(0))

    def run(decode):
        return generate(model, PROMPTS, 10, stop_ids=[7, 8], pad_id=0, temperature=0, decode=decode,
                        logits_hook=lambda logits, hidden, step: logits + 3 * hidden @ head).ids

    assert run("static") == run("eager")


def test_unknown_decode_mode(tiny_dirs):
    model = load_model(tiny_dirs["llama-gqa-tied"])
    with pytest.raises(ValueError, match="decode"):
        generate(model, PROMPTS, 2, stop_ids=[], pad_id=0, decode="fast")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama-gqa-tied", "qwen2-bias"])
def test_compiled_equals_eager(tiny_dirs, name):
    # torch.compile fuses the norms, rope and softmax into its own C++ loops: other summation
    # orders, the same bound. Two generations: the second reuses the compiled step
    # (new prompts' values, same shapes)
    model = load_model(tiny_dirs[name]).eval()
    for kw in (dict(stop_ids=[], temperature=0),
               dict(stop_ids=[3, 17, 40], temperature=1.0, seed=2)):
        assert_same(record(model, "eager", **kw), record(model, "compiled", **kw))


def test_set_threads_defaults(monkeypatch):
    # thread defaults are what fast decoding on a shared CPU most depends on (threads.set_threads)
    from nanorlhf import run as threads

    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3},
                            raising=False)
        monkeypatch.setattr(threads.os, "getloadavg", lambda: (1.4, 0.0, 0.0))
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert threads.set_threads() == 3 and torch.get_num_threads() == 3  # 4 cores, 1 busy
        monkeypatch.setattr(threads.os, "getloadavg", lambda: (7.0, 0.0, 0.0))
        assert threads.set_threads() == 1  # never below one
        assert threads.set_threads(2) == 2 and torch.get_num_threads() == 2  # --threads wins
        torch.set_num_threads(1)
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        # the environment is respected
        assert threads.set_threads() == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_threads_chosen_once_per_process(monkeypatch):
    # two runs in one process (a test, a crash and its resume) must not get different thread counts
    # when the load changes between them: MKL's reduction order, and so bit-identity,
    # can depend on it
    from dataclasses import dataclass

    from nanorlhf import run
    from nanorlhf.errors import UserError
    from nanorlhf import run as threads
    from nanorlhf.run import THREADS_HELP

    @dataclass
    class Tiny:  # a class body sees globals, not this function's names: THREADS_HELP, not threads.*
        threads: int = run.flag(0, THREADS_HELP, min=0)

    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(threads, "_auto_threads", None)
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3},
                            raising=False)
        monkeypatch.setattr(threads.os, "getloadavg", lambda: (1.4, 0.0, 0.0))
        threads.choose_threads(run.parse_config(Tiny, "t", []).threads)
        assert torch.get_num_threads() == 3
        threads.choose_threads(run.parse_config(Tiny, "t", ["--threads", "2"]).threads)
        assert torch.get_num_threads() == 2  # an explicit count wins
        monkeypatch.setattr(threads.os, "getloadavg", lambda: (3.0, 0.0, 0.0))
        threads.choose_threads(run.parse_config(Tiny, "t", []).threads)
        assert torch.get_num_threads() == 3  # the first automatic choice, not 4 - 3 = 1
        with pytest.raises(UserError, match="--threads -1"):
            run.parse_config(Tiny, "t", ["--threads", "-1"])
    finally:
        torch.set_num_threads(before)
