"""The model a stage runs on: an HF checkpoint, or a random one, with its tokenizer.

    cfg, params, tokenizer = loading.load_model(config, mesh)     # weights placed on the mesh
    cfg = loading.model_config_only(config)                       # no weights read (dry runs)
"""

from __future__ import annotations

from typing import Any

import jax

from dasd_jax import char_tokenizer, hf, model, sharding, targets
from dasd_jax.errors import CheckpointError
from dasd_jax.tasks import registry


def load_model(config: Any, mesh):
    """(cfg, params, tokenizer): from `model.path`, or random from `model.random`."""
    if config.model.path:
        try:
            cfg, params = hf.load(config.model.path, dtype=config.model.param_dtype, mesh=mesh,
                                  rules=config.mesh.rules)
            tokenizer = hf.load_tokenizer(config.model.path, cfg)
        except CheckpointError as error:
            raise CheckpointError(f"--config.model.path: {error}") from None
        return cfg.replace(platform=targets.platform_for(config)), params, tokenizer
    tokenizer = random_tokenizer(config)
    cfg = random_model_config(config, tokenizer)
    init = jax.jit(model.init, static_argnums=0,
                   out_shardings=sharding.param_shardings(cfg, mesh, config.mesh.rules))
    return cfg, init(cfg, jax.random.key(config.seed)), tokenizer


def random_tokenizer(config: Any):
    """The tokenizer of a random model (`model.path` ""): `model.random_tokenizer` "characters",
    or "synthetic" (characters plus the synthetic world's words and numbers as single tokens)."""
    kind = config.model.random_tokenizer
    return char_tokenizer.build() if kind == "characters" else registry.tokenizer(kind)


def random_model_config(config: Any, tokenizer) -> model.ModelConfig:
    return model.ModelConfig(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
        eos_token_ids=(tokenizer.eos_token_id,), pad_token_id=tokenizer.pad_token_id,
        param_dtype=config.model.param_dtype, dtype=config.model.compute_dtype,
        platform=targets.platform_for(config), **config.model.random.to_dict(),
    )


def model_config_and_tokenizer(config: Any):
    """(ModelConfig, tokenizer) of `model.path` (or the random model) without reading weights."""
    cfg = model_config_only(config)
    if not config.model.path:
        return cfg, random_tokenizer(config)
    try:
        return cfg, hf.load_tokenizer(hf.resolve(config.model.path), cfg)
    except CheckpointError as error:
        raise CheckpointError(f"--config.model.path: {error}") from None


def model_config_only(config: Any) -> model.ModelConfig:
    """The ModelConfig without reading any weights (for dry runs)."""
    if not config.model.path:
        return random_model_config(config, random_tokenizer(config))
    try:
        directory = hf.resolve(config.model.path)
    except CheckpointError as error:
        raise CheckpointError(f"--config.model.path: {error}") from None
    return hf.config_from_hf(hf.read_config(directory), config.model.param_dtype).replace(
        platform=targets.platform_for(config))

