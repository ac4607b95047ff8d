"""Stage 2: `python -m dasd_jax.train --config=configs/math.py[:variant] [--config.a.b=value]`.

Loads the model (an HF checkpoint, or a random one for offline runs), keeps a frozen copy as the
base, and runs the step of `step.setup` over the data, with checkpoints every
`checkpoint.every` steps (resuming from the latest one in `workdir`), metrics in
`{workdir}/metrics.jsonl` and TensorBoard, evaluation, and a final HF export to `{workdir}/hf`.
With LoRA (`--config.lora.rank=R`) the loaded weights stay frozen and serve as the base too (no
copy); checkpoints hold the adapters and their optimizer state, `{workdir}/hf` the merged model
and `{workdir}/adapters` the adapters alone in PEFT's layout.
`--config.dry_run=True` compiles the pipeline's programs for `--config.compile_for` (a TPU slice,
a GPU host, or this machine) without loading weights and says whether they fit (`fit_check`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging as absl_logging

from dasd_jax import (checkpoint, cli, data, disk, hf, loading, metrics, model, run_config,
                      sampling, sharding, signals, stages, step)
from dasd_jax.errors import TrainingDiverged

LOGGED = ("loss", "response_nll", "kept_ratio", "aligned", "correction", "drift", "grad_norm",
          "tokens_per_s", "mfu")


# ----------------------------------------------------------------------------- set-up


def load_examples(config: Any, tokenizer, *, evaluation: bool, stop_ids=()):
    """The training (or, `evaluation`, the held-out) examples; None when data.eval_path is
    unset, or when its records lack the base signals that a cached base confidence reads."""
    path = config.data.eval_path if evaluation else config.data.path
    target = config.data.eval_target if evaluation else config.data.target
    if not path:
        return None
    records = data.load_records(
        path, config.data.eval_split if evaluation else config.data.split, config.data.fields,
        generated_examples=(config.data.generated_eval_examples if evaluation
                            else config.data.generated_examples),
        seed=config.seed + (1 if evaluation else 0), target=target,
    )
    examples, _ = data.tokenize(records, tokenizer, run_config.replaced(config.data, target=target),
                                stop_ids=stop_ids)
    if config.train.base_confidence == "cached":
        if not evaluation:
            data.check_cached_base_signals(examples)
        elif not data.has_values(examples, *signals.BASE):
            absl_logging.warning("evaluation skipped: --config.data.eval_path records lack the "
                                 "base signals that --config.train.base_confidence=cached "
                                 "reads")
            return None
    return examples


# ----------------------------------------------------------------------------- training


class FiniteGuard:
    """Stops the run at its first step with a non-finite loss or gradient (whose update the
    step skipped). It reads each step's flag one step late, so the device keeps working ahead,
    except on steps that log, evaluate, checkpoint or end the run: those it checks at once, so
    no checkpoint, evaluation or export ever follows a non-finite step."""

    def __init__(self, config: Any, checkpoints: checkpoint.Checkpointer):
        self.config, self.checkpoints = config, checkpoints
        self.pending: tuple[int, dict] | None = None
        self.last_finite: tuple[int, float] | None = None

    def after_step(self, step_number: int, step_metrics: dict, *, now: bool) -> None:
        if self.pending is not None:
            self._check(*self.pending)
        self.pending = (step_number, step_metrics)
        if now:
            self.flush()

    def flush(self) -> None:
        """Checks the step not yet checked, if any."""
        if self.pending is not None:
            self._check(*self.pending)
            self.pending = None

    def _check(self, step_number: int, step_metrics: dict) -> None:
        values = metrics.fetch_numbers({k: step_metrics[k] for k in ("nonfinite", "loss",
                                                                      "grad_norm")})
        if not values["nonfinite"]:
            self.last_finite = (step_number, values["loss"])
            return
        train = self.config.train
        before = (f"last finite loss {self.last_finite[1]:.4g} at step {self.last_finite[0]}"
                  if self.last_finite else "no finite step before it in this run")
        saved = self.checkpoints.latest_step()
        kept = (f"the last checkpoint, step {saved}, is kept in {self.checkpoints.directory}"
                if saved is not None else "no checkpoint was written")
        raise TrainingDiverged(
            f"step {step_number}: loss {values['loss']:.4g}, gradient norm "
            f"{values['grad_norm']:.4g} ({before}). The update was skipped and the run stopped: "
            f"{kept}, and nothing was exported. Try a lower --config.train.learning_rate "
            f"(now {train.learning_rate:g}), a longer --config.train.warmup_steps (now "
            f"{train.warmup_steps}) or a smaller --config.train.grad_clip (now "
            f"{train.grad_clip:g})" + ("" if self.config.model.compute_dtype == "float32" else
                                       ", or --config.model.compute_dtype=float32"))



def held_out_loss(config, run: step.StepSetup, state, base_params, examples) -> dict[str, float]:
    """Means of the eval step's metrics (loss, selection) over `train.eval_batches` fixed
    batches of the held-out `examples`, as eval_* keys."""
    batches = data.Batches(examples, config.train.batch_size, config.seed, config.data.buckets,
                           pad_id=0)
    results = [metrics.fetch_numbers(run.eval_step(state, base_params, run.place(next(batches))))
               for _ in range(config.train.eval_batches)]
    return {f"eval_{k}": float(np.mean([r[k] for r in results])) for k in results[0]}


@stages.stage("train")
def train(config: Any) -> dict[str, float]:
    """Runs (or resumes) training; returns the last logged metrics."""
    mesh = sharding.make_mesh(config.mesh.shape)
    workdir = Path(config.workdir)
    primary = jax.process_index() == 0
    cfg, params, tokenizer = loading.load_model(config, mesh)
    stop_ids = sampling.stop_ids(cfg, tokenizer)
    examples = load_examples(config, tokenizer, evaluation=False, stop_ids=stop_ids)
    eval_examples = load_examples(config, tokenizer, evaluation=True, stop_ids=stop_ids)

    run = step.setup(config, cfg, mesh)
    base_params = run.base_params(params)
    state = run.init_state(params)
    del params
    checkpoints = checkpoint.Checkpointer(workdir, every=config.checkpoint.every,
                                          max_to_keep=config.checkpoint.max_to_keep,
                                          async_save=config.checkpoint.async_save)
    data_state = None
    if checkpoints.latest_step() is not None:
        state, data_state, restored = checkpoints.restore(
            state, config.checkpoint.resume_step or None)
        absl_logging.warning("resumed from step %d", restored)
    start = int(state.step)
    batches = data.Batches(examples, config.train.batch_size, config.seed, config.data.buckets,
                           pad_id=cfg.pad_token_id or 0, state=data_state,
                           group_by_length=config.data.group_by_length)
    peak = metrics.peak_flops_per_device(jax.devices()[0].device_kind, run.trainee.dtype)
    window = metrics.LogWindow(metrics.Throughput(None, jax.device_count(), peak), run.flops)
    writer = metrics.MetricsWriter(workdir, tensorboard=config.metrics.tensorboard,
                                   enabled=primary, resume_step=start)
    progress = metrics.ProgressBar(config.train.steps, initial=start,
                                   enabled=primary and config.metrics.progress_bar)
    preemption = checkpoint.PreemptionFlag()
    guard = FiniteGuard(config, checkpoints)
    evaluating = bool(eval_examples)
    last: dict[str, float] = {}
    started = time.perf_counter()
    try:
        for current in range(start, config.train.steps):
            batch = next(batches)
            state, step_metrics = run.train_step(state, base_params, run.place(batch))
            done = current + 1
            log_now = done % config.train.log_every == 0 or done == config.train.steps
            eval_now = (evaluating and config.train.eval_every
                        and done % config.train.eval_every == 0)
            guard.after_step(done, step_metrics, now=(
                log_now or eval_now or done % config.checkpoint.every == 0))
            window.add(step_metrics, batch["tokens"].shape, first_of_run=current == start,
                       state=state)
            if log_now:
                last = window.close(step_metrics)
                writer.write(done, last)
                progress.update(done, loss=last["loss"], kept=last["kept_ratio"])
                if primary and not progress.active:
                    shown = {k: last[k] for k in LOGGED if k in last}
                    print(metrics.format_log_line(done, config.train.steps, shown,
                                                  elapsed_s=time.perf_counter() - started,
                                                  start_step=start), flush=True)
            if eval_now:
                writer.write(done, held_out_loss(config, run, state, base_params, eval_examples))
            checkpoints.save(done, state, batches.state)
            if preemption.requested():
                guard.flush()
                checkpoints.save(done, state, batches.state, force=True)
                checkpoints.wait()
                absl_logging.warning("preempted: saved step %d, exiting", done)
                return last
        final_step = int(state.step)
        checkpoints.save(final_step, state, batches.state, force=True)
        if evaluating:
            results = held_out_loss(config, run, state, base_params, eval_examples)
            writer.write(final_step, results)
            last.update(results)
        if config.checkpoint.export:
            export(config, run.trainee, state, base_params, tokenizer, workdir)
    finally:
        preemption.close()
        progress.close()
        writer.close()
        checkpoints.close()
    return last


def export(config: Any, trainee: model.ModelConfig, state: step.TrainState, base_params,
           tokenizer, workdir: Path) -> None:
    """`{workdir}/hf`, the trained model as an HF checkpoint (LoRA adapters merged in), and with
    LoRA and `lora.export_adapters` also `{workdir}/adapters` in PEFT's layout. DiskFull, before
    writing, when the disk lacks room for the weights."""
    size = trainee.num_params * jnp.dtype(config.checkpoint.export_dtype).itemsize
    if jax.process_index() == 0:
        disk.require(workdir, size, "the HF export", "training ends at once from its final "
                     "checkpoint and exports")
    if not step.uses_lora(config):
        hf.save(workdir / "hf", trainee, state.params, tokenizer=tokenizer,
                dtype=config.checkpoint.export_dtype)
        return
    hf.save(workdir / "hf", trainee, base_params, tokenizer=tokenizer,
            dtype=config.checkpoint.export_dtype, lora=state.params)
    if config.lora.export_adapters:
        hf.save_adapters(workdir / "adapters", trainee, state.params,
                         base_model=config.model.path or None)


def main(config: Any) -> None:
    started = time.time()
    train(config)
    if jax.process_index() == 0 and not config.dry_run:
        print(f"done in {time.time() - started:.0f} s; workdir {config.workdir}")


if __name__ == "__main__":
    cli.run(main)
