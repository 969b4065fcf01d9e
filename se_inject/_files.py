"""Writing a file all at once: a temporary file in the target's folder, synced, then put in
place, so that no reader ever sees half a file and a failure leaves nothing behind."""
from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path
from typing import Callable

__all__ = ["atomic_write"]


def atomic_write(path: Path, write: Callable[[str], None], replace: bool) -> None:
    """``write(tmp)`` then move ``tmp`` to ``path``. Without ``replace``, an existing ``path`` is
    never touched: FileExistsError is raised, even if the file appeared during the write.

    The file gets the permissions a plain ``open(path, "w")`` would give it: those of the file it
    replaces, or else read and write for whom the umask allows (a private temporary file, as
    ``tempfile.mkstemp`` makes, would leave a checkpoint unreadable to the user's group)."""
    path = Path(path)
    tmp = _create_beside(path)
    try:
        mode = stat.S_IMODE(os.stat(tmp).st_mode)  # 0o666 less the umask
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        if replace:
            try:
                mode = stat.S_IMODE(os.stat(path).st_mode)
            except FileNotFoundError:
                pass
        # After the write, which may have made the file anew (safetensors writes its own
        # private temporary file and renames it), and a read-only mode would refuse.
        os.chmod(tmp, mode)
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails if the file exists
            os.unlink(tmp)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _create_beside(path: Path) -> str:
    """A new empty file in ``path``'s folder, named after it, created with mode 0o666 less the
    umask: the kernel applies it, so the process's umask, which other threads share, is never
    set to read it."""
    for _ in range(100):
        # (the name cut short: a file name the system allows, plus the marks, might not be)
        tmp = str(path.parent / f".{path.name[:200]}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"no free temporary name beside {path}")
