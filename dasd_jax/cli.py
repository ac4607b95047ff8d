"""What every stage's command line shares: the --config flag, its checks, distributed start-up.

    python -m dasd_jax.<stage> --config=configs/math.py[:variant] [--config.a.b=value]

`run(stage)` parses the flags (each mistake one line, exit 2), starts JAX's multi-host runtime
when the run has several processes, and calls `stage(config)`; the stage resolves and freezes
its config first thing (`run_config.resolve`).
"""

from __future__ import annotations

import difflib
import importlib.util
import os
from pathlib import Path
from typing import Any, Callable

import jax
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from dasd_jax import validation
from dasd_jax.errors import UserError, exit_on_user_error

CONFIG = config_flags.DEFINE_config_file("config", None, "Task config, e.g. configs/math.py:tiny",
                                         lock_config=True)


def run(stage: Callable[[Any], object]) -> None:
    """`app.run` for a stage's `stage(config)`: bad input (flags, the config file, any field's
    value) prints one line and exits 2 before any work starts."""

    @exit_on_user_error
    def main(argv) -> None:
        if len(argv) > 1:
            raise UserError(f"unexpected arguments {argv[1:]}; settings go in --config.a.b=value")
        if not flags.FLAGS["verbosity"].present:  # Orbax logs every file it writes at INFO
            absl_logging.set_verbosity(absl_logging.WARNING)
        if CONFIG.value is None:
            raise UserError("--config is required, e.g. --config=configs/math.py:tiny")
        config = CONFIG.value
        validation.validate(config)
        initialize_distributed(config)
        stage(config)

    app.run(main, flags_parser=parse_flags)


@exit_on_user_error
def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with the --config file and every --config.a.b override checked
    first, so that each mistake is one line naming the flag (not a traceback)."""
    check_command_line(argv)
    try:
        return flags.FLAGS(argv)
    except Exception as error:  # noqa: BLE001 - absl and ml_collections raise many kinds
        raise UserError(" ".join(str(error).split())) from None


def _config_arguments(argv: list[str]) -> tuple[str | None, list[str]]:
    """(the --config value, the dotted names of the --config.a.b overrides)."""
    value, overrides = None, []
    for i, arg in enumerate(argv[1:], start=1):
        if arg == "--config" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--config="):
            value = arg.split("=", 1)[1]
        elif arg.startswith("--config."):
            overrides.append(arg[len("--config."):].split("=", 1)[0])
    return value, overrides


def check_command_line(argv: list[str]) -> None:
    """UserError for a --config file that is missing or does not load, an unknown variant, or an
    override that names no field of it (with the closest field names)."""
    value, overrides = _config_arguments(argv)
    if value is None:
        return
    path, _, variant = value.partition(":")
    if not Path(path).is_file():
        raise UserError(f"--config={value}: no config file at {path} (relative to {Path.cwd()}); "
                        "the task configs are configs/math.py, configs/code.py and "
                        "configs/commonsense.py")
    spec = importlib.util.spec_from_file_location("_dasd_jax_config_check", path)
    try:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        config = module.get_config(variant) if variant else module.get_config()
    except UserError as error:
        raise UserError(f"--config={value}: {error}") from None
    except Exception as error:  # noqa: BLE001 - whatever the config file raised
        raise UserError(f"--config={value} does not load: {type(error).__name__}: "
                        f"{' '.join(str(error).split())}") from None
    for dotted in overrides:
        node = config
        for depth, part in enumerate(dotted.split(".")):
            if not hasattr(node, "keys") or part not in node:
                where = ".".join(dotted.split(".")[:depth]) or "the config"
                close = difflib.get_close_matches(part, list(node.keys()), n=3) if hasattr(
                    node, "keys") else []
                hint = f"; did you mean {' or '.join(close)}?" if close else ""
                raise UserError(f"--config.{dotted}: {where} has no field {part!r}{hint} "
                                "(every field is in dasd_jax/config_defaults.py)")
            node = node[part]


def _cluster_detected() -> bool:
    """Whether JAX can find its peers by itself: a multi-host TPU slice or a multi-task SLURM
    job."""
    tpu_hosts = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    slurm_tasks = int(os.environ.get("SLURM_NTASKS", "1") or 1)
    return len(tpu_hosts) > 1 or (slurm_tasks > 1 and "SLURM_PROCID" in os.environ)


def initialize_distributed(config: Any) -> None:
    """`jax.distributed.initialize` for a multi-host run; nothing for a single process.

    Explicit `distributed.coordinator`, `num_processes`, `process_id` win; otherwise TPU pods and
    SLURM jobs are detected from their environment. Must run before JAX touches a device.
    """
    settings = config.distributed
    if settings.coordinator:
        if settings.num_processes < 1 or not 0 <= settings.process_id < settings.num_processes:
            raise UserError(
                "--config.distributed.coordinator needs --config.distributed.num_processes=N "
                "and --config.distributed.process_id=i with 0 <= i < N")
        jax.distributed.initialize(
            settings.coordinator, settings.num_processes, settings.process_id,
            initialization_timeout=settings.initialization_timeout)
    elif _cluster_detected():
        jax.distributed.initialize(initialization_timeout=settings.initialization_timeout)
