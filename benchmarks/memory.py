"""Resident memory of the real checkpoint's stages, repeated in one process.

    python benchmarks/memory.py                  # train x3, rewrite x3, evaluate x3 (~25 min)
    python benchmarks/memory.py --repeats=2 --stages=train

SmolLM2-135M-Instruct with `configs/math.py:smollm2` as configured (batch 8 in 2 micro-batches,
sequences up to 768 tokens): each training runs 2 DASD steps on GSM8K references (the first
exports its HF checkpoint), each rewrite co-decodes 8 GSM8K problems, each evaluation scores 8
GSM8K test problems. A thread samples the process's resident set (VmRSS) every 20 ms; the table
gives each stage's peak and the resident memory after it (after garbage collection), and the
growth from one repeat of a stage to the next, next to the fit check's compiled peak of the train
step (`--config.dry_run=True` on this machine). Prints Markdown for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO))

from configs import math as math_config
from dasd_jax import evaluate, fit_check, rewrite, rewrite_file, run_config, train
from dasd_jax.pipeline import stage_config

MIB = 2 ** 20


def resident_bytes() -> int:
    """This process's resident set size (VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


class PeakSampler:
    """The largest resident set seen between `start()` and `stop()`, sampled every `period` s."""

    def __init__(self, period: float = 0.02):
        self.period, self.peak, self._running = period, 0, False

    def _run(self) -> None:
        while self._running:
            self.peak = max(self.peak, resident_bytes())
            time.sleep(self.period)

    def start(self) -> None:
        self.peak, self._running = resident_bytes(), True
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> int:
        self._running = False
        self._thread.join()
        return max(self.peak, resident_bytes())


def base_config(checkpoint: str):
    config = math_config.get_config("smollm2")
    config.model.path = str(Path(checkpoint).expanduser())
    config.metrics.update(tensorboard=False, progress_bar=False)
    config.data.eval_path = ""
    config.eval.paths.gsm8k = str(DATA / "gsm8k" / "test.jsonl")
    config.checkpoint.update(every=10_000, async_save=False)
    return config


def stage_runs(config, workdir: Path, repeat: int) -> dict:
    """name -> a callable running that stage once (repeat `repeat`)."""
    def training():
        run_dir = workdir / f"train{repeat}"
        shutil.rmtree(run_dir, ignore_errors=True)
        data = dict(path=str(DATA / "gsm8k" / "train.jsonl"), target="reference")
        stage = stage_config(config, run_dir, data=data,
                             train=dict(steps=2, warmup_steps=1, log_every=1),
                             checkpoint=dict(export=repeat == 0))
        stage.data.fields.update(prompt="question", reference="answer")
        train.train(stage)

    def rewriting():
        output = workdir / f"rewrites{repeat}.jsonl"
        for path in (output, rewrite_file.meta_path(output), rewrite_file.summary_path(output)):
            path.unlink(missing_ok=True)
        rewrite.rewrite(stage_config(config, workdir, rewrite=dict(
            input=str(DATA / "gsm8k" / "train.jsonl"), limit=8, output=str(output))))

    def evaluating():
        evaluate.evaluate(stage_config(config, workdir, eval=dict(
            tasks="gsm8k", baseline="", checkpoint="base", limit=8,
            output=str(workdir / f"eval{repeat}"))))

    return {"train": training, "rewrite": rewriting, "evaluate": evaluating}


def compiled_train_peak(config) -> float:
    """The fit check's compiled peak of the train step on this machine, in MiB."""
    checked = config.copy_and_resolve_references()
    checked.dry_run = True
    report = fit_check.check(run_config.resolve(checked))
    return report["peak_gib_per_device"] * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default="~/.cache/dasd_jax/SmolLM2-135M-Instruct")
    parser.add_argument("--workdir", default="/tmp/dasd_jax_memory")
    parser.add_argument("--stages", default="train,rewrite,evaluate")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="also write the rows as JSON here")
    args = parser.parse_args()
    config = base_config(args.checkpoint)
    workdir = Path(args.workdir)
    rows = []
    print(f"resident at start: {resident_bytes() / MIB:.0f} MiB", flush=True)
    for name in args.stages.split(","):
        for repeat in range(args.repeats):
            sampler = PeakSampler()
            sampler.start()
            started = time.perf_counter()
            stage_runs(config, workdir, repeat)[name]()
            peak = sampler.stop()
            gc.collect()
            rows.append({"stage": name, "repeat": repeat + 1, "peak_mib": peak / MIB,
                         "after_mib": resident_bytes() / MIB,
                         "seconds": time.perf_counter() - started})
            print(json.dumps(rows[-1]), flush=True)
    compiled = compiled_train_peak(config) if "train" in args.stages else None
    print("\n| stage | repeat | peak resident | resident after | growth vs the repeat before |"
          " seconds |\n|---|---|---|---|---|---|")
    for index, row in enumerate(rows):
        before = rows[index - 1] if index and rows[index - 1]["stage"] == row["stage"] else None
        growth = f"{row['after_mib'] - before['after_mib']:+.0f} MiB" if before else ""
        print(f"| {row['stage']} | {row['repeat']} | {row['peak_mib']:.0f} MiB | "
              f"{row['after_mib']:.0f} MiB | {growth} | {row['seconds']:.0f} |")
    if compiled is not None:
        print(f"\nThe fit check's compiled peak of the train step: {compiled:.0f} MiB")
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, "compiled_train_peak_mib": compiled,
                                              "pid": os.getpid()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
