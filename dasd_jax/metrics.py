"""Training metrics: JSON lines + TensorBoard, tokens/s and MFU, a progress bar or log lines.

    with MetricsWriter(workdir, resume_step=restored_step) as writer:
        speed = Throughput(step_flops(cfg, batch, seq_len, base_forward=True), jax.device_count(),
                           peak_flops_per_device(jax.devices()[0].device_kind))
        ...
        metrics = jax.device_get(metrics)               # blocks, so the clock sees finished work
        metrics |= speed.measure(steps_since_log, tokens_since_log)
        writer.write(step, metrics)

`{workdir}/metrics.jsonl` holds one object per logged step, `{"step": 20, "loss": 1.234, ...}`;
`{workdir}/tensorboard` the same scalars for TensorBoard. Only the primary process writes.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from dasd_jax import targets
from dasd_jax.model import ModelConfig

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def to_number(name: str, value: Any) -> int | float:
    """A Python int/float for a Python number, numpy scalar or one-element (jax) array."""
    array = np.asarray(value)
    if array.size != 1 or not (jnp.issubdtype(array.dtype, jnp.number) or array.dtype == bool):
        raise TypeError(f"metric {name!r} must be a number or a one-element numeric array, "
                        f"got {type(value).__name__} with shape {array.shape} and dtype "
                        f"{array.dtype}")
    if jnp.issubdtype(array.dtype, jnp.inexact):
        return float(array.astype(np.float64).reshape(()))
    return int(array.reshape(()))


def fetch_numbers(metrics: Mapping[str, Any]) -> dict[str, int | float]:
    """`metrics` as Python numbers, in their order, None values left out; one device transfer."""
    names = [name for name, value in metrics.items() if value is not None]
    values = jax.device_get([metrics[name] for name in names])
    return {name: to_number(name, value) for name, value in zip(names, values)}


@jax.jit
def add(total: Mapping[str, Any], metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Step metrics summed on device (no host transfer): total + metrics, key by key."""
    return jax.tree.map(lambda a, b: a + b, dict(total), dict(metrics))


CURRENT_VALUE_METRICS = ("learning_rate",)  # logged as of the last step, not averaged


def window_mean(total: Mapping[str, float], steps: int, last: Mapping[str, float]) -> dict:
    """The mean of each metric over the `steps` steps since the last log line (`total` their
    sum), except the CURRENT_VALUE_METRICS, taken from `last`, the latest step's."""
    return {name: last[name] if name in CURRENT_VALUE_METRICS else value / steps
            for name, value in total.items()}


class MetricsWriter:
    """Appends `{"step": s, **metrics}` lines to `{workdir}/metrics.jsonl` (and TensorBoard
    scalars).

    enabled: False on non-primary processes of a multi-host run; then nothing is written anywhere.
    resume_step: the step of the restored checkpoint. Lines with a larger step were logged after
      that checkpoint by the run that crashed; they will be recomputed, so they are dropped now
      (the file is rewritten atomically) and TensorBoard purges its events after that step too.
    Non-finite values are written as JSON `NaN` / `Infinity`, which Python's `json` reads back.
    """

    def __init__(self, workdir: str | os.PathLike, *, tensorboard: bool = True,
                 enabled: bool = True, resume_step: int | None = None):
        self.path = os.path.join(os.fspath(workdir), METRICS_FILE)
        self._file = None
        self._tensorboard = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        if resume_step is not None and os.path.exists(self.path):
            _drop_lines_after(self.path, resume_step)
        self._file = open(self.path, "a", encoding="utf-8")
        if self._file.tell() and not _ends_with_newline(self.path):
            self._file.write("\n")  # a line cut short by a crash stays on its own line
        if tensorboard:
            from tensorboardX import SummaryWriter

            purge_step = None if resume_step is None else resume_step + 1
            self._tensorboard = SummaryWriter(os.path.join(os.fspath(workdir), TENSORBOARD_DIR),
                                              purge_step=purge_step)

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """One line for `step`; None values are skipped, arrays are fetched in one transfer."""
        if self._file is None:
            return
        numbers = fetch_numbers({k: v for k, v in metrics.items() if k != "step"})
        self._file.write(json.dumps({"step": int(step), **numbers}) + "\n")
        self._file.flush()
        if self._tensorboard is not None:
            for name, value in numbers.items():
                self._tensorboard.add_scalar(name, value, int(step))
            self._tensorboard.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _ends_with_newline(path: str) -> bool:
    with open(path, "rb") as file:
        file.seek(-1, os.SEEK_END)
        return file.read(1) == b"\n"


