"""SFT (`all`) and DASD train steps timed side by side in one run.

    python benchmarks/step.py --shape=tiny                                        # CPU
    python benchmarks/step.py --shape=llama-3.2-1b --seq_len=2048 --batch=8 \\
        --compute_dtype=bfloat16 --remat_policy=dots_no_batch                      # GPU
    ... --lora_rank=16                                                             # LoRA

Both steps are the real `step.setup(...).train_step` (random params, random tokens with a 25%
prompt); `dasd` adds the frozen base forward. Prints one JSON line per rule and the DASD/SFT
time ratio. Record results in benchmarks/RESULTS.md with the date, device, jax version and command.
"""

from __future__ import annotations

import argparse
import json
import time

import jax

from dasd_jax import config_defaults, metrics, model, run_config, sharding, signals, step
from forward import SHAPES


def make_batch(cfg: model.ModelConfig, batch: int, seq_len: int) -> dict:
    """Random tokens with a 25% prompt; no recorded signal (`signals.example_batch`)."""
    return signals.example_batch(batch, seq_len, vocab_size=cfg.vocab_size)


def with_cached_base_signals(batch: dict) -> dict:
    """`batch` with finite base signals in place of NaN, as a rewrite records them for
    `train.base_confidence="cached"` (any finite values time the same)."""
    shape = batch["tokens"].shape
    return {**batch, **signals.example_batch(*shape, base_logprob=-1.0, base_top1=0.5)}


def time_rule(rule: str, args, cfg: model.ModelConfig, params, mesh) -> dict:
    config = config_defaults.base_config()
    config.model.update(param_dtype=args.param_dtype, compute_dtype=args.compute_dtype,
                        remat_policy=args.remat_policy, attention_impl=args.attention_impl)
    config.train.update(steps=1000, warmup_steps=10, batch_size=args.batch,
                        micro_batches=args.micro_batches, loss_chunk=args.loss_chunk,
                        base_dtype=args.base_dtype)
    config.selection.rule = rule
    config.lora.rank = args.lora_rank
    run = step.setup(run_config.resolve(config), cfg, mesh)
    state, base = run.init_state(params), run.base_params(params)
    train_step = run.train_step
    batch = run.place(make_batch(cfg, args.batch, args.seq_len))

    start = time.perf_counter()
    state, out = train_step(state, base, batch)
    jax.block_until_ready(out)
    compile_seconds = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(args.steps):
        state, out = train_step(state, base, batch)
    jax.block_until_ready(out)
    seconds = (time.perf_counter() - start) / args.steps

    flops = run.flops(args.batch, args.seq_len)  # the trainer's own count, MFU alike
    peak = metrics.peak_flops_per_device(jax.devices()[0].device_kind, run.trainee.dtype)
    tokens = args.batch * args.seq_len
    return {
        "rule": rule, "shape": args.shape, "params": cfg.num_params, "batch": args.batch,
        "seq_len": args.seq_len, "compute_dtype": args.compute_dtype,
        "remat_policy": args.remat_policy, "lora_rank": args.lora_rank,
        "device": jax.devices()[0].device_kind,
        "devices": jax.device_count(), "jax": jax.__version__,
        "compile_s": round(compile_seconds, 2), "step_ms": round(seconds * 1e3, 2),
        "tokens_per_s": round(tokens / seconds),
        "tflops_per_s_per_device": round(flops / seconds / 1e12 / jax.device_count(), 3),
        "mfu": None if peak is None else round(flops / seconds / jax.device_count() / peak, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--param_dtype", default="float32")
    parser.add_argument("--compute_dtype", default="float32")
    parser.add_argument("--base_dtype", default="bfloat16")
    parser.add_argument("--remat_policy", default="none", choices=model.REMAT_POLICIES)
    parser.add_argument("--attention_impl", default="auto", choices=model.ATTENTION_IMPLS)
    parser.add_argument("--micro_batches", type=int, default=1)
    parser.add_argument("--loss_chunk", type=int, default=512)
    parser.add_argument("--lora_rank", type=int, default=0, help="0 = full fine-tuning")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()

    mesh = sharding.make_mesh((1, -1, 1))
    cfg = SHAPES[args.shape].replace(param_dtype=args.param_dtype)
    init = jax.jit(model.init, static_argnums=0,
                   out_shardings=sharding.param_shardings(cfg, mesh))
    params = init(cfg, jax.random.key(0))
    results = {rule: time_rule(rule, args, cfg, params, mesh) for rule in ("all", "dasd")}
    for result in results.values():
        print(json.dumps(result))
    print(json.dumps({"dasd_over_sft_time": round(
        results["dasd"]["step_ms"] / results["all"]["step_ms"], 3)}))


if __name__ == "__main__":
    main()
