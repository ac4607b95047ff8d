"""Orbax checkpoints of the training run, preemption saves, and the final HF export.

A checkpoint holds the TrainState (params, or with LoRA the adapters alone; optimizer state,
step, RNG) and the data iterator's position, so a resumed run reproduces the uninterrupted one
exactly. Saves are asynchronous (training continues while arrays are written) and atomic (Orbax
finalizes a step directory only when complete). SIGTERM / SIGINT (spot-VM preemption, Ctrl-C)
request a save at the end of the current step, after which the trainer exits.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from dasd_jax.errors import UserError


class PreemptionFlag:
    """Set by SIGTERM/SIGINT (or the JAX coordination service's preemption notice); the trainer
    checks `requested()` after every step. The previous handlers are restored by `close()`."""

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self._event = threading.Event()
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self._event.set()

    def requested(self) -> bool:
        local = self._event.is_set()
        if jax.process_count() == 1:
            return local
        from jax.experimental import multihost_utils

        return bool(multihost_utils.process_allgather(local).any())

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


class Checkpointer:
    """`{workdir}/checkpoints`: save every `every` steps (and on demand), keep `max_to_keep`."""

    def __init__(self, workdir: str | Path, *, every: int, max_to_keep: int,
                 async_save: bool = True):
        if every <= 0:
            raise UserError(f"--config.checkpoint.every must be positive, not {every}")
        self.directory = Path(workdir).expanduser().absolute() / "checkpoints"
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, save_interval_steps=every,
            enable_async_checkpointing=async_save, create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict, *, force: bool = False) -> bool:
        """Saves when `step` is on the interval (or `force`) and not saved yet; returns whether
        it saved."""
        if step in self.manager.all_steps():
            return False
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=ocp.args.JsonSave(data_state))
        return self.manager.save(step, args=args, force=force)

    def restore(self, abstract_state, step: int | None = None) -> tuple[Any, dict]:
        """(state, data_state) of `step` (default latest), each array restored straight into
        the sharding of the matching leaf of `abstract_state` (jax.ShapeDtypeStruct with
        `.sharding`, or a live state): the mesh may differ from the one that saved it."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise UserError(f"no checkpoint to restore in {self.directory}")
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), abstract_state)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
        except ValueError as error:  # Orbax: another tree structure or array shape on disk
            detail = " ".join(line.strip() for line in str(error).splitlines()[:2])[:240]
            raise UserError(
                f"the checkpoint of step {step} in {self.directory} does not fit this run's "
                f"training state ({detail}); it was written with other model or --config.lora "
                "settings (LoRA checkpoints hold the adapters only): run with those settings, "
                "or start afresh in another --config.workdir") from None
        return restored["state"], restored["data"]

    def restore_params(self, abstract_params, step: int | None = None):
        """The TrainState's params of `step` (default latest) alone, each array straight into the
        sharding of its `abstract_params` leaf (ShapeDtypeStruct with `.sharding`): the
        optimizer state is never read, so evaluating an 8B run needs the memory of its params,
        not of params and AdamW moments."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise UserError(f"no checkpoint to restore in {self.directory}")
        item = {"params": abstract_params}
        try:
            restored = ocp.PyTreeCheckpointer().restore(
                self.directory / str(step) / "state", args=ocp.args.PyTreeRestore(
                    item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                    partial_restore=True))
        except (ValueError, KeyError) as error:
            detail = " ".join(str(error).split())[:240]
            raise UserError(
                f"the params of step {step} in {self.directory} do not fit this model ({detail});"
                " evaluate with the model and --config.lora settings the run trained with"
            ) from None
        return restored["params"]

    def wait(self) -> None:
        """Blocks until every pending asynchronous save is on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
