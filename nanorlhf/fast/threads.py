"""How many CPU threads torch uses: chosen once per process, before any work, and printed."""

import os

import torch

THREADS_HELP = ("torch CPU threads (0: OMP_NUM_THREADS if set, else the cores this process may use "
                "that are not already busy)")

_auto_threads: int | None = None  # set_threads()'s first automatic choice in this process


def set_threads(threads: int = 0) -> int:
    """Set torch's CPU threads: `threads` if > 0, else OMP_NUM_THREADS if set (torch already read
    it), else the cores this process may run on (sched_getaffinity: a container's or taskset's
    share, not the host's count) minus those already busy (the 1-minute load average, rounded),
    at least 1.

    Why not torch's default (every physical core): its OpenMP threads spin-wait for each other at
    every op, so one thread that shares its core with another job stalls all of them. On a shared
    2-core machine that made QDAIF ~7x slower than one thread; on an idle machine all cores are
    used.
    Returns the thread count."""
    if threads <= 0 and os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    if threads <= 0:
        has_affinity = hasattr(os, "sched_getaffinity")
        cores = len(os.sched_getaffinity(0)) if has_affinity else os.cpu_count() or 1
        busy = round(os.getloadavg()[0]) if hasattr(os, "getloadavg") else 0
        threads = max(1, cores - busy)
    torch.set_num_threads(threads)
    return threads


def choose_threads(threads: int = 0) -> int:
    """A script's --threads: set_threads(threads), except that an automatic choice is made once per
    process (runs in one process, tests and resumes, keep the same reduction order).
    -> the count."""
    global _auto_threads
    if threads > 0:
        return set_threads(threads)
    if _auto_threads is None:
        _auto_threads = set_threads()
    torch.set_num_threads(_auto_threads)
    return _auto_threads
