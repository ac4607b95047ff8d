"""Where a train step's time goes: one traced step, its XLA ops summed by kind and by name.

    python benchmarks/profile_step.py                                   # SmolLM2, SFT, 4 x 256
    python benchmarks/profile_step.py --rule=dasd --remat_policy=full --loss_chunk=64
    python benchmarks/profile_step.py --checkpoint=path/to/hf/dir --batch=8 --seq_len=512

Runs the real `step.setup(...).train_step` (float32, AdamW) with a real checkpoint's weights
on random tokens, times --steps steps after a warm-up, then traces one more
with `jax.profiler` and prints two tables from the trace: time per kind of op (an XLA fusion's
name without its number: `ynn_fusion` = a matrix product, `copy_bitcast_fusion` = a fused
copy or transpose, `bitcast_dynamic-update-slice_fusion` = a write into a scanned stack...)
and the --top slowest ops with their output shape and the source op they came from.

On a CPU the ops of a step overlap on the thread pool, so the per-op sums add up to more than
the step's wall time; read them as shares, next to the timed step.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from dasd_jax import config_defaults, hf, model, sharding, step
import step as step_benchmark  # benchmarks/step.py


def trace_events(trace_dir: str) -> list[dict]:
    """The complete ('X') events of the Perfetto trace that jax.profiler wrote under trace_dir."""
    path = sorted(Path(trace_dir).glob("plugins/profile/*/perfetto_trace.json.gz"))[-1]
    trace = json.load(gzip.open(path))
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    return [e for e in events if e.get("ph") == "X"]


def op_descriptions(hlo_text: str) -> dict[str, tuple[str, str]]:
    """{instruction name: (output shape, the tail of its source op_name)} of compiled HLO."""
    found = {}
    for match in re.finditer(r"^\s*(?:ROOT )?%(\S+) = (\S+) .*$", hlo_text, re.M):
        source = re.search(r'op_name="([^"]+)"', match.group(0))
        found[match.group(1)] = (match.group(2), source.group(1)[-60:] if source else "")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="~/.cache/dasd_jax/SmolLM2-135M-Instruct")
    parser.add_argument("--rule", default="all", help="selection rule: all (SFT), dasd, ...")
    parser.add_argument("--base_confidence", default="model", choices=("model", "cached"))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--remat_policy", default="none", choices=model.REMAT_POLICIES)
    parser.add_argument("--loss_chunk", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args()

    cfg, params = hf.load(str(Path(args.checkpoint).expanduser()), dtype=jnp.float32)
    config = config_defaults.base_config()
    config.model.update(compute_dtype="float32", param_dtype="float32",
                        remat_policy=args.remat_policy)
    config.train.update(steps=1000, warmup_steps=10, batch_size=args.batch, learning_rate=1e-5,
                        base_dtype="float32", loss_chunk=args.loss_chunk,
                        base_confidence=args.base_confidence)
    config.selection.rule = args.rule
    run = step.setup(config, cfg, sharding.make_mesh((1, 1, 1), jax.devices()[:1]))
    base = run.base_params(params)
    batch = step_benchmark.make_batch(cfg, args.batch, args.seq_len)
    if args.base_confidence == "cached":
        batch = step_benchmark.with_cached_base_signals(batch)
    batch = run.place(batch)
    state = run.init_state(params)
    del params
    hlo = run.train_step.lower(state, base, batch).compile().as_text()

    state, metrics = run.train_step(state, base, batch)
    jax.block_until_ready(metrics)
    seconds = []
    for _ in range(args.steps):
        start = time.perf_counter()
        state, metrics = run.train_step(state, base, batch)
        jax.block_until_ready(metrics)
        seconds.append(time.perf_counter() - start)
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
        state, metrics = run.train_step(state, base, batch)
        jax.block_until_ready(metrics)
        jax.profiler.stop_trace()
        events = trace_events(trace_dir)

    by_name, calls = collections.Counter(), collections.Counter()
    for event in events:
        if not event["name"].startswith(("$", "ThunkExecutor", "SlinkyThreadPool")):
            by_name[event["name"]] += event.get("dur", 0) / 1e3
            calls[event["name"]] += 1
    by_kind = collections.Counter()
    for name, ms in by_name.items():
        by_kind[re.sub(r"[.\d]+$", "", name)] += ms
    total = sum(by_kind.values())
    tokens = args.batch * args.seq_len
    print(f"{vars(args)}\nstep: best {min(seconds) * 1e3:.0f} ms of {args.steps} "
          f"({tokens / min(seconds):.0f} tokens/s); traced ops sum to {total:.0f} ms\n")
    print("| kind of op | ms | share |\n|---|---|---|")
    for kind, ms in by_kind.most_common(12):
        print(f"| {kind} | {ms:.0f} | {ms / total:.1%} |")
    described = op_descriptions(hlo)
    print("\n| op | calls | ms | output | from |\n|---|---|---|---|---|")
    for name, ms in by_name.most_common(args.top):
        shape, source = described.get(name, ("", ""))
        print(f"| {name} | {calls[name]} | {ms:.0f} | {shape} | {source} |")


if __name__ == "__main__":
    main()