def _drop_lines_after(path: str, last_step: int) -> None:
    """Rewrites `path` without the lines whose step > last_step (and any line cut short)."""
    kept = []
    with open(path, encoding="utf-8") as file:
        for line in file:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(record, dict) or record.get("step", last_step) <= last_step:
                kept.append(line if line.endswith("\n") else line + "\n")
    handle, temporary = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".metrics.",
                                         suffix=".tmp")
    with os.fdopen(handle, "w", encoding="utf-8") as file:
        file.writelines(kept)
    shutil.copymode(path, temporary)  # mkstemp makes it owner-only
    os.replace(temporary, path)


# ----------------------------------------------------------------------------- FLOPs and MFU


def matmul_params(cfg: ModelConfig) -> int:
    """Weights that take part in a matmul per token: q/k/v/o and MLP kernels, and the unembedding.

    = num_layers * (D*E*(2H + 2K) + 3*D*F) + V*D. The unembedding (V*D) counts whether or not it
    is tied: the embedding lookup is a gather (no FLOPs), the output projection a matmul. So this
    is `cfg.num_params` minus the lookup table when untied (tied: the same matrix counted once, as
    the projection), minus norm scales and biases (elementwise work, left out).
    """
    d, f, h, k, e = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads,
                     cfg.head_dim)
    return cfg.num_layers * (d * e * (2 * h + 2 * k) + 3 * d * f) + cfg.vocab_size * d


def forward_flops(cfg: ModelConfig, batch_size: int, seq_len: int) -> float:
    """FLOPs of one forward over int32[batch_size, seq_len] tokens.

    = 2 * matmul_params * B*T  (a multiply-add per weight per token)
    + 2 * 2 * L * B * pairs * H * E  (QK^T and AV over the attended query-key pairs), where
    pairs = T^2 / 2 for causal attention, or W*T - W^2/2 with a sliding window W < T.
    """
    tokens = batch_size * seq_len
    window = cfg.sliding_window
    if window is not None and window < seq_len:
        pairs = window * seq_len - window * window / 2
    else:
        pairs = seq_len * seq_len / 2
    attention = 4 * cfg.num_layers * batch_size * pairs * cfg.num_heads * cfg.head_dim
    return 2.0 * matmul_params(cfg) * tokens + attention


def step_flops(cfg: ModelConfig, batch_size: int, seq_len: int, *, base_forward: bool,
               extra_trainee_forward: bool = False, weight_grads: bool = True) -> float:
    """FLOPs of one training step on a [batch_size, seq_len] batch (padding counted).

    = forward_flops * (3 for the trainee's forward + backward, 2 without weight gradients (LoRA:
    the frozen weights get none; the adapters' own FLOPs are left out), + 1 for the frozen base
    forward when `base_forward`, + 1 for a no-grad trainee forward when `extra_trainee_forward`).
    Rematerialization's recomputed forward is not counted: this is model FLOPs, as in MFU.
    """
    passes = 2 + int(weight_grads) + int(base_forward) + int(extra_trainee_forward)
    return passes * forward_flops(cfg, batch_size, seq_len)


def peak_flops_per_device(device_kind: str, dtype: Any = "bfloat16") -> float | None:
    """Dense bf16 peak FLOP/s of one accelerator (fp16 too, on GPUs; `targets.chip_of`'s
    published figures); None for CPU or unknown."""
    dtype = jnp.dtype(dtype).name
    kind = " ".join(device_kind.lower().split())
    if dtype not in ("bfloat16", "float16") or (dtype == "float16" and kind.startswith("tpu")):
        return None
    chip = targets.chip_of(device_kind)
    return chip.peak_flops if chip else None


class Throughput:
    """Rates over the wall time since the previous `measure` (or construction, or `reset`).

    Call it once per logging interval, after the interval's results were fetched to the host
    (dispatch is asynchronous, so an unfetched step may still be running). The first interval
    includes compilation; call `reset()` after the first step to leave that out.
    """

    def __init__(self, flops_per_step: float | None = None, num_devices: int = 1,
                 peak_flops: float | None = None, *,
                 clock: Callable[[], float] = time.perf_counter):
        self.flops_per_step = flops_per_step
        self.num_devices = num_devices
        self.peak_flops = peak_flops
        self._clock = clock
        self._last = clock()

    def reset(self) -> None:
        self._last = self._clock()

    def measure(self, steps: int, tokens: int, flops: float | None = None) -> dict[str, float]:
        """Rates for `steps` steps and `tokens` tokens done since the previous call.

        flops: the FLOPs of those steps when they differ from step to step (e.g. length buckets);
        default steps * flops_per_step. Returns tokens_per_s, tokens_per_s_per_device,
        steps_per_s and, when FLOPs are known, tflops_per_s_per_device and (with a known peak)
        mfu, a fraction of peak.
        """
        now = self._clock()
        elapsed, self._last = now - self._last, now
        if elapsed <= 0:
            return {}
        rates = {"tokens_per_s": tokens / elapsed,
                 "tokens_per_s_per_device": tokens / elapsed / self.num_devices,
                 "steps_per_s": steps / elapsed}
        if flops is None and self.flops_per_step:
            flops = self.flops_per_step * steps
        if flops:
            flops_per_device = flops / elapsed / self.num_devices
            rates["tflops_per_s_per_device"] = flops_per_device / 1e12
            if self.peak_flops:
                rates["mfu"] = flops_per_device / self.peak_flops
        return rates


