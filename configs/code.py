"""DASD on Python code (MBPP): Qwen2.5-Coder-1.5B-Instruct, rule `dasd`.

    python -m dasd_jax.rewrite --config=configs/code.py --config.workdir=runs/code
    python -m dasd_jax.train --config=configs/code.py --config.workdir=runs/code

Offline, with a local MBPP: `--config.rewrite.input=/path/to/mbpp.jsonl`. Variants as in
configs/math.py (`:tiny`, `:sft`, `:sdft`).
"""

from dasd_jax.config_defaults import apply_variants, base_config


def get_config(arg: str | None = None):
    config = base_config()
    config.model.path = "Qwen/Qwen2.5-Coder-1.5B-Instruct"
    config.model.remat_policy = "dots_no_batch"
    config.rewrite.input = "hf:google-research-datasets/mbpp:full"
    config.rewrite.fields.update(prompt="text", reference="code")
    config.rewrite.task = "code"
    config.rewrite.max_new_tokens = 768
    config.data.max_seq_len = 1024
    config.data.buckets = (256, 512, 1024)
    config.train.steps = 200
    config.train.batch_size = 32
    config.train.micro_batches = 2
    config.train.learning_rate = 1e-5
    config.train.warmup_steps = 10
    config.selection.rule = "dasd"
    config.checkpoint.every = 50
    return apply_variants(config, arg)
