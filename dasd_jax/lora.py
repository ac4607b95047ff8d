"""LoRA around the decoder: `config.lora` as ModelConfig fields, and adapters merged into params.

The adapters themselves are computed in `model.py` (`Linear`, the `lora` variable collection,
`init_lora`); with LoRA the training step trains them alone on the frozen base (`step.py`), and
`hf.save` writes either the merged model or the adapters in PEFT's layout.

An adapter tree mirrors the params tree down to the targeted projections:
{"layers": {"self_attn": {"q_proj": {"lora_a": [L, D, r], "lora_b": [L, r, N, H]}, ...}, ...}}.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from dasd_jax import model

Array = jax.Array
PyTree = Any


def model_fields(settings: Any) -> dict:
    """ModelConfig LoRA fields from `config.lora` ({} when rank is 0, i.e. LoRA off); the
    fields were checked by dasd_jax/validation.py."""
    if not settings.rank:
        return {}
    return dict(lora_rank=int(settings.rank), lora_alpha=float(settings.alpha),
                lora_dropout=float(settings.dropout),
                lora_targets=model.parse_lora_targets(settings.targets))


def modules(adapters: PyTree) -> dict[tuple[str, ...], dict[str, Array]]:
    """{module path, e.g. ("layers", "self_attn", "q_proj"): {"lora_a": ..., "lora_b": ...}}."""
    found: dict[tuple[str, ...], dict[str, Array]] = {}
    for path, value in traverse_util.flatten_dict(adapters).items():
        found.setdefault(path[:-1], {})[path[-1]] = value
    return found


def update(cfg: model.ModelConfig, adapter: dict[str, Array]) -> Array:
    """float32[L, *in, *out]: lora_scale · A·B of one projection, shaped like its kernel.

    adapter: {"lora_a": [L, *in, r], "lora_b": [L, r, *out]}.
    """
    if not cfg.lora_rank:
        raise ValueError("cfg has no LoRA adapters (lora_rank=0); pass the adapted model's cfg")
    a, b = adapter["lora_a"], adapter["lora_b"]
    layers, rank = a.shape[0], a.shape[-1]
    product = jnp.matmul(a.reshape(layers, -1, rank).astype(jnp.float32),
                         b.reshape(layers, rank, -1).astype(jnp.float32),
                         precision=jax.lax.Precision.HIGHEST)
    return cfg.lora_scale * product.reshape(a.shape[:-1] + b.shape[2:])


@functools.partial(jax.jit, static_argnums=(0, 3))
def merged_kernel(cfg: model.ModelConfig, kernel: Array, adapter: dict[str, Array],
                  dtype: Any = None) -> Array:
    """W + lora_scale · A·B, summed in float32, in `dtype` (default the kernel's)."""
    merged = kernel.astype(jnp.float32) + update(cfg, adapter)
    return merged.astype(kernel.dtype if dtype is None else dtype)


def merge(cfg: model.ModelConfig, params: PyTree, adapters: PyTree) -> PyTree:
    """Plain params of the adapted model, to run under `model.adapters_off(cfg)`: every targeted
    kernel W becomes W + lora_scale · A·B; the other params are shared, not copied."""
    flat = traverse_util.flatten_dict(params)
    for path, adapter in modules(adapters).items():
        flat[path + ("kernel",)] = merged_kernel(cfg, flat[path + ("kernel",)], adapter)
    return traverse_util.unflatten_dict(flat)
