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
    except UserError as e:
        close_bars()
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # while loading, evaluating or saving: one line, not a traceback
        close_bars()
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def close_bars() -> None:
    """Close the progress bars of a loop that stopped: left open, each would be drawn once more
    as the process exits, below the line that says why it stopped."""
    for bar in list(tqdm._instances):
        bar.close()
