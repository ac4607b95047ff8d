"""Giving the memory a stage has freed back to the operating system.

XLA:CPU's buffers, numpy arrays and the libraries a stage loads allocate through the C
library's malloc, and glibc keeps what they free in its arenas for later use: after a
training of SmolLM2-135M the process held 1.3-2.7 GB with no array alive, of which
`malloc_trim` handed back all but 0.65 GB (benchmarks/RESULTS.md). A long-lived process that
runs stage after stage (the claims benchmarks, a notebook) would otherwise grow with each.
"""

from __future__ import annotations

import ctypes
import functools
import gc


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to trim
        return None


def release() -> None:
    """Returns the C heap's free memory to the operating system (glibc; a no-op elsewhere)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def released(stage):
    """Decorates a stage function: once it ends, however it ends, the objects it left behind are
    collected and the freed memory returned (`release`)."""

    @functools.wraps(stage)
    def run(*args, **kwargs):
        try:
            return stage(*args, **kwargs)
        finally:
            gc.collect()
            release()

    return run
