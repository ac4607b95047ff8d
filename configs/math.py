"""DASD on grade-school math (GSM8K): Qwen2.5-1.5B-Instruct, rule `dasd`.

Train on the rewrites of stage 1 (`python -m dasd_jax.rewrite`, which writes data.path):

    python -m dasd_jax.train --config=configs/math.py --config.workdir=runs/math

Tiny offline run (random model, generated arithmetic records, < 2 min on 2 CPU cores):

    python -m dasd_jax.train --config=configs/math.py:tiny --config.workdir=/tmp/dasd-tiny

Baselines are one flag: `:sft` (rule all on references), `:sdft` (rule all on rewrites),
`--config.selection.rule=ppl_filter|rho1|dft|random`. Memory plan without running:
`--config.dry_run=True`.
"""

from dasd_jax.config_defaults import apply_variants, base_config


def get_config(arg: str | None = None):
    config = base_config()
    config.workdir = ""
    config.model.path = "Qwen/Qwen2.5-1.5B-Instruct"
    config.model.remat_policy = "dots_no_batch"
    config.data.path = "runs/math/rewrites.jsonl"  # {prompt, reference, response, ref_logprobs}
    config.data.max_seq_len = 1024
    config.data.buckets = (256, 512, 1024)
    config.data.system_prompt = "Please reason step by step, and put your final answer after 'The answer is'."
    config.train.steps = 350  # ~3 epochs of GSM8K's 7,473 problems at batch 64
    config.train.batch_size = 64
    config.train.micro_batches = 4
    config.train.learning_rate = 1e-5
    config.train.warmup_steps = 20
    config.train.weight_decay = 0.0
    config.selection.rule = "dasd"
    config.checkpoint.every = 50
    return apply_variants(config, arg)
