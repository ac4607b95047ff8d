"""DASD on commonsense question answering (CommonsenseQA): Llama-3.2-1B-Instruct, rule `dasd`.

    python -m dasd_jax.train --config=configs/commonsense.py --config.workdir=runs/commonsense
    python -m dasd_jax.train --config=configs/commonsense.py:tiny --config.workdir=/tmp/dasd-tiny-cs

Variants as in configs/math.py (`:tiny`, `:sft`, `:sdft`).
"""

from dasd_jax.config_defaults import apply_variants, base_config


def get_config(arg: str | None = None):
    config = base_config()
    config.model.path = "meta-llama/Llama-3.2-1B-Instruct"
    config.model.remat_policy = "dots_no_batch"
    config.data.path = "runs/commonsense/rewrites.jsonl"
    config.data.max_seq_len = 512
    config.data.buckets = (128, 256, 512)
    config.train.steps = 300
    config.train.batch_size = 64
    config.train.learning_rate = 1e-5
    config.train.warmup_steps = 20
    config.selection.rule = "dasd"
    config.checkpoint.every = 50
    return apply_variants(config, arg)
