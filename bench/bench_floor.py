"""Where decode time goes on this CPU: the memory-bandwidth floor, matmul GFLOP/s, a profiler split.

    OMP_NUM_THREADS=1 python bench/bench_floor.py [--model llama] [--repeats 5]

1. Bandwidth: a sum over, and a copy of, a 1 GiB fp32 tensor (medians). The floor of one batch-1
   decode step is the bytes of weights it must read (every parameter once, the tied embedding once)
   divided by that bandwidth: no implementation can decode faster without reading fewer bytes.
2. GFLOP/s of the matmuls of a training step (8 x 128 tokens) and of one decode step (batch 1, 16):
   the compute floor where bandwidth is not the limit.
3. torch.profiler over decode steps at batch 1 and 16 (nanorlhf's eager path): op self-time
   grouped by the module it ran in (projection matmuls, lm_head, attention = rope + cache writes +
   SDPA, norms, MLP elementwise, other), the rest of the profiled wall time (Python, dispatch,
   profiler), and the wall time of the same step at width 36 (only Python/dispatch overhead is
   left). Not a test.
"""

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # nanorlhf from this checkout
from nanorlhf.checkpoint import load_model  # noqa: E402
from nanorlhf.fast.packed import available, packed_linears  # noqa: E402
from nanorlhf.model import MLP, Attention, ModelConfig, RMSNorm, Transformer  # noqa: E402
from nanorlhf.sampling import left_pad, prefill  # noqa: E402


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bandwidth(repeats: int) -> dict[str, float]:
    """GB/s of reading (sum) and of reading + writing (copy) a 1 GiB fp32 tensor: far beyond any
    cache."""
    x = torch.ones(2**28)
    y = torch.empty_like(x)
    read = x.numel() * 4 / median_time(lambda: x.sum(), repeats) / 1e9
    copy = 2 * x.numel() * 4 / median_time(lambda: y.copy_(x), repeats) / 1e9
    return {"read (sum)": read, "read+write (copy)": copy}


def weight_bytes(model: Transformer) -> int:
    # parameters() yields a tied weight once, which is what a decode step reads
    return sum(p.numel() * p.element_size() for p in model.parameters())


def matmul_gflops(model: Transformer, tokens: int, repeats: int, packed: bool = False) -> float:
    """GFLOP/s of x (tokens, in) @ W.T for every distinct linear shape of one layer and the
    lm_head, weighted as a forward pass over `tokens` weights them (30 layers of each, one lm_head).
    packed: through oneDNN with the weight packed beforehand (nanorlhf/fast/packed.py), instead of
    F.linear's MKL sgemm."""
    cfg = model.cfg
    layer = model.model.layers[0]
    linears = [m for m in layer.modules() if isinstance(m, nn.Linear)]
    flops = seconds = 0.0
    for m, count in [(m, cfg.num_hidden_layers) for m in linears] + [(model.lm_head, 1)]:
        x = torch.randn(tokens, m.weight.shape[1])
        with torch.no_grad(), packed_linears(m) if packed else contextlib.nullcontext():
            t = median_time(lambda: m(x), repeats)
        flops += count * 2 * tokens * m.weight.numel()
        seconds += count * t
    return flops / seconds / 1e9


class Labels:
    """record_function ranges around chosen modules, so profiler ops can be attributed to them."""

    def __init__(self, model: Transformer):
        self.handles, self.open = [], []
        for name, m in model.named_modules():
            label = ("lm_head" if name == "lm_head" else "proj matmul" if isinstance(m, nn.Linear)
                     else "norm" if isinstance(m, RMSNorm)
                     else "attention" if isinstance(m, Attention)
                     else "mlp elementwise" if isinstance(m, MLP) else None)
            if label:
                enter = lambda mod, args, label=label: self.enter(label)
                self.handles.append(m.register_forward_pre_hook(enter))
                self.handles.append(m.register_forward_hook(lambda mod, args, out: self.exit()))

    def enter(self, label: str) -> None:
        rf = record_function("#" + label)
        rf.__enter__()
        self.open.append(rf)

    def exit(self) -> None:
        self.open.pop().__exit__(None, None, None)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def label_of(event) -> str:
    """The innermost '#label' range around a profiler event ('other' outside all of them)."""
    e = event.cpu_parent
    while e is not None:
        if e.name.startswith("#"):
            return e.name[1:]
        e = e.cpu_parent
    return "other"


