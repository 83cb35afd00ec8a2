"""Decode speed at 1 vs N torch threads, as the machine is and with one extra competing job.

    python bench/bench_threads.py [--model llama] [--repeats 3] [--decode eager]

Greedy tokens/s at batch 1 and 16 (32 new tokens), thread counts alternating in one process
(medians). Then the same with a competing job started by this script: a one-thread matmul loop in a
subprocess, the situation of a shared machine, where OpenMP threads that spin-wait for a busy core
stall. Prints the load average before each phase. Not a test.
"""

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # nanorlhf from this checkout
from nanorlhf.checkpoint import load_model  # noqa: E402
from nanorlhf.fast.decode import generate  # noqa: E402 (decode=eager, static, compiled)

COMPETITOR = "import torch\nx = torch.randn(1024, 1024)\nwhile True:\n    x @ x\n"


def phase(model, threads: list[int], repeats: int, decode: str) -> dict:
    out = {}
    for batch in (1, 16):
        prompts = [[1 + (7 * i + j) % 500 for j in range(30)]  # 30-token prompts
                   for i in range(batch)]
        runs = {n: [] for n in threads}
        for r in range(repeats + 1):  # the first round is a warm-up
            for n in threads:
                torch.set_num_threads(n)
                start = time.perf_counter()
                generate(model, prompts, 32, [], 0, temperature=0, decode=decode)
                if r:
                    runs[n].append(batch * 32 / (time.perf_counter() - start))
        out[batch] = {n: statistics.median(v) for n, v in runs.items()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decode", default="eager")
    args = parser.parse_args()
    model = load_model(args.model).eval()
    threads = sorted({1, len(os.sched_getaffinity(0))})
    results = {}
    for name, competing in (("as is", False), ("+1 competing job", True)):
        job = None
        if competing:
            job = subprocess.Popen([sys.executable, "-c", COMPETITOR],
                                   env={**os.environ, "OMP_NUM_THREADS": "1"})
        try:
            time.sleep(2 if competing else 0)
            load = " ".join(f"{x:.2f}" for x in os.getloadavg())
            results[name] = (load, phase(model, threads, args.repeats, args.decode))
        finally:
            if job is not None:
                job.kill()
                job.wait()
    print(f"greedy tok/s, decode={args.decode}, {len(os.sched_getaffinity(0))} cores available")
    columns = [(b, n) for b in (1, 16) for n in threads]
    print(f"{'':20}{'load avg':>16}" + "".join(f"{f'b{b} {n} thr':>12}" for b, n in columns))
    for name, (load, r) in results.items():
        print(f"{name:20}{load:>16}" + "".join(f"{r[b][n]:12.1f}" for b, n in columns))


if __name__ == "__main__":
    main()
