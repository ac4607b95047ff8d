"""Running out of disk: caught before a write whose size is known, named in one line where a
write fails.

    disk.require(directory, needed_bytes, "the checkpoint of step 40", resume)  # DiskFull if short
    with disk.guard(directory, "metrics.jsonl", resume):  # a write failing for space -> DiskFull
        ...

`DiskFull` (exit status 4) names the directory, the bytes the write needed when known, the
bytes free and the fix; `resume` says what re-running the same command picks up.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path

from dasd_jax.errors import UserError

MIB = 2 ** 20


class DiskFull(UserError):
    """A write failed (or would fail) for want of space."""

    exit_status = 4


def free_bytes(directory: str | os.PathLike) -> int:
    """Bytes free to this process on the disk that holds `directory` (or its nearest existing
    parent)."""
    path = Path(directory).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def message(directory, what: str, resume: str, needed: int | None = None) -> str:
    free = free_bytes(directory)
    needs = f"needs about {needed / MIB:,.1f} MiB, " if needed else ""
    return (f"no space left on the disk of {directory} for {what} ({needs}{free / MIB:,.1f} MiB "
            f"free): free space there, or point the run at a larger disk, and run the same "
            f"command again: {resume}")


def require(directory, needed: int, what: str, resume: str) -> None:
    """DiskFull unless the disk of `directory` has `needed` bytes free."""
    if free_bytes(directory) < needed:
        raise DiskFull(message(directory, what, resume, needed))


def is_out_of_space(error: BaseException) -> bool:
    """Whether `error`, or an error it was raised from, is ENOSPC (an OSError, or a library's
    error carrying the operating system's text or code)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        text = str(error)
        if "No space left on device" in text or "os_error_code='28'" in text:
            return True
        error = error.__cause__ or error.__context__
    return False


@contextlib.contextmanager
def guard(directory, what: str, resume: str):
    """Turns a write failing for space inside the block into DiskFull (one line)."""
    try:
        yield
    except DiskFull:
        raise
    except Exception as error:
        if is_out_of_space(error):
            raise DiskFull(message(directory, what, resume)) from None
        raise
