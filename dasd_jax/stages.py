"""What every stage function shares (train, rewrite, evaluate, analyze):

    @stages.stage("train")
    def train(config) -> dict: ...     # gets the resolved, frozen config, its output locked

its config is resolved and frozen before any work (`run_config.resolve`, with what the stage
needs checked); a dry run compiles the pipeline for `compile_for` instead of running it
(`fit_check`); otherwise the stage holds the lock of what it writes while it runs
(`workdir_lock`: a second process on the same output is refused in one line), a write that
fails for want of space ends it in one line (`disk.DiskFull`, naming what re-running picks
up), and the memory it freed is given back however it ends (`host_memory`).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable

from dasd_jax import disk, fit_check, host_memory, run_config, workdir_lock

# stage -> (the lock file of what it writes, what that is) of a resolved config
LOCKS: dict[str, Callable[[Any], tuple[Path, str]]] = {
    "train": lambda c: (Path(c.workdir) / workdir_lock.LOCK_NAME, f"the workdir {c.workdir}"),
    "rewrite": lambda c: (Path(f"{c.rewrite.output}.lock"),
                          f"the rewrite file {c.rewrite.output}"),
    "evaluate": lambda c: (Path(c.eval.output) / workdir_lock.LOCK_NAME,
                           f"the evaluation folder {c.eval.output}"),
    "analyze": lambda c: (Path(c.analyze.output) / workdir_lock.LOCK_NAME,
                          f"the analysis folder {c.analyze.output}"),
}

# stage -> what running the same command again does after it stopped short
RESUMES = {"train": "training resumes from its last finished checkpoint",
           "rewrite": "the rewrite skips the records it has written",
           "evaluate": "the evaluation runs again", "analyze": "the analysis runs again"}


def stage(name: str) -> Callable:
    def decorate(run: Callable[[Any], Any]) -> Callable[[Any], Any]:
        @functools.wraps(run)
        @host_memory.released
        def resolved_run(config: Any) -> Any:
            config = run_config.resolve(config, name)
            if config.dry_run:
                return fit_check.check(config)
            lock, what = LOCKS[name](config)
            with workdir_lock.held(lock, what), disk.guard(lock.parent, what, RESUMES[name]):
                return run(config)

        return resolved_run

    return decorate
