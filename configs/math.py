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
"""

from dasd_jax.config_defaults import apply_variants, base_config


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
    return apply_variants(config, arg)
