"""Where rescli may write: never inside the user's data folder."""

from __future__ import annotations

import os
from pathlib import Path

from rescli.core.errors import UsageError


def inside(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """Whether ``path`` is ``folder`` or lies below it (links resolved)."""
    try:
        Path(path).expanduser().resolve().relative_to(Path(folder).expanduser().resolve())
        return True
    except ValueError:
        return False


def refuse_inside_data(output: str | os.PathLike, data_dir: str | os.PathLike, *, what: str) -> None:
    """UsageError when ``output`` would lie inside the data folder: rescli never writes there, and a later scan
    would take the run's files (plots, checkpoints) for a new class."""
    if inside(output, data_dir):
        raise UsageError(
            f"{what} {output} lies inside the data folder {data_dir}; rescli never writes there. "
            "Run from outside the data folder, or pass --output DIR outside it"
        )
