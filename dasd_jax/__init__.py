"""dasd_jax: Distribution-Aligned Self-Distillation fine-tuning of decoder LLMs in JAX/Flax."""

__version__ = "0.1.0"