class LogWindow:
    """The steps since the last log line: their metrics summed on device, their tokens and
    FLOPs counted on the host, and the throughput over them (compilation left out: the first
    step of a run only starts the clock)."""

    def __init__(self, throughput: Throughput, flops: Callable[[int, int], float]):
        self.throughput, self.flops = throughput, flops
        self.total, self.steps, self.timed_steps, self.tokens, self.step_flops = None, 0, 0, 0, 0.0

    def add(self, step_metrics: Mapping[str, Any], batch_shape: tuple[int, int], *,
            first_of_run: bool, state=None) -> None:
        self.total = dict(step_metrics) if self.total is None else add(self.total, step_metrics)
        self.steps += 1
        if first_of_run:
            jax.block_until_ready(state)
            self.throughput.reset()
            return
        self.timed_steps += 1
        self.tokens += batch_shape[0] * batch_shape[1]
        self.step_flops += self.flops(*batch_shape)

    def close(self, last_step: Mapping[str, Any]) -> dict[str, float]:
        """The window's means (`window_mean`) and rates; starts the next window."""
        logged = window_mean(fetch_numbers(self.total), self.steps, fetch_numbers(last_step))
        logged.update(self.throughput.measure(self.timed_steps, self.tokens, self.step_flops))
        self.total, self.steps, self.timed_steps, self.tokens, self.step_flops = None, 0, 0, 0, 0.0
        return logged


# ----------------------------------------------------------------------------- console output


SHORT_NAMES = {"tokens_per_s": "tok/s", "tokens_per_s_per_device": "tok/s/dev",
               "steps_per_s": "step/s", "tflops_per_s_per_device": "TFLOP/s/dev"}


def format_duration(seconds: float) -> str:
    """45s, 1m05s, 2h03m, 3d04h; "?" when unknown (negative, inf or nan)."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = round(seconds)
    minutes, secs = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def format_value(value: int | float) -> str:
    """12,345 for counts and large rates; 4 significant digits otherwise (1.234, 0.81, 1e-05)."""
    if isinstance(value, int) or (math.isfinite(value) and abs(value) >= 1000):
        return f"{value:,.0f}"
    return f"{value:.4g}"


def format_log_line(step: int, total: int, metrics: Mapping[str, Any], *,
                    elapsed_s: float | None = None, start_step: int = 0) -> str:
    """`step 20/100 loss 1.234 kept 0.81 tok/s 12,345 eta 1m05s`.

    The ETA extrapolates `elapsed_s`, the time spent since `start_step` (the resumed step), to the
    remaining steps; it is left out until a step has been timed.
    """
    parts = [f"step {step}/{total}"]
    for name, value in fetch_numbers(metrics).items():
        parts.append(f"{SHORT_NAMES.get(name, name)} {format_value(value)}")
    if elapsed_s is not None and step > start_step:
        parts.append(f"eta {format_duration(elapsed_s / (step - start_step) * (total - step))}")
    return " ".join(parts)


class ProgressBar:
    """A tqdm bar on stderr with ETA, shown only when stderr is a terminal.

    In CI logs (stderr not a TTY) the bar is off, so no carriage-return lines pile up; the
    trainer's `format_log_line` lines carry the progress there. `write` prints a log line
    without breaking the bar.
    """

    def __init__(self, total: int, initial: int = 0, enabled: bool = True, *, file=None):
        from tqdm import tqdm

        file = sys.stderr if file is None else file
        self.active = enabled and bool(getattr(file, "isatty", lambda: False)())
        self._bar = (tqdm(total=total, initial=initial, file=file, dynamic_ncols=True, unit="step")
                     if self.active else None)

    def update(self, step: int, **postfix: Any) -> None:
        """Moves the bar to `step` and shows the given metrics (None values skipped)."""
        if self._bar is None:
            return
        shown = ", ".join(f"{SHORT_NAMES.get(name, name)}={format_value(value)}"
                          for name, value in fetch_numbers(postfix).items())
        self._bar.set_postfix_str(shown, refresh=False)
        self._bar.update(step - self._bar.n)

    def write(self, line: str, file=None) -> None:
        """Prints `line` (to stdout by default), clearing and redrawing the bar around it."""
        file = sys.stdout if file is None else file
        if self._bar is None:
            print(line, file=file, flush=True)
        else:
            self._bar.write(line, file=file)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
