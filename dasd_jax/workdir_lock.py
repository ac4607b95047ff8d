"""One process per output: a stage holds a lock on what it writes while it runs.

    with workdir_lock.held(Path(workdir) / LOCK_NAME, "the workdir " + workdir):
        ...   # a second process on the same workdir gets one line saying who holds it

The lock is a small JSON file created atomically (O_EXCL), naming the host, the process, when
it started and its command. A lock whose process is gone (same host, pid not running, or running
but started later: a reused pid) is taken over with a warning; one held on another host is
never taken, since its process cannot be checked from here: the message says how to remove it.
A multi-host job holds one lock: process 0 takes it and the others wait for its answer.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import sys
from pathlib import Path

import jax
import numpy as np
from absl import logging as absl_logging

from dasd_jax.errors import UserError

LOCK_NAME = ".dasd_jax.lock"


def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux /proc), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[19])


def _running(holder: dict) -> bool:
    """Whether the process a lock on this host names is still the one that took it."""
    pid = int(holder.get("pid", -1))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    started = holder.get("start_ticks")
    return started is None or _start_ticks(pid) in (None, started)


def _this_process() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "start_ticks": _start_ticks(os.getpid()),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)}


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def acquire(path: Path, what: str) -> dict:
    """Takes the lock at `path` (for `what`, named in messages); returns what it wrote. UserError
    when a live process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mine = _this_process()
    text = json.dumps(mine) + "\n"
    try:
        descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        holder = _read(path)
        if holder.get("host") != mine["host"] or _running(holder) or not holder:
            raise UserError(_held_message(path, what, holder)) from None
        absl_logging.warning("taking over the lock of %s left by pid %s (%s), which is no longer "
                             "running", what, holder.get("pid"), holder.get("started"))
        temporary = path.with_name(f"{path.name}.{os.getpid()}")
        temporary.write_text(text)
        os.replace(temporary, path)
        return mine
    with os.fdopen(descriptor, "w") as file:
        file.write(text)
    return mine


def _held_message(path: Path, what: str, holder: dict) -> str:
    if not holder:
        return (f"{what} is locked by {path}, which names no process (another run is starting, "
                "or one died while taking it): wait a moment and run again, or delete it if no "
                "run uses it")
    where = "this machine" if holder.get("host") == socket.gethostname() else holder.get("host")
    return (f"{what} is in use by another run: pid {holder.get('pid')} on {where}, started "
            f"{holder.get('started')} ({holder.get('command', '')[:120]}); wait for it to end "
            f"or use another --config.workdir (if that run is gone, delete {path})")


def release(path: Path, mine: dict) -> None:
    """Removes the lock at `path` if it is still the one `mine` took."""
    holder = _read(path)
    if holder.get("pid") == mine["pid"] and holder.get("host") == mine["host"]:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def held(path: str | os.PathLike, what: str):
    """The lock at `path` for the duration of the block; in a multi-host job process 0 holds it
    and every process raises the same UserError when it could not."""
    path = Path(path)
    mine, problem = None, ""
    if jax.process_index() == 0:
        try:
            mine = acquire(path, what)
        except UserError as error:
            problem = str(error)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        refused = multihost_utils.broadcast_one_to_all(np.int32(bool(problem)))
        if refused and not problem:
            problem = f"{what} is in use by another run (process 0 says who)"
    if problem:
        raise UserError(problem)
    try:
        yield
    finally:
        if mine is not None:
            release(path, mine)
