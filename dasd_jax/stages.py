"""What every stage's command line shares: the --config flag, paths, and the model it runs on.

    python -m dasd_jax.<stage> --config=configs/math.py[:variant] [--config.a.b=value]
"""

from __future__ import annotations

import os
from typing import Any, Callable

import jax
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from dasd_jax import char_tokenizer, hf, model, sharding
from dasd_jax.errors import CheckpointError, UserError, exit_on_user_error
from dasd_jax.tasks import synthetic

CONFIG = config_flags.DEFINE_config_file("config", None, "Task config, e.g. configs/math.py:tiny",
                                         lock_config=True)


def run(stage: Callable[[Any], object]) -> None:
    """`app.run` for a stage's `stage(config)`: bad input prints one line and exits 2."""

    @exit_on_user_error
    def main(argv) -> None:
        if len(argv) > 1:
            raise UserError(f"unexpected arguments {argv[1:]}; settings go in --config.a.b=value")
        if not flags.FLAGS["verbosity"].present:  # Orbax logs every file it writes at INFO
            absl_logging.set_verbosity(absl_logging.WARNING)
        if CONFIG.value is None:
            raise UserError("--config is required, e.g. --config=configs/math.py:tiny")
        initialize_distributed(CONFIG.value)
        stage(CONFIG.value)

    app.run(main)


def _cluster_detected() -> bool:
    """Whether JAX can find its peers by itself: a multi-host TPU slice or a multi-task SLURM job."""
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


def workdir_path(config: Any, path: str) -> str:
    """`path` with "{workdir}" replaced by config.workdir."""
    return path.replace("{workdir}", str(config.workdir)) if path else path


def load_model(config: Any, mesh):
    """(cfg, params, tokenizer): from `model.path`, or random from `model.random`."""
    if config.model.path:
        try:
            cfg, params = hf.load(config.model.path, dtype=config.model.param_dtype, mesh=mesh,
                                  rules=config.mesh.rules)
            tokenizer = hf.load_tokenizer(config.model.path, cfg)
        except CheckpointError as error:
            raise CheckpointError(f"--config.model.path: {error}") from None
        return cfg, params, tokenizer
    tokenizer = random_tokenizer(config)
    cfg = random_model_config(config, tokenizer)
    init = jax.jit(model.init, static_argnums=0,
                   out_shardings=sharding.param_shardings(cfg, mesh, config.mesh.rules))
    return cfg, init(cfg, jax.random.key(config.seed)), tokenizer


def random_tokenizer(config: Any):
    """The tokenizer of a random model (`model.path` ""): `model.random_tokenizer` "characters",
    or "demo_world" (characters plus the demo world's words and numbers as single tokens)."""
    kind = config.model.random_tokenizer
    if kind == "characters":
        return char_tokenizer.build()
    if kind == "demo_world":
        return char_tokenizer.build(words=synthetic.vocabulary_words(), numbers=True)
    raise UserError(f"--config.model.random_tokenizer={kind!r}: choose characters or demo_world")


def random_model_config(config: Any, tokenizer) -> model.ModelConfig:
    return model.ModelConfig(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
        eos_token_ids=(tokenizer.eos_token_id,), pad_token_id=tokenizer.pad_token_id,
        param_dtype=config.model.param_dtype, dtype=config.model.compute_dtype,
        **config.model.random.to_dict(),
    )


def model_config_only(config: Any) -> model.ModelConfig:
    """The ModelConfig without reading any weights (for dry runs)."""
    if not config.model.path:
        return random_model_config(config, random_tokenizer(config))
    try:
        directory = hf.resolve(config.model.path)
    except CheckpointError as error:
        raise CheckpointError(f"--config.model.path: {error}") from None
    return hf.config_from_hf(hf.read_config(directory), config.model.param_dtype)

