"""User errors: the mistakes a user can make (bad path, bad file, bad flag) end in one clear
line."""

import sys
from collections.abc import Callable

from tqdm import tqdm


class UserError(Exception):
    """An error the user caused (bad path, bad file); printed as one line, no traceback."""


class NonFiniteLogits(UserError):
    """Weights that are finite but huge (a step with too high an lr) make logits NaN or inf."""


def run_cli(main: Callable[[], object]) -> None:
    """Run a script's main(); a UserError becomes `error: <message>` on stderr and exit status 2,
    a Ctrl-C that no training loop caught (run.exit_interrupted) `interrupted` and status 130."""
    try:
        main()
        leave_together()
    except UserError as e:
        close_bars()
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # while loading, evaluating or saving: one line, not a traceback
        close_bars()
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def leave_together() -> None:
    """Under torchrun, after main() returned: wait for every rank (rank 0 evaluates and writes
    after the others are done), then leave the process group. A rank that exits while a peer still
    runs can be aborted by gloo's threads after all its work is done ("terminate called without
    an active exception"). Only on success: a rank that failed exits at once and torchrun stops
    the others (a barrier there could wait on a peer stuck in another collective)."""
    dist = sys.modules.get("torch.distributed")  # imported by every script that can run under it
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def close_bars() -> None:
    """Close the progress bars of a loop that stopped: left open, each would be drawn once more
    as the process exits, below the line that says why it stopped."""
    for bar in list(tqdm._instances):
        bar.close()
