"""What the scripts write for a person to read or type: progress bars only where a person
watches, a stream whose failed writes never end a run, and commands in the interpreter that
runs them.

Torch-free, as `flags.py` is: `parse_first` uses it before torch loads.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from typing import TextIO

__all__ = ["SafeStream", "interactive", "interpreter", "python_command"]


def interactive(stream: TextIO | None = None) -> bool:
    """Whether progress bars belong on `stream` (default stderr): only a terminal. Written to a
    file or a pipe (nohup, CI, a cluster job), a bar's redraws pile up into one endless line,
    so the scripts log plain lines there instead."""
    stream = sys.stderr if stream is None else stream
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no stream, or a closed one
        return False


def interpreter() -> str:
    """The Python running this script, as a person would type it: `python3` when that name on
    the PATH is this interpreter (an active virtual environment), else its path, relative to
    the working folder when inside it (`.venv/bin/python`)."""
    here = os.path.abspath(sys.executable)
    for name in ("python3", "python"):
        found = shutil.which(name)
        if found and os.path.abspath(found) == here:
            return name
    relative = os.path.relpath(here)
    return shlex.quote(here if relative.startswith("..") else relative)


def python_command(*args: str) -> str:
    """A command line that runs `args` (a script and its flags, or `-m module ...`) with this
    interpreter, quoted for a POSIX shell: the commands the scripts print work as typed."""
    return " ".join([interpreter(), *(shlex.quote(str(a)) for a in args)])


class SafeStream:
    """A text stream whose failed writes (a full disk, a closed pipe) are dropped, not raised:
    the progress bar of a run whose console cannot be written keeps the run going. The first
    failure is kept in :attr:`error`."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self.error: OSError | None = None

    def write(self, text: str) -> int:
        if self.error is None:
            try:
                return self.stream.write(text)
            except OSError as err:
                self.error = err
        return len(text)

    def flush(self) -> None:
        if self.error is None:
            try:
                self.stream.flush()
            except OSError as err:
                self.error = err

    def isatty(self) -> bool:
        return interactive(self.stream)

    def fileno(self) -> int:
        return self.stream.fileno()
