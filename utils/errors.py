"""User-facing errors: one clear paragraph and exit code 2, never a traceback.

`models/` raises plain `ValueError` subclasses (`ConfigError`, `CheckpointError`) worded for the
user; the scripts' `run_cli` treats them like a `UserError`.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from models.configs import ConfigError
from models.npz import CheckpointError

__all__ = ["USER_ERRORS", "UserError", "run_cli"]

logger = logging.getLogger(__name__)


class UserError(Exception):
    """A mistake the user can fix (bad flag, missing file, wrong checkpoint).

    The message names the problem and the fix; command-line entry points print it and exit 2.
    """


USER_ERRORS = (UserError, ConfigError, CheckpointError)  # what run_cli turns into a message


def run_cli(main: Callable[[], object]) -> None:
    """Run a command-line `main`, turning a user's mistake into its message and exit code 2."""
    try:
        main()
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
