"""Figures written as files: a matplotlib figure drawn at a resolution this machine can hold,
then written atomically (`utils.infra.file_io.write_output`)."""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import torch
from matplotlib.figure import Figure

from utils.infra.errors import UserError
from utils.infra.file_io import write_output
from utils.infra.memory import available_bytes

__all__ = ["render_figure", "save_figure"]

_MAX_FIGURE_SIDE = 2**16  # Agg, matplotlib's raster renderer, refuses larger images
_FIGURE_BYTES_PER_PIXEL = 8  # Agg's RGBA buffer, plus the copy the PNG encoder reads


def _largest_dpi(figure: Figure) -> int:
    """The highest resolution at which `figure` can be drawn here: below Agg's size limit and
    within the memory this process can still take."""
    width, height = figure.get_size_inches()
    largest = (_MAX_FIGURE_SIDE - 1) / max(width, height)
    available = available_bytes(torch.device("cpu"))
    if available is not None:
        largest = min(largest, math.sqrt(available / _FIGURE_BYTES_PER_PIXEL / (width * height)))
    return max(int(largest), 1)


def render_figure(figure: Figure, fmt: str, dpi: int, flag: str = "--dpi") -> bytes:
    """A matplotlib figure drawn as a `fmt` file (png, pdf, svg, ...), in memory.

    Raises:
        UserError: at `dpi` the figure is larger than matplotlib draws (below 2**16 pixels a
            side) or than this machine has memory for; names the largest `flag` that fits.
    """
    largest = _largest_dpi(figure)
    if dpi <= largest:
        buffer = io.BytesIO()
        try:
            figure.savefig(buffer, format=fmt, dpi=dpi)
            return buffer.getvalue()
        except MemoryError:
            largest = dpi // 2
    width, height = (round(inches * dpi) for inches in figure.get_size_inches())
    raise UserError(
        f"At {flag} {dpi} the figure would be {width}x{height} pixels: more than can be drawn "
        f"here (matplotlib draws below {_MAX_FIGURE_SIDE} pixels a side, and needs about "
        f"{_FIGURE_BYTES_PER_PIXEL} bytes of memory a pixel). Pass {flag} {largest} or less."
    )


def save_figure(path: str | os.PathLike, figure: Figure, dpi: int, flag: str = "--output") -> None:
    """Draw a matplotlib figure and write it atomically (its format from the file's suffix).

    Raises:
        UserError: the figure cannot be drawn at `dpi` (see `render_figure`), or the file
            cannot be written (see `write_output`).
    """
    fmt = Path(path).suffix.lower().lstrip(".") or "png"
    data = render_figure(figure, fmt, dpi)
    write_output(path, lambda handle: handle.write(data), flag)