def decode_split(model: Transformer, batch: int, steps: int,
                 repeats: int) -> tuple[float, float, dict[str, float]]:
    """ms per decode step: wall without the profiler, wall with it, and op self-time per label
    (profiler)."""
    vocab = model.cfg.vocab_size
    prompts = [[1 + (7 * i + j) % (vocab - 1) for j in range(30 + i % 5)]  # ~30-token prompts
               for i in range(batch)]
    ids, mask = left_pad(prompts, 0)
    token = torch.full((batch, 1), 42)

    def run(cache_mask):
        cache, m = cache_mask
        for _ in range(steps):
            m = torch.cat([m, m.new_ones(batch, 1)], 1)
            model(token, m, cache, return_hidden=True, last_only=True)

    def fresh():
        with torch.no_grad():
            return prefill(model, ids, mask, steps + 1)[2], mask

    with torch.no_grad():
        walls = []
        for _ in range(repeats):
            state = fresh()
            start = time.perf_counter()
            run(state)
            walls.append((time.perf_counter() - start) / steps)
        wall = statistics.median(walls)
        labels = Labels(model)
        state = fresh()
        start = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run(state)
        profiled = (time.perf_counter() - start) / steps
        labels.remove()
    split: dict[str, float] = {}
    for e in prof.events():
        if e.name.startswith("#") or e.name.startswith("ProfilerStep"):
            continue
        ms = e.self_cpu_time_total / 1e3 / steps  # us -> ms
        split[label_of(e)] = split.get(label_of(e), 0.0) + ms
    return wall * 1e3, profiled * 1e3, split


def dispatch_only(cfg, batch: int, steps: int, repeats: int) -> float:
    """ms per eager decode step of the same graph (layers, heads, ops) at width 36 and vocab 64: the
    arithmetic is negligible, so this is what Python and torch's dispatcher cost per step."""
    tiny = Transformer(ModelConfig(vocab_size=64, hidden_size=4 * cfg.num_attention_heads,
                                   intermediate_size=32, num_hidden_layers=cfg.num_hidden_layers,
                                   num_attention_heads=cfg.num_attention_heads,
                                   num_key_value_heads=cfg.num_key_value_heads, head_dim=4,
                                   tie_word_embeddings=cfg.tie_word_embeddings)).eval()
    wall, _, _ = decode_split(tiny, batch, steps, repeats)
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=16, help="decode steps per profiled run")
    args = parser.parse_args()
    model = load_model(args.model).eval()
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{torch.backends.cpu.get_cpu_capability()}, load average {' '.join(load)}")

    bw = bandwidth(args.repeats)
    nbytes = weight_bytes(model)
    for name, gbs in bw.items():
        print(f"bandwidth {name:18} {gbs:7.1f} GB/s")
    floor_ms = nbytes / (bw["read (sum)"] * 1e9) * 1e3
    print(f"weights {nbytes / 1e6:.0f} MB -> batch-1 decode floor {floor_ms:.1f} ms/token "
          f"({1e3 / floor_ms:.1f} tok/s) at the read bandwidth")
    params = sum(p.numel() for p in model.parameters())
    print(f"{'matmul GFLOP/s (all matmuls of one pass, ms)':48} {'MKL (F.linear)':>18} "
          f"{'oneDNN packed':>18}  ratio")
    for tokens, what in ((1024, "train shapes (8x128 tokens)"), (192, "decode batch 192"),
                         (96, "decode batch 96"), (16, "decode batch 16"), (1, "decode batch 1")):
        g = [matmul_gflops(model, tokens, args.repeats, packed)
             for packed in (False, True)[:1 + available()]]
        # a step's matmuls do 2 * params FLOPs per token; at batch B their time floor is the larger
        # of reading the weights and doing the arithmetic
        cells = "".join(f"{x:9.1f} ({2 * params * tokens / (x * 1e9) * 1e3:6.1f})" for x in g)
        print(f"at {what:45} {cells}  {g[-1] / g[0]:.2f}x")

    order = ["proj matmul", "lm_head", "attention", "norm", "mlp elementwise", "other"]
    rows = {b: decode_split(model, b, args.steps, args.repeats) for b in (1, 16)}
    dispatch = {b: dispatch_only(model.cfg, b, args.steps, args.repeats) for b in rows}
    print("\ndecode step (eager), ms. Ops: self-time from torch.profiler, which roughly doubles "
          "the wall time")
    print("(it inflates every small op), so read them as shares. 'dispatch only' = the same step "
          "at width 36:")
    print("what Python and torch's dispatcher cost per step when the arithmetic is negligible")
    print(f"{'':26}" + "".join(f"{'batch ' + str(b):>16}" for b in rows))
    for name in order:
        print(f"{name:26}" + "".join(f"{split.get(name, 0.0):10.1f} "
                                     f"{100 * split.get(name, 0.0) / prof:4.0f}%"
                                     for _, prof, split in rows.values()))
    other = [prof - sum(split.values()) for _, prof, split in rows.values()]
    for name, values in (("other time in profiled run", other),
                         ("wall with profiler", [prof for _, prof, _ in rows.values()]),
                         ("wall without profiler", [wall for wall, _, _ in rows.values()]),
                         ("dispatch only (width 36)", list(dispatch.values())),
                         ("floor (bandwidth)", [floor_ms] * len(rows))):
        print(f"{name:26}" + "".join(f"{v:10.1f}      " for v in values))


if __name__ == "__main__":
    main()
