"""Orbax checkpoints of the training run, preemption saves, and the final HF export.

A checkpoint holds the TrainState (params, or with LoRA the adapters alone; optimizer state,
step, RNG) and the data iterator's position, so a resumed run reproduces the uninterrupted one
exactly. Saves are asynchronous (training continues while arrays are written) and atomic (Orbax
finalizes a step directory only when complete; unfinished ones are removed). SIGTERM / SIGINT
(spot-VM preemption, Ctrl-C) request a save at the end of the current step, after which the
trainer exits.

Faults: a checkpoint that does not restore (a file cut short by a failed copy, a bad disk) is
set aside as `{step}.damaged` with a one-line warning, and the newest one that restores is used;
a save that the disk has no room for ends the run with one line (`disk.DiskFull`) before it
starts writing, and a write that fails for space likewise, leaving every finished checkpoint.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import shutil
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from absl import logging as absl_logging

from dasd_jax import disk
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


class _QuietSpaceErrors(logging.Filter):
    """Drops Orbax's background threads' logs of a write that failed for space: the run
    reports it in one line (disk.DiskFull)."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not ("No space left on device" in text or "os_error_code='28'" in text)


_QUIET = _QuietSpaceErrors()
SHAPE_MISMATCH = "is not compatible with the stored shape"  # Orbax's words for it


