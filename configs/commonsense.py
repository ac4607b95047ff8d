"""DASD on commonsense question answering (CommonsenseQA): Llama-3.2-1B-Instruct, rule `dasd`.

    python -m dasd_jax.rewrite --config=configs/commonsense.py --config.workdir=runs/commonsense
    python -m dasd_jax.train --config=configs/commonsense.py --config.workdir=runs/commonsense

The input records need the question with its lettered options as `prompt` and a reference that
ends "The answer is (X)." (map the fields with --config.rewrite.fields.*). Variants as in
configs/math.py (`:tiny`, `:sft`, `:sdft`).
"""

from dasd_jax.config_defaults import apply_variants, base_config


def get_config(arg: str | None = None):
    config = base_config()
    config.model.path = "meta-llama/Llama-3.2-1B-Instruct"
    config.model.remat_policy = "dots_no_batch"
    config.rewrite.input = "{workdir}/commonsenseqa_train.jsonl"
    config.rewrite.task = "commonsense"
    config.rewrite.max_new_tokens = 256
    config.data.max_seq_len = 512
    config.data.buckets = (128, 256, 512)
    config.train.steps = 300
    config.train.batch_size = 64
    config.train.learning_rate = 1e-5
    config.train.warmup_steps = 20
    config.selection.rule = "dasd"
    config.checkpoint.every = 50
    return apply_variants(config, arg)
