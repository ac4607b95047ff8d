"""The README's memory table, from the TPU and GPU compilers themselves (no accelerator needed).

    python benchmarks/fit_table.py                       # every row; resumes from --out
    python benchmarks/fit_table.py --models=llama-3.2-1b --targets=v5e:2x4 --methods=dasd

Each row is one fit check (`dasd_jax/fit_check.py`), the same as the command it prints:

    python -m dasd_jax.train --config=configs/math.py --config.model.path=benchmarks/shapes/MODEL \
        --config.dry_run=True --config.compile_for=TARGET --config.train.batch_size=DEVICES \
        --config.train.micro_batches=1 --config.data.buckets="(2048,)" \
        --config.data.max_seq_len=2048 [--config.selection.rule=all --config.data.target=reference]
        [--config.lora.rank=16]

configs/math.py's recipe at 2048 tokens, one sequence per device: float32 params and AdamW,
bf16 compute and frozen bf16 base, remat `dots_no_batch`, mesh (1, devices, 1) (FSDP over every
device); its rewrite (co-decoding, 32 examples, 512 new tokens, prompts up to 1024 tokens: at
2048 + 2048 tokens libtpu 0.0.42.1 crashes compiling the 32-row scoring pass, RESULTS.md) and
evaluation (32 examples) are compiled too. Each row runs in a process of its own (a compiler
crash is recorded as such) and is appended to --out (JSON lines) as it finishes, so an
interrupted run resumes; `--table` prints the markdown table of what --out holds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from configs import math as math_config
from dasd_jax import fit_check, run_config, targets

MODELS = ("llama-3.2-1b", "llama-3.1-8b", "qwen2.5-7b")
TARGETS = ("v5e:2x4", "v5e:4x4", "v5p:2x2x2", "v6e:2x4", "h100x8", "h200x8")
METHODS = {  # name -> the flags that make it
    "dasd": (),
    "sft": ("--config.selection.rule=all", "--config.data.target=reference"),
    "dasd_lora16": ("--config.lora.rank=16",),
}


def flags(model: str, target: str, method: str, devices: int) -> list[str]:
    return [f"--config.model.path=benchmarks/shapes/{model}", "--config.dry_run=True",
            f"--config.compile_for={target}", f"--config.train.batch_size={devices}",
            "--config.train.micro_batches=1", '--config.data.buckets="(2048,)"',
            "--config.data.max_seq_len=2048", '--config.rewrite.prompt_buckets="(256,512,1024)"',
            *METHODS[method]]


def configure(model: str, target: str, method: str, devices: int):
    config = math_config.get_config()
    config.model.path = str(ROOT / "benchmarks" / "shapes" / model)
    config.update(dry_run=True, compile_for=target)
    config.train.update(batch_size=devices, micro_batches=1)
    config.data.update(buckets=(2048,), max_seq_len=2048)
    config.rewrite.prompt_buckets = (256, 512, 1024)
    if method == "sft":
        config.selection.rule, config.data.target = "all", "reference"
    if method == "dasd_lora16":
        config.lora.rank = 16
    return run_config.resolve(config)


def measure(model: str, target: str, method: str, train_only: bool = False) -> dict:
    """One row. train_only: the train step alone (the rewrite's and evaluation's programs do
    not depend on the method; the row of the first method of the same model and target has
    them)."""
    devices = len(targets.resolve(target).devices)
    started = time.perf_counter()
    try:
        report = fit_check.check(configure(model, target, method, devices),
                                 parts=("train",) if train_only else fit_check.PIPELINE)
    except fit_check.DoesNotFit as error:
        report = dict(error.report, verdict=str(error))
    programs = report["programs"]
    decoding = [p for p in programs if p["stage"] != "train"] or [None]
    return {
        "model": model, "target": target, "method": method, "fits": report["fits"],
        "verdict": report.get("verdict", "fits"), "params": report["params"],
        "devices": devices, "usable_gib": report["usable_gib_per_device"],
        "weights_gib": report["weights_gib"], "train_step": programs[0],
        "largest_decoding": max(decoding, key=lambda p: p["peak_gib"] if p else 0),
        "model_flops_per_device": report["model_flops_per_device"],
        "compiler_flops_per_device": report["compiler_flops_per_device"],
        "compiler_bytes_per_device": report["compiler_bytes_per_device"],
        "step_seconds_lower_bound": report.get("step_seconds_lower_bound"),
        "compile_s": time.perf_counter() - started,
        "command": "python -m dasd_jax.train --config=configs/math.py " + " ".join(
            flags(model, target, method, devices)),
    }


def measure_apart(model: str, target: str, method: str, train_only: bool) -> dict:
    """`measure` in a process of its own: a row whose compile crashes the process is recorded
    with the crash and the program it was compiling."""
    row = f"{model},{target},{method}" + (",train_only" if train_only else "")
    result = subprocess.run([sys.executable, __file__, "--row", row], capture_output=True,
                            text=True, cwd=ROOT)
    if result.returncode == 0:
        return json.loads(result.stdout.strip().splitlines()[-1])
    compiled = [line for line in result.stdout.splitlines() if line.startswith(" " * 15)]
    return {"model": model, "target": target, "method": method, "fits": None,
            "verdict": f"the compiler crashed (exit {result.returncode}) after "
                       f"{len(compiled)} programs: {result.stderr.strip().splitlines()[:3]}",
            "command": "python -m dasd_jax.train --config=configs/math.py " + " ".join(
                flags(model, target, method, 0))}


def table(rows: list[dict]) -> str:
    """The markdown table of the README: per row the train step's memory per device, the
    largest decoding program's, the verdict and the step-time estimate; ordered by model,
    target and method as MODELS, TARGETS and METHODS list them."""
    order = {name: i for i, name in enumerate((*MODELS, *TARGETS, *METHODS))}
    rows = sorted(rows, key=lambda r: tuple(order.get(r[k], len(order))
                                            for k in ("model", "target", "method")))
    out = ["| model | target | method | train step peak / device | args + temps | "
           "largest rewrite / eval program | usable / device | fits | step time >= (est.) |",
           "|---|---|---|---|---|---|---|---|---|"]
    decoding = {(r["model"], r["target"]): r["largest_decoding"] for r in rows
                if r.get("largest_decoding")}
    for row in rows:
        if row["fits"] is None:
            out.append(f"| {row['model']} | {row['target']} | {row['method']} | "
                       f"{row['verdict'][:60]} | | | | | |")
            continue
        step_, decode = row["train_step"], decoding[row["model"], row["target"]]
        fits = row["fits"] and not decode["refused"] and decode["peak_gib"] <= row["usable_gib"]
        peak = (f"refused ({step_['peak_gib']:.1f} GiB+)" if step_["refused"]
                else f"{step_['peak_gib']:.1f} GiB")
        parts = ("—" if step_["refused"]
                 else f"{step_['argument_gib']:.1f} + {step_['temp_gib']:.1f} GiB")
        bound = row["step_seconds_lower_bound"]
        estimate = f"{bound['seconds']:.2f} s" if bound and not step_["refused"] else ""
        out.append(
            f"| {row['model']} | {row['target']} | {row['method']} | {peak} | "
            f"{parts} | "
            f"{decode['peak_gib']:.1f} GiB ({decode['stage']}) | {row['usable_gib']:.1f} GiB | "
            f"{'yes' if fits else '**no**'} | {estimate} |")
    commands = [f"{row['command']}  # {row['model']} {row['target']} {row['method']}"
                for row in rows]
    return "\n".join(out + ["", "The command of each row, in order:", "", "```bash",
                             *commands, "```"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "fit_table.jsonl"))
    parser.add_argument("--table", action="store_true", help="print the table of --out, exit")
    parser.add_argument("--row", help="MODEL,TARGET,METHOD: measure one row, print it as JSON")
    args = parser.parse_args()
    if args.row:
        model, target, method, *train_only = args.row.split(",")
        print(json.dumps(measure(model, target, method, bool(train_only))))
        return
    out = Path(args.out)
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    if args.table:
        print(table(rows))
        return
    done = {(r["model"], r["target"], r["method"]) for r in rows}
    for model in args.models.split(","):
        for target in args.targets.split(","):
            for method in args.methods.split(","):
                if (model, target, method) in done:
                    continue
                decoded = any(r["model"] == model and r["target"] == target
                              and r.get("largest_decoding") for r in rows)
                row = measure_apart(model, target, method, train_only=decoded)
                rows.append(row)
                with out.open("a") as file:
                    file.write(json.dumps(row) + "\n")
                print(f"{model} {target} {method}: {row['verdict']}", flush=True)


if __name__ == "__main__":
    main()
