"""Writing a file all at once: a temporary file in the target's folder, synced, then put in
place, so that no reader ever sees half a file and a failure leaves nothing behind."""
from __future__ import annotations

import errno
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
            _put_new(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# what a file system without hard links (exFAT, some network shares) answers os.link with
# (by name: not every system has every code)
_NO_LINKS = {getattr(errno, name) for name in ("EPERM", "EOPNOTSUPP", "ENOTSUP", "ENOSYS",
                                               "EMLINK") if hasattr(errno, name)}


def _put_new(tmp: str, path: Path) -> None:
    """Move ``tmp`` to ``path``, which must not exist (FileExistsError, even if it appears
    meanwhile): as a hard link where the file system has them; where it has none, by taking
    the name first with an exclusive create and renaming over that empty file (a reader can
    see it empty for that moment, never half written)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in _NO_LINKS:
            raise
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        try:
            os.replace(tmp, path)
        except BaseException:
            os.unlink(path)  # the empty file that held the name
            raise
    else:
        os.unlink(tmp)


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
