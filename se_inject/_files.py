"""Writing a file all at once: a temporary file in the target's folder, synced, then put in
place, so that no reader ever sees half a file and a failure leaves nothing behind."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

__all__ = ["atomic_write"]


def atomic_write(path: Path, write: Callable[[str], None], replace: bool) -> None:
    """``write(tmp)`` then move ``tmp`` to ``path``. Without ``replace``, an existing ``path`` is
    never touched: FileExistsError is raised, even if the file appeared during the write."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails if the file exists
            os.unlink(tmp)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
