"""Forward-pass throughput of the decoder on random params.

    python benchmarks/forward.py --shape=tiny                      # CPU
    python benchmarks/forward.py --shape=llama-3.2-1b --seq_len=2048 --batch=8 --dtype=bfloat16

Prints one JSON line: tokens/s over `--steps` timed calls after one compile-and-warm-up call.
Record results in benchmarks/RESULTS.md with the date, device, jax version and command.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from dasd_jax import model

SHAPES = {
    "tiny": model.ModelConfig(
        model_type="llama", vocab_size=512, hidden_size=128, intermediate_size=384, num_layers=4,
        num_heads=4, num_kv_heads=2, head_dim=32, rope_theta=500000.0, tie_word_embeddings=True),
    "llama-3.2-1b": model.ModelConfig(
        model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
        num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64, rope_theta=500000.0,
        rope_type="llama3", rope_factor=32.0, rope_low_freq_factor=1.0,
        rope_high_freq_factor=4.0, rope_original_max_position=8192, tie_word_embeddings=True,
        max_position_embeddings=131072),
    "smollm2-135m": model.ModelConfig(  # SmolLM2-135M-Instruct's config.json
        model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
        num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=100000.0,
        tie_word_embeddings=True, max_position_embeddings=8192),
}


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--dtype", default="float32", help="compute and param dtype")
    parser.add_argument("--attention_impl", default="auto", choices=model.ATTENTION_IMPLS)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()

    cfg = SHAPES[args.shape].replace(dtype=args.dtype, param_dtype=args.dtype,
                                     attention_impl=args.attention_impl)
    params = model.init(cfg, jax.random.key(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(
        0, cfg.vocab_size, (args.batch, args.seq_len)), jnp.int32)
    forward = jax.jit(model.forward, static_argnums=0)

    start = time.perf_counter()
    forward(cfg, params, tokens).block_until_ready()
    compile_seconds = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(args.steps):
        logits = forward(cfg, params, tokens)
    logits.block_until_ready()
    seconds = (time.perf_counter() - start) / args.steps

    tokens_per_step = args.batch * args.seq_len
    flops = 2 * cfg.num_params * tokens_per_step + (  # matmuls + causal attention scores/values
        2 * cfg.num_layers * args.batch * args.seq_len ** 2 * cfg.num_heads * cfg.head_dim)
    result = {
        "shape": args.shape, "params": cfg.num_params, "batch": args.batch,
        "seq_len": args.seq_len, "dtype": args.dtype,
        "attention_impl": model._attention_implementation(cfg),
        "device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
        "jax": jax.__version__, "compile_s": round(compile_seconds, 2),
        "step_ms": round(seconds * 1e3, 2), "tokens_per_s": round(tokens_per_step / seconds),
        "tflops_per_s": round(flops / seconds / 1e12, 3),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
