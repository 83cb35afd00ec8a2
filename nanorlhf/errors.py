"""User errors: the mistakes a user can make (bad path, bad file, bad flag) end in one clear
line."""

import sys
from collections.abc import Callable


class UserError(Exception):
    """An error the user caused (bad path, bad file); printed as one line, no traceback."""


def run_cli(main: Callable[[], object]) -> None:
    """Run a script's main(); a UserError becomes `error: <message>` on stderr and exit status 2."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
