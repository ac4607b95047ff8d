"""dasd_jax against transformers + torch on one HF checkpoint, side by side in one run.

    python -m dasd_jax.tools.smollm2                       # builds the default checkpoint once
    python benchmarks/vs_transformers.py --checkpoint=~/.cache/dasd_jax/SmolLM2-135M-Instruct \
        --gsm8k=../shared/data/gsm8k/test.jsonl [--out=vs_transformers.json]

Both stacks get the same weights (float32), the same prompts (GSM8K test questions through the
checkpoint's chat template) and the same threads. It measures

* teacher-forced forward: batch 8 x 256 tokens, tokens/s;
* greedy decode at each of --batches (default 1, 8, 32): --new_tokens new tokens (default 64)
  after the same prompts, no early stop; tokens/s, and how many rows are token-for-token equal
  (float32 rounding can flip a near-tie late in a sequence; the mean equal prefix is printed);
* a rewrite-like workload: --workload questions (default 256) of mixed lengths, each decoded
  until its end-of-turn token or --workload_tokens (default 256), each stack used the way it
  would be for the job: dasd_jax's `sampling.generate_all` (continuous batching over a fixed
  batch of --workload_batch rows), transformers' `generate` on padded batches of the same size;
  total wall time (it includes dasd_jax's compiles), and dasd_jax's split of it into prefills,
  decode loops and compiles, with its count of decode steps;
* the train step on a batch of 4 x 256 tokens (response = the last 3/4): dasd_jax's SFT step
  (rule `all`) and DASD step (rule `dasd`, with the frozen base forward in the step, and with
  the base signals a rewrite records, `base_confidence="cached"`), all AdamW, and a
  torch AdamW step (forward, masked cross-entropy, backward, step) on the same batch; tokens/s.

Each timing is the best of --repeats runs after a warm-up (compilation is excluded), the stacks
taking turns run by run (the workload runs once per stack). Prints a
table with the ratio dasd_jax / transformers (> 1: dasd_jax is faster) and writes the numbers
as JSON to --out. Record them in benchmarks/RESULTS.md with the date, machine and versions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from dasd_jax import config_defaults, data, hf, model, sampling, sharding, step
import step as step_benchmark  # benchmarks/step.py


def fastest(repeats: int, **runs) -> dict[str, float]:
    """{name: seconds of the fastest of `repeats` calls of run()}, after one warm-up call each.

    The runs take turns (one call of each per round), so a drift in this VM's speed, which
    reaches ±15% within minutes, hits every stack alike instead of favouring whichever ran
    in a fast spell.
    """
    for run in runs.values():
        run()
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: min(seconds) for name, seconds in times.items()}


def chat_prompts(tokenizer, questions: list[str]) -> list[list[int]]:
    settings = config_defaults.base_config().data
    return [data.prompt_tokens(q, tokenizer, settings) for q in questions]


def padded_left(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(map(len, prompts))
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, length - len(prompt):] = torch.tensor(prompt)
        mask[row, length - len(prompt):] = 1
    return ids, mask


# ----------------------------------------------------------------------------- measurements


def forward(args, cfg, params, torch_model, prompts) -> dict:
    batch, length = 8, 256
    tokens = np.asarray([(p * (length // len(p) + 1))[:length] for p in prompts[:batch]], np.int32)
    jitted = jax.jit(model.forward, static_argnums=0)
    ids = torch.from_numpy(tokens.astype(np.int64))

    def torch_forward():
        with torch.no_grad():
            return torch_model(ids).logits

    seconds = fastest(args.repeats, ours=lambda: jitted(cfg, params, tokens).block_until_ready(),
                      theirs=torch_forward)
    ours, theirs = seconds["ours"], seconds["theirs"]
    return {"work": f"teacher-forced forward {batch} x {length}", "dasd_jax": batch * length / ours,
            "transformers": batch * length / theirs, "unit": "tokens/s"}


def greedy(args, cfg, params, torch_model, tokenizer, prompts, batch: int) -> dict:
    rows = prompts[:batch]
    settings = sampling.Settings(max_new_tokens=args.new_tokens,
                                 prompt_buckets=sampling.DEFAULT_PROMPT_BUCKETS)
    decoded = sampling.generate(cfg, params, rows, settings)
    ids, mask = padded_left(rows, tokenizer.pad_token_id or 0)

    def torch_generate():
        with torch.no_grad():
            return torch_model.generate(ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                                        min_new_tokens=args.new_tokens, do_sample=False,
                                        pad_token_id=tokenizer.pad_token_id)

    seconds = fastest(args.repeats, ours=lambda: sampling.generate(cfg, params, rows, settings),
                      theirs=torch_generate)
    ours, theirs = seconds["ours"], seconds["theirs"]
    expected = torch_generate()[:, ids.shape[1]:].tolist()
    prefixes = [next((i for i, (a, b) in enumerate(zip(r.tokens, e)) if a != b), len(e))
                for r, e in zip(decoded, expected)]
    tokens = batch * args.new_tokens
    return {"work": f"greedy decode, batch {batch}, {args.new_tokens} new",
            "dasd_jax": tokens / ours,
            "transformers": tokens / theirs, "unit": "tokens/s",
            "equal_rows": f"{sum(p == args.new_tokens for p in prefixes)}/{batch}",
            "mean_equal_prefix": float(np.mean(prefixes))}


class PhaseTimer:
    """Wraps `sampling`'s device calls so one `generate_all` run splits its wall time into
    prefills (a refill's prompts into the cache), decode loops and their compiles.

    Each wrapped call blocks until its result is ready; `decode_all` already waits for every
    decode loop's `done` flags, so this adds only the waits after a refill's prefill.
    """

    PHASES = {"_prefill": "prefill", "_refill": "prefill", "_decode": "decode"}

    def __init__(self):
        self.seconds = {"prefill": 0.0, "decode": 0.0, "compile": 0.0}
        self.calls = {"prefill": 0, "decode": 0}
        self.decode_steps = 0
        self._originals = {}

    def __enter__(self):
        for name, phase in self.PHASES.items():
            self._originals[name] = original = getattr(sampling, name)
            setattr(sampling, name, self._timed(original, phase))
        return self

    def __exit__(self, *exc):
        for name, original in self._originals.items():
            setattr(sampling, name, original)

    def _timed(self, jitted, phase: str):
        def run(*args, **kwargs):
            compiled_before = jitted._cache_size()
            start = time.perf_counter()
            out = jax.block_until_ready(jitted(*args, **kwargs))
            seconds = time.perf_counter() - start
            first_of_its_shape = jitted._cache_size() > compiled_before
            self.seconds["compile" if first_of_its_shape else phase] += seconds
            if jitted is self._originals["_prefill"]:
                self.calls["prefill"] += 1
            if phase == "decode":
                self.calls["decode"] += 1
                self.decode_steps = int(out["step"])
            return out
        return run


def workload(args, cfg, params, torch_model, tokenizer, prompts) -> dict:
    questions = prompts[:args.workload]
    stops = sampling.stop_ids(cfg, tokenizer)
    settings = sampling.Settings(max_new_tokens=args.workload_tokens, eos_ids=stops,
                                 prompt_buckets=sampling.DEFAULT_PROMPT_BUCKETS)
    size = args.workload_batch
    started = time.perf_counter()
    with PhaseTimer() as phases:
        ours = sampling.generate_all(cfg, params, questions, settings, batch_size=size)
    ours_seconds = time.perf_counter() - started
    started = time.perf_counter()
    theirs_tokens = 0
    for start in range(0, len(questions), size):
        ids, mask = padded_left(questions[start:start + size], tokenizer.pad_token_id or 0)
        with torch.no_grad():
            out = torch_model.generate(ids, attention_mask=mask, do_sample=False,
                                       max_new_tokens=args.workload_tokens,
                                       eos_token_id=list(stops),
                                       pad_token_id=tokenizer.pad_token_id)
        for row in out[:, ids.shape[1]:].tolist():
            ended = next((i for i, t in enumerate(row) if t in stops), len(row) - 1)
            theirs_tokens += ended + 1
    theirs_seconds = time.perf_counter() - started
    return {"work": f"rewrite-like: {len(questions)} questions, stop at EOS, <= "
                    f"{args.workload_tokens} new, batch {size}",
            "dasd_jax": ours_seconds, "transformers": theirs_seconds, "unit": "s (lower wins)",
            "dasd_jax_tokens": sum(len(r.tokens) for r in ours),
            "transformers_tokens": theirs_tokens,
            "dasd_jax_seconds": {k: round(v, 1) for k, v in phases.seconds.items()},
            "dasd_jax_calls": phases.calls, "dasd_jax_decode_steps": phases.decode_steps}


def train_steps(args, cfg, params, torch_model, prompts) -> list[dict]:
    batch, length = 4, 256
    tokens = np.asarray([(p * (length // len(p) + 1))[:length] for p in prompts[:batch]], np.int32)
    loss_mask = np.zeros((batch, length), bool)
    loss_mask[:, length // 4:length - 1] = True
    nan, no = np.full((batch, length), np.nan, np.float32), np.zeros((batch, length), bool)
    host_batch = {"tokens": tokens, "targets": np.roll(tokens, -1, 1), "loss_mask": loss_mask,
                  "fallback": no, "structural": no, "ref_logprob": nan, "base_logprob": nan,
                  "base_top1": nan, "ref_logprob_base_choice": nan, "ref_top1": nan}
    cached_batch = step_benchmark.with_cached_base_signals(host_batch)
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    runs = {}
    for name, rule, confidence in (("all", "all", "model"), ("dasd", "dasd", "model"),
                                   ("dasd_cached", "dasd", "cached")):
        config = config_defaults.base_config()
        config.model.update(compute_dtype="float32", param_dtype="float32")
        config.train.update(steps=1000, warmup_steps=10, batch_size=batch, learning_rate=1e-5,
                            base_dtype="float32", base_confidence=confidence)
        config.selection.rule = rule
        run = step.setup(config, cfg, mesh)
        base = run.base_params(params)
        placed = run.place(cached_batch if confidence == "cached" else host_batch)
        holder = {"state": run.init_state(params)}

        def train_once(run=run, base=base, placed=placed, holder=holder):
            holder["state"], metrics = run.train_step(holder["state"], base, placed)
            jax.block_until_ready(metrics)

        runs[name] = train_once
    ids = torch.from_numpy(tokens.astype(np.int64))
    labels = torch.from_numpy(np.where(np.roll(loss_mask, 1, 1), tokens, -100).astype(np.int64))
    torch_model.train()
    optimizer = torch.optim.AdamW(torch_model.parameters(), lr=1e-5, betas=(0.9, 0.95))

    def torch_step():
        optimizer.zero_grad(set_to_none=True)
        torch_model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()

    results = fastest(args.repeats, **runs, torch=torch_step)
    theirs = results["torch"]
    torch_model.eval()
    size = batch * length
    return [{"work": f"train step SFT {batch} x {length}, AdamW", "dasd_jax": size / results["all"],
             "transformers": size / theirs, "unit": "tokens/s"},
            {"work": f"train step DASD {batch} x {length} (base forward in the step)",
             "dasd_jax": size / results["dasd"], "transformers": size / theirs, "unit": "tokens/s",
             "dasd_over_sft_time": results["dasd"] / results["all"]},
            {"work": f"train step DASD {batch} x {length} (base signals cached by the rewrite)",
             "dasd_jax": size / results["dasd_cached"], "transformers": size / theirs,
             "unit": "tokens/s", "dasd_over_sft_time": results["dasd_cached"] / results["all"]}]


def ratio(row: dict) -> float:
    """dasd_jax over transformers, > 1 when dasd_jax is faster."""
    if row["unit"].startswith("s"):
        return row["transformers"] / row["dasd_jax"]
    return row["dasd_jax"] / row["transformers"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="~/.cache/dasd_jax/SmolLM2-135M-Instruct")
    parser.add_argument("--gsm8k", default=str(Path(__file__).resolve().parents[2] / "shared" /
                                               "data" / "gsm8k" / "test.jsonl"))
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--workload", type=int, default=256)
    parser.add_argument("--workload_tokens", type=int, default=256)
    parser.add_argument("--workload_batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip", default="", help="comma-separated: forward,decode,workload,train")
    parser.add_argument("--out", default="vs_transformers.json")
    args = parser.parse_args()
    checkpoint = str(Path(args.checkpoint).expanduser())
    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    cfg, params = hf.load(checkpoint, dtype=jnp.float32)
    tokenizer = hf.load_tokenizer(checkpoint, cfg)
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(
        checkpoint, dtype=torch.float32).eval()
    questions = [json.loads(line)["question"] for line in
                 Path(args.gsm8k).expanduser().read_text().splitlines() if line.strip()]
    prompts = chat_prompts(tokenizer, questions[:max(args.workload, 32)])
    skip = set(filter(None, args.skip.split(",")))
    rows = []
    if "forward" not in skip:
        rows.append(forward(args, cfg, params, torch_model, prompts))
    if "decode" not in skip:
        rows += [greedy(args, cfg, params, torch_model, tokenizer, prompts, int(b))
                 for b in args.batches.split(",")]
    if "workload" not in skip:
        rows.append(workload(args, cfg, params, torch_model, tokenizer, prompts))
    if "train" not in skip:
        rows += train_steps(args, cfg, params, torch_model, prompts)
    report = {"date": time.strftime("%Y-%m-%d"), "machine": f"{threads} CPU threads, "
              f"{platform.processor() or platform.machine()}", "jax": jax.__version__,
              "torch": torch.__version__, "transformers": transformers.__version__,
              "checkpoint": checkpoint, "rows": rows}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print("| work | dasd_jax | transformers | ratio (> 1: dasd_jax faster) |")
    print("|---|---|---|---|")
    for row in rows:
        extra = "".join(f", {k} {v}" for k, v in row.items()
                        if k in ("equal_rows", "mean_equal_prefix", "dasd_over_sft_time",
                                 "dasd_jax_seconds", "dasd_jax_calls", "dasd_jax_decode_steps"))
        print(f"| {row['work']}{extra} | {row['dasd_jax']:,.1f} | {row['transformers']:,.1f} "
              f"{row['unit']} | {ratio(row):.2f} |")


if __name__ == "__main__":
    main()
