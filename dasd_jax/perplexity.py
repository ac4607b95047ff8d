"""Perplexity of a text under a checkpoint: `python -m dasd_jax.perplexity [--checkpoint DIR]`.

Without --checkpoint it runs on an embedded default: a tiny random Llama-style model with a
character tokenizer, which it writes as an ordinary HF checkpoint (hf.save) and reads back
(hf.load, hf.load_tokenizer), so the command exercises the same path as a real checkpoint.
A random model's perplexity is close to its vocabulary size; a trained one's is far lower.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dasd_jax import char_tokenizer, hf, model
from dasd_jax.errors import UserError, exit_on_user_error

DEFAULT_TEXT = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in "
    "May. How many clips did Natalia sell altogether in April and May? 48/2 = 24. 48+24 = 72."
)
EMBEDDED_CONFIG = model.ModelConfig(
    model_type="llama", vocab_size=128, hidden_size=128, intermediate_size=384, num_layers=2,
    num_heads=4, num_kv_heads=2, head_dim=32, rope_theta=500000.0, tie_word_embeddings=True,
    bos_token_id=1, eos_token_ids=(2,), pad_token_id=0,
)


def embedded_checkpoint(directory: Path, seed: int = 0) -> Path:
    """Writes (once) the embedded tiny random checkpoint with its tokenizer into `directory`."""
    if not (directory / "config.json").exists():
        params = model.init(EMBEDDED_CONFIG, jax.random.key(seed))
        hf.save(directory, EMBEDDED_CONFIG, params, tokenizer=char_tokenizer.build())
    return directory


def token_logprobs(cfg: model.ModelConfig, params, tokens: jax.Array) -> jax.Array:
    """float32[B, T-1]: log p(tokens[:, t+1] | tokens[:, :t+1])."""
    logits = model.forward(cfg, params, tokens).astype(jnp.float32)
    logprobs = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    return jnp.take_along_axis(logprobs, tokens[:, 1:, None], axis=-1)[..., 0]


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint",
                        help="HF checkpoint directory or hub id (default: embedded)")
    parser.add_argument("--text", default=DEFAULT_TEXT, help="text to score")
    parser.add_argument("--dtype", default=None, help="param/compute dtype, e.g. bfloat16")
    parser.add_argument("--cache_dir", default=os.environ.get(
        "DASD_JAX_CACHE", str(Path.home() / ".cache" / "dasd_jax")),
        help="where the embedded checkpoint is written")
    args = parser.parse_args(argv)

    checkpoint = args.checkpoint or embedded_checkpoint(Path(args.cache_dir) / "tiny-random-llama")
    start = time.perf_counter()
    cfg, params = hf.load(checkpoint, dtype=args.dtype)
    tokenizer = hf.load_tokenizer(checkpoint, cfg)
    ids = tokenizer(args.text).input_ids
    if cfg.bos_token_id is not None and (not ids or ids[0] != cfg.bos_token_id):
        ids = [cfg.bos_token_id] + ids
    if len(ids) < 2:
        raise UserError("--text must have at least one token to score")
    logprobs = np.asarray(jax.jit(token_logprobs, static_argnums=0)(cfg, params,
                                                                   jnp.asarray([ids])))
    result = {
        "checkpoint": str(checkpoint),
        "model_type": cfg.model_type,
        "params": cfg.num_params,
        "tokens": len(ids) - 1,
        "mean_nll": float(-logprobs.mean()),
        "perplexity": float(np.exp(-logprobs.mean())),
        "seconds": time.perf_counter() - start,
    }
    print(f"checkpoint  {result['checkpoint']} ({cfg.model_type}, {cfg.num_params:,} params, "
          f"vocab {cfg.vocab_size}, {jax.default_backend()})")
    print(f"tokens      {result['tokens']}")
    print(f"mean NLL    {result['mean_nll']:.4f} nats/token")
    print(f"perplexity  {result['perplexity']:.2f}")
    return result


if __name__ == "__main__":
    main()
