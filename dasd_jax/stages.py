"""What every stage function shares (train, rewrite, evaluate, analyze):

    @stages.stage("train")
    def train(config) -> dict: ...     # gets the resolved, frozen config

its config is resolved and frozen before any work (`run_config.resolve`, with what the stage
needs checked), a dry run compiles the pipeline for `compile_for` instead of running it
(`fit_check`), and the memory the stage freed is given back however it ends (`host_memory`).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from dasd_jax import fit_check, host_memory, run_config


def stage(name: str) -> Callable:
    def decorate(run: Callable[[Any], Any]) -> Callable[[Any], Any]:
        @functools.wraps(run)
        @host_memory.released
        def resolved_run(config: Any) -> Any:
            config = run_config.resolve(config, name)
            if config.dry_run:
                return fit_check.check(config)
            return run(config)

        return resolved_run

    return decorate
