"""A stage's config: checked, resolved and frozen before any work.

    config = run_config.resolve(config)        # a FrozenConfigDict: assigning to it raises
    data_settings = run_config.replaced(config.data, target="reference")  # a changed copy

`resolve` settles everything a run decides from its config once: every field is checked
(`validation.validate`, the one place every rule lives); "{workdir}" and a leading "~" in every
path field are replaced; `selection.rho` unset becomes the alpha the training file's rewrite
was written with (else rewrite.alpha); `mesh.shape`'s -1 becomes the devices left over (of the
`compile_for` target, or of this host); `model.platform` "auto" becomes the target's platform
(or this host's backend); `train.base_confidence` "auto" becomes, for the train stage, "cached"
when the training file was rewritten by this very model and every record carries the base
signals, else (and for the other stages and dry runs) "model".
The result is frozen (ml_collections.FrozenConfigDict, hashable): the stages and the jitted
code they build read it and never change it; a variant is a new frozen copy (`replaced`).
Resolving a resolved config returns it unchanged.

FrozenConfigDict rather than typed dataclasses: the ~115 fields keep the names and nesting
users type as flags (`--config.train.steps`), big_vision and the configs/ files use them as
they are, and freezing needs no second schema to keep in step with config_defaults.py.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
from absl import logging as absl_logging

from dasd_jax import data, rewrite_file, signals, targets, validation
from dasd_jax.errors import UserError

# Fields holding paths: "{workdir}" in them is --config.workdir, a leading "~" the home folder.
PATH_FIELDS = ("data.path", "data.eval_path", "rewrite.input", "rewrite.output",
               "eval.checkpoint", "eval.baseline", "eval.predictions", "eval.output",
               "eval.shift.cache", "analyze.sources", "analyze.output", "demo.cache_dir")
RESOLVED = "_resolved"  # marks a config `resolve` produced


def resolve(config: Any, stage: str | None = None) -> ml_collections.FrozenConfigDict:
    """The frozen, resolved config a stage runs on (see the module docstring). UserError, one
    line naming the flag, for the first field that makes no sense, or that `stage` (train,
    rewrite, evaluate, analyze) needs and lacks."""
    if isinstance(config, ml_collections.FrozenConfigDict) and config.get(RESOLVED):
        validation.require(config, stage)
        return config
    config = mutable(config)
    validation.validate(config, stage)
    _resolve_paths(config)
    if "selection" in config:
        _resolve_rho(config)
    if "mesh" in config:
        config.mesh.shape = _mesh_shape(config)
        if "train" in config:
            _check_batch_layout(config)
    if "model" in config and config.model.get("platform", "auto") == "auto":
        config.model.platform = targets.platform_for(config) or jax.default_backend()
    if "train" in config and config.train.base_confidence == "auto":
        # Only training reads it; elsewhere (and in a dry run) the step plans for the forward.
        config.train.base_confidence = (_base_confidence(config) if stage == "train"
                                        and not config.dry_run else "model")
    with config.unlocked():
        config[RESOLVED] = True
    return ml_collections.FrozenConfigDict(config)


def replaced(section: Any, **values) -> ml_collections.FrozenConfigDict:
    """A frozen copy of `section` (a config or a section of one) with `values` set."""
    copy = mutable(section)
    copy.update(values)
    return ml_collections.FrozenConfigDict(copy)


def replaced_fields(config: Any, fields: dict[str, Any]) -> ml_collections.FrozenConfigDict:
    """A frozen copy of `config` with dotted fields set: {"train.batch_size": 4, ...}."""
    copy = mutable(config)
    for dotted, value in fields.items():
        *sections, name = dotted.split(".")
        node = copy
        for section in sections:
            node = node[section]
        node[name] = value
    return ml_collections.FrozenConfigDict(copy)


def mutable(config: Any) -> ml_collections.ConfigDict:
    """A mutable copy of a config or section, frozen or not (to build another config from)."""
    if isinstance(config, ml_collections.FrozenConfigDict):
        config = config.as_configdict()  # the frozen dict's own copy: never changed in place
    return config.copy_and_resolve_references()


def _resolve_paths(config: ml_collections.ConfigDict) -> None:
    workdir = os.path.expanduser(str(config.workdir)) if config.get("workdir") else ""
    config.workdir = workdir

    def resolved(value: str) -> str:
        value = value.replace("{workdir}", workdir)
        return os.path.expanduser(value) if value.startswith("~") else value

    for dotted in PATH_FIELDS:
        *sections, name = dotted.split(".")
        node = config
        for section in sections:
            node = node.get(section) if hasattr(node, "get") else None
        if node is not None and isinstance(node.get(name), str):
            node[name] = resolved(node[name])
    if "eval" in config:
        for task, path in config.eval.paths.items():
            config.eval.paths[task] = resolved(path or "")


def _mesh_shape(config: ml_collections.ConfigDict) -> tuple[int, ...]:
    """mesh.shape with its -1 (if any) replaced by the devices the other axes leave."""
    shape = tuple(config.mesh.shape)
    if -1 not in shape:
        return shape
    devices = targets.device_count(config.get("compile_for", "")) or jax.device_count()
    known = 1
    for size in shape:
        known *= size if size != -1 else 1
    return tuple(devices // known if size == -1 else size for size in shape)


def _resolve_rho(config: ml_collections.ConfigDict) -> None:
    """selection.rho, and where it came from (selection.rho_from: "config", "rewrite" or
    "default", so that a stage reading several rewrite files takes each one's own alpha
    unless the config set rho)."""
    source = "config"
    if config.selection.rho is None:
        recorded = rewrite_file.recorded_alpha(config.data.path) if "data" in config else None
        source = "default" if recorded is None else "rewrite"
        config.selection.rho = float(config.rewrite.alpha if recorded is None else recorded)
    with config.unlocked():
        config.selection.rho_from = source


def _check_batch_layout(config: ml_collections.ConfigDict) -> None:
    """UserError unless each micro-batch splits evenly over the mesh's batch axes."""
    shards = config.mesh.shape[0] * config.mesh.shape[1]
    micro_batch = config.train.batch_size // config.train.micro_batches
    if micro_batch % shards:
        raise UserError(
            f"--config.train.batch_size={config.train.batch_size} / --config.train.micro_batches="
            f"{config.train.micro_batches} must be a whole multiple of the mesh's data x fsdp size "
            f"{shards} (mesh {tuple(config.mesh.shape)}), so that every device works on its own "
            "examples")


def _base_confidence(config: ml_collections.ConfigDict) -> str:
    """"cached" when the training file was rewritten by this model and every record (held-out
    ones too) carries the base signals on its response, else "model"."""
    cached = config.data.target == "response" and rewrite_file.written_by(config.data.path,
                                                                           config)
    for path, split in ((config.data.path, config.data.split),
                        (config.data.eval_path, config.data.eval_split)):
        if cached and path:
            records = data.load_records(path, split, config.data.fields, target="response")
            cached = all(record.get(name) is not None for record in records
                         for name in signals.BASE)
    absl_logging.warning("train.base_confidence=auto: %s", "the rewrite's recorded base signals"
                         if cached else "the base forward in the step")
    return "cached" if cached else "model"