class Checkpointer:
    """`{workdir}/checkpoints`: save every `every` steps (and on demand), keep `max_to_keep`."""

    def __init__(self, workdir: str | Path, *, every: int, max_to_keep: int,
                 async_save: bool = True):
        self.directory = Path(workdir).expanduser().absolute() / "checkpoints"
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, save_interval_steps=every,
            enable_async_checkpointing=async_save, create=True, cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        logging.getLogger("absl").addFilter(_QUIET)
        self._failed = False

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def _resume(self) -> str:
        latest = self.latest_step()
        return ("it resumes from the checkpoint of step " f"{latest}" if latest is not None
                else "it starts again from step 0 (no checkpoint was finished)")

    def _guarded(self, what: str):
        return disk.guard(self.directory, what, self._resume())

    def save(self, step: int, state, data_state: dict, *, force: bool = False) -> bool:
        """Saves when `step` is on the interval (or `force`) and not saved yet; returns whether
        it saved. DiskFull, before writing, when the disk lacks this process's share of it."""
        if step in self.manager.all_steps() or not (force or self.manager.should_save(step)):
            return False
        what = f"the checkpoint of step {step}"
        local_bytes = sum(shard.data.nbytes for leaf in jax.tree.leaves(state)
                          for shard in getattr(leaf, "addressable_shards", ()))
        try:
            disk.require(self.directory, local_bytes, what, self._resume())
            with self._guarded(what):
                args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          data=ocp.args.JsonSave(data_state))
                return self.manager.save(step, args=args, force=force)
        except disk.DiskFull:
            self._failed = True
            raise

    def steps(self) -> list[int]:
        """The finished checkpoints' steps, newest first."""
        return sorted(self.manager.all_steps(), reverse=True)

    def set_aside(self, step: int, why: str, suffix: str = "damaged") -> Path:
        """Renames checkpoint `step` to `{step}.{suffix}` (kept for a person to look at; Orbax
        ignores it) with a one-line warning; process 0 renames, every process waits for it."""
        source, target = self.directory / str(step), self.directory / f"{step}.{suffix}"
        number = 1
        while target.exists():
            number += 1
            target = self.directory / f"{step}.{suffix}-{number}"
        if jax.process_index() == 0:
            os.rename(source, target)
            absl_logging.warning("checkpoint step %d in %s %s; set aside as %s", step,
                                 self.directory, why, target.name)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"checkpoint {step} set aside")
        self.manager.reload()
        return target

    def restore(self, abstract_state, step: int | None = None) -> tuple[Any, dict, int]:
        """(state, data_state, its step): of checkpoint `step`, or else the newest checkpoint
        that restores (those that do not are set aside). Each array is restored straight into
        the sharding of the matching leaf of `abstract_state` (jax.ShapeDtypeStruct with
        `.sharding`, or a live state): the mesh may differ from the one that saved it. A given
        `step` sets every newer checkpoint aside as `.superseded`, so the run saves its own."""
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), abstract_state)
        if step is not None:
            if step not in self.manager.all_steps():
                raise UserError(f"--config.checkpoint.resume_step={step}: no checkpoint of that "
                                f"step in {self.directory} (there are {self.steps() or 'none'})")
            for newer in (s for s in self.steps() if s > step):
                self.set_aside(newer, f"is newer than --config.checkpoint.resume_step={step}",
                               "superseded")

        def restore_step(candidate: int):
            _check_fits(self.directory / str(candidate) / "state", abstract, candidate)
            restored = self.manager.restore(candidate, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
            return restored["state"], restored["data"], candidate

        return self._newest_that_restores(restore_step, step)

    def restore_params(self, abstract_params, step: int | None = None):
        """The TrainState's params of `step` (default: the newest checkpoint that restores; the
        others are set aside) alone, each array straight into the sharding of its
        `abstract_params` leaf (ShapeDtypeStruct with `.sharding`): the optimizer state is never
        read, so evaluating an 8B run needs the memory of its params, not of params and AdamW
        moments."""
        item = {"params": abstract_params}

        def restore_step(candidate: int):
            _check_fits(self.directory / str(candidate) / "state", item, candidate,
                        partial=True)
            restored = ocp.PyTreeCheckpointer().restore(
                self.directory / str(candidate) / "state", args=ocp.args.PyTreeRestore(
                    item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                    partial_restore=True))
            return restored["params"]

        return self._newest_that_restores(restore_step, step)

    def _newest_that_restores(self, restore_step: Callable[[int], Any], step: int | None):
        candidates = [step] if step is not None else self.steps()
        if not candidates:
            raise UserError(f"no checkpoint to restore in {self.directory}")
        set_aside = []
        _drop_stray_read_callbacks()
        for candidate in candidates:
            try:
                return restore_step(candidate)
            except UserError:
                raise  # the checkpoint is whole but was written by another run's settings
            except Exception as error:  # noqa: BLE001 - a damaged step fails in many ways
                reason = _first_line(error)
                if SHAPE_MISMATCH in reason:  # whole, but its arrays are another model's
                    raise _does_not_fit(candidate, self.directory, reason) from None
                if step is not None:
                    raise UserError(f"the checkpoint of step {step} in {self.directory} does not "
                                    f"restore ({reason}); resume from another step, or unset "
                                    "--config.checkpoint.resume_step to take the newest that "
                                    "restores") from None
                set_aside.append(self.set_aside(candidate, f"does not restore ({reason})").name)
        raise UserError(f"no checkpoint in {self.directory} restores: set aside as "
                        f"{', '.join(set_aside)}; start afresh in another --config.workdir, or "
                        "move the checkpoints folder away")

    def wait(self) -> None:
        """Blocks until every pending asynchronous save is on disk."""
        try:
            with self._guarded("a checkpoint"):
                self.manager.wait_until_finished()
        except disk.DiskFull:
            self._failed = True
            raise

    def close(self) -> None:
        """Finishes pending saves and closes; after a failed save, also removes what it left
        unfinished (the failure itself was raised already)."""
        try:
            self.wait()
            self.manager.close()
        except disk.DiskFull:
            if not self._failed:
                raise
        finally:
            if self._failed:
                for unfinished in self.directory.glob("*.orbax-checkpoint-tmp*"):
                    shutil.rmtree(unfinished, ignore_errors=True)


def _leaf_names(tree) -> set[str]:
    """{"params.layers.mlp.up_proj.kernel", ...}: a tree's arrays, named as Orbax names them."""
    def name(path) -> str:
        return ".".join(str(getattr(key, "key", getattr(key, "idx", getattr(key, "name", key))))
                        for key in path)
    return {name(path) for path, _ in jax.tree_util.tree_leaves_with_path(tree)}


def _saved_names(directory: Path) -> set[str]:
    """The arrays a checkpoint item holds, from its tree index (`_METADATA`, plain JSON beside
    the array store): whole when the arrays are damaged."""
    tree = json.loads((directory / "_METADATA").read_text())["tree_metadata"]
    return {".".join(ast.literal_eval(key)) for key, entry in tree.items()
            if entry["value_metadata"]["value_type"] != "None"}


def _check_fits(directory: Path, abstract, step: int, partial: bool = False) -> None:
    """UserError unless the checkpoint item in `directory` holds `abstract`'s arrays (with
    `partial`, at least those). An unreadable index raises as a damaged checkpoint would; arrays
    of other shapes are found by the restore (a ValueError)."""
    saved, wanted = _saved_names(directory), _leaf_names(abstract)
    missing = sorted(wanted - saved)
    extra = [] if partial else sorted(saved - wanted)
    if missing or extra:
        detail = "; ".join(f"{what}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
                           for what, names in (("missing", missing), ("unexpected", extra))
                           if names)
        raise _does_not_fit(step, directory.parent.parent, detail)


def _does_not_fit(step: int, directory: Path, detail: str) -> UserError:
    return UserError(
        f"the checkpoint of step {step} in {directory} does not fit this run ({detail}); it "
        "was written with other model or --config.lora settings (LoRA checkpoints hold the "
        "adapters only): run with those settings, or start afresh in another --config.workdir")


def _drop_stray_read_callbacks() -> None:
    """When a restore fails, tensorstore completes the reads still in flight and calls back
    into the asyncio loop Orbax has closed; Python reports each as an unraisable
    RuntimeError("Event loop is closed"), a traceback per array. Those (and only those) are
    dropped from the first restore on."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_stray_read_callbacks", False):
        return

    def hook(unraisable):
        value = unraisable.exc_value
        if not (isinstance(value, RuntimeError) and str(value) == "Event loop is closed"):
            previous(unraisable)

    hook.drops_stray_read_callbacks = True
    sys.unraisablehook = hook


def _first_line(error: BaseException) -> str:
    """The first line of what went wrong, reaching into what the error was raised from (Orbax
    wraps the storage layer's error in a bare Exception)."""
    causes = [error]
    while causes[-1].__cause__ is not None and len(causes) < 8:
        causes.append(causes[-1].__cause__)
    text = next((str(e) for e in reversed(causes) if str(e).strip()), type(error).__name__)
    return " ".join(text.split())[:200]
