"""User-facing errors: one clear paragraph and exit code 2, never a traceback."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

__all__ = ["UserError", "run_cli"]

logger = logging.getLogger(__name__)


class UserError(Exception):
    """A mistake the user can fix (bad flag, missing file, wrong checkpoint).

    The message names the problem and the fix; command-line entry points print it and exit 2.
    """


def run_cli(main: Callable[[], object]) -> None:
    """Run a command-line `main`, turning a `UserError` into its message and exit code 2."""
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
