"""Decode throughput of `sampling.generate` against the memory-bandwidth roofline.

    python benchmarks/decode.py --shape=tiny --batches=1,64                       # CPU
    python benchmarks/decode.py --shape=llama-3.2-1b --dtype=bfloat16 --batches=1,256   # GPU

Greedy decoding of `--new_tokens` tokens after `--prompt_len` random prompt tokens, no early stop.
The roofline of one decode step is the time to read every weight once plus the KV cache so far,
at the bandwidth this script measures with a large on-device copy (bytes read + written / s).
Prints one JSON line per batch size. Record results in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from dasd_jax import model, sampling
from forward import SHAPES


def measured_bandwidth(gib: float = 1.0) -> float:
    """Bytes/s of an on-device copy (read + write) of a `gib`-sized array."""
    count = int(gib * 2**30 / 4)
    source = jnp.ones((count,), jnp.float32)
    copy = jax.jit(lambda x: x + 1.0)
    copy(source).block_until_ready()
    start = time.perf_counter()
    for _ in range(5):
        out = copy(source)
    out.block_until_ready()
    return 2 * count * 4 * 5 / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--prompt_len", type=int, default=128)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--copy_gib", type=float, default=0.25)
    args = parser.parse_args()

    cfg = SHAPES[args.shape].replace(dtype=args.dtype, param_dtype=args.dtype)
    params = model.init(cfg, jax.random.key(0))
    bandwidth = measured_bandwidth(args.copy_gib)
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    settings = sampling.Settings(max_new_tokens=args.new_tokens, prompt_buckets=(args.prompt_len,))
    rng = np.random.default_rng(0)
    for batch in map(int, args.batches.split(",")):
        prompts = rng.integers(0, cfg.vocab_size, (batch, args.prompt_len)).tolist()
        sampling.generate(cfg, params, prompts, settings)  # compile and warm up
        start = time.perf_counter()
        sampling.generate(cfg, params, prompts, settings)
        seconds = time.perf_counter() - start
        per_token_kv = (2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim
                        * jnp.dtype(cfg.dtype).itemsize)
        mean_context = args.prompt_len + args.new_tokens / 2
        step_bytes = weight_bytes + batch * mean_context * per_token_kv
        roofline_step = step_bytes / bandwidth
        step_seconds = seconds / args.new_tokens
        print(json.dumps({
            "shape": args.shape, "dtype": args.dtype, "batch": batch,
            "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
            "device": jax.devices()[0].device_kind, "jax": jax.__version__,
            "seconds": round(seconds, 3), "tokens_per_s": round(batch * args.new_tokens / seconds),
            "step_ms": round(step_seconds * 1e3, 3),
            "bandwidth_gb_s": round(bandwidth / 1e9, 1),
            "roofline_step_ms": round(roofline_step * 1e3, 4),
            "roofline_fraction": round(roofline_step / step_seconds, 3),
        }))


if __name__ == "__main__":
    main()
