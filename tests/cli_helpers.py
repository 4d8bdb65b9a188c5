"""Running the command-line entry points in-process, as a user would meet their errors."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest

from utils.errors import run_cli


def expect_user_error(
    main: Callable[[Sequence[str]], object], argv: Sequence[str], capsys: pytest.CaptureFixture
) -> str:
    """Run `main(argv)` as its script does; it must exit 2 with a message and no traceback.

    Returns:
        What it wrote to stderr.
    """
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        run_cli(lambda: main(argv))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err
