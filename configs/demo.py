"""The embedded DASD demo: a generated arithmetic world, the whole pipeline, offline, one table.

    python -m dasd_jax.demo --config=configs/demo.py           # ~10 min on 2 CPU cores (make demo)
    python -m dasd_jax.demo --config=configs/demo.py:small     # every stage at a test's size
    python -m dasd_jax.demo --config=configs/demo.py:gpu       # a 27M-parameter base, one GPU

It pretrains a 0.69M-parameter, 2-layer base in the world of `dasd_jax/tasks/synthetic.py`
(cached in `demo.cache_dir`), rewrites 1,024 hard fine-tuning problems in sdft and dasd modes,
fine-tunes the base nine ways (`dasd_jax.demo.METHODS`), evaluates each on 100 held-out hard and
easy problems, analyzes the training sets and prints the table. Over several seeds, with the
extra ablations and a verdict per claim: `python benchmarks/demo_claims.py`.
"""

import ml_collections

from dasd_jax.config_defaults import base_config, tiny

VARIANTS = ("small", "gpu")


def get_config(arg: str | None = None):
    config = base_config()
    tiny(config)
    config.workdir = "/tmp/dasd_jax_demo"
    config.model.random.update(hidden_size=128, intermediate_size=352, num_layers=2, num_heads=4,
                               num_kv_heads=4, head_dim=32)
    config.model.random_tokenizer = "synthetic"
    config.data.max_seq_len = 96  # an answer-aware prompt + solution is at most ~91 tokens
    config.data.buckets = (32, 64, 96)
    config.data.group_by_length = 8  # plain and answer-aware examples differ 3x in length
    config.train.batch_size = 16
    config.rewrite.update(batch_size=64, max_new_tokens=32, prompt_buckets=(32, 96))
    # A 3-step solution in the references' English runs past 32 tokens: a model fine-tuned on
    # them must not be cut off (it would score as unfinished and wrong).
    config.eval.update(batch_size=50, prompt_buckets=(32, 96), max_new_tokens=96)
    config.checkpoint.update(every=1000, max_to_keep=1)
    config.selection.update(tau_quantile=None, tau=0.1, tau_min=0.01)  # the real DASD rule

    config.demo = ml_collections.ConfigDict()
    config.demo.cache_dir = "~/.cache/dasd_jax/demo"  # pretrained bases, keyed by their settings
    config.demo.pretrain_examples = 64000
    config.demo.pretrain_steps = 4000
    config.demo.pretrain_batch_size = 16
    config.demo.pretrain_learning_rate = 5e-3
    config.demo.finetune_examples = 1024
    config.demo.finetune_steps = 600
    config.demo.finetune_learning_rate = 1e-3
    config.demo.eval_examples = 100
    config.demo.methods = ""  # comma-separated names of dasd_jax.demo.METHODS; empty: all of them

    if arg == "small":  # every stage runs, nothing is learned
        config.demo.update(pretrain_examples=256, pretrain_steps=10, finetune_examples=16,
                           finetune_steps=4, eval_examples=4)
        config.rewrite.update(batch_size=8, max_new_tokens=8)
        config.eval.update(batch_size=4, max_new_tokens=8)
        config.train.batch_size = 8
    elif arg == "gpu":  # 8 layers d512 (27M), 4x the pretraining tokens, 2x / 5x the problems
        config.workdir = "/tmp/dasd_jax_demo_gpu"
        config.model.random.update(hidden_size=512, intermediate_size=1408, num_layers=8,
                                   num_heads=8, num_kv_heads=8, head_dim=64)
        config.model.compute_dtype = "bfloat16"
        config.train.base_dtype = "bfloat16"
        config.train.batch_size = 64
        config.demo.update(pretrain_examples=256_000, pretrain_steps=4000, pretrain_batch_size=64,
                           pretrain_learning_rate=1e-3, finetune_examples=2048,
                           finetune_steps=400, finetune_learning_rate=3e-4, eval_examples=500)
        config.rewrite.update(batch_size=256)
        config.eval.update(batch_size=250)
    elif arg:
        raise ValueError(f"unknown demo variant {arg!r}; choose from {', '.join(VARIANTS)}")
    return config
