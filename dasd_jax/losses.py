"""Token log-probs, top-1 probability and entropy over sequence chunks, and masked cross-entropy.

The vocabulary projection is the largest activation of an LLM step (`[B, T, V]` float32 is 4.7 GB
for B=8, T=1024 and Qwen's 152k vocabulary). `token_stats` projects `chunk` positions at a time
and reduces each chunk to per-token scalars at once; under autodiff each chunk is rematerialized,
so at no point does more than one `[B, chunk, V]` float32 block exist.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array
STATS = ("logprob", "top1", "top1_logprob", "entropy", "argmax", "query_logprob")


def _chunk_stats(hidden: Array, kernel: Array, targets: Array, queries: Array | None,
                 stats: tuple[str, ...]) -> tuple:
    """hidden [B, C, D], kernel [D, V], targets (and queries) int32[B, C] -> one [B, C] per stat
    (float32, int32 for argmax)."""
    logits = jnp.einsum("bcd,dv->bcv", hidden, kernel.astype(hidden.dtype),
                        preferred_element_type=jnp.float32)
    log_normalizer = jax.nn.logsumexp(logits, axis=-1)
    picked = lambda ids: jnp.take_along_axis(logits, ids[..., None], axis=-1)[..., 0]  # noqa: E731
    out = []
    for stat in stats:
        if stat == "logprob":
            out.append(picked(targets) - log_normalizer)
        elif stat == "query_logprob":
            out.append(picked(queries) - log_normalizer)
        elif stat == "top1":
            out.append(jnp.exp(jnp.max(logits, axis=-1) - log_normalizer))
        elif stat == "top1_logprob":
            out.append(jnp.max(logits, axis=-1) - log_normalizer)
        elif stat == "argmax":
            out.append(jnp.argmax(logits, axis=-1).astype(jnp.int32))
        elif stat == "entropy":
            probs = jnp.exp(logits - log_normalizer[..., None])
            out.append(log_normalizer - jnp.sum(probs * logits, axis=-1))
    return tuple(out)


def token_stats(hidden: Array, kernel: Array, targets: Array, *, chunk: int = 512,
                stats: tuple[str, ...] = ("logprob",), queries: Array | None = None
                ) -> dict[str, Array]:
    """Per-token statistics of the next-token distribution, computed `chunk` positions at a time.

    hidden: [B, T, D] final hidden states (compute dtype); kernel: [D, V] output embedding;
    targets: int32[B, T]; queries: int32[B, T], other tokens to score (for "query_logprob").
    Returns {stat: [B, T]} for stat in `stats` ⊆ ("logprob" = log p(target), "top1" = max_v
    p(v), "top1_logprob" = log max_v p(v), "entropy" = -Σ p log p, "argmax" = argmax_v p(v)
    (int32), "query_logprob" = log p(query)), float32 unless said otherwise.
    chunk <= 0 or >= T projects the whole sequence at once (the naive computation).
    """
    unknown = set(stats) - set(STATS)
    if unknown:
        raise ValueError(f"unknown token stats {sorted(unknown)}; choose from {STATS}")
    if ("query_logprob" in stats) != (queries is not None):
        raise ValueError("the query_logprob stat and the queries argument go together")
    queries = targets if queries is None else queries
    batch, length, width = hidden.shape
    if chunk <= 0 or chunk >= length:
        return dict(zip(stats, _chunk_stats(hidden, kernel, targets, queries, stats)))
    num_chunks = -(-length // chunk)
    pad = num_chunks * chunk - length
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    split = lambda ids: jnp.pad(ids, ((0, 0), (0, pad))).reshape(  # noqa: E731
        batch, num_chunks, chunk).swapaxes(0, 1)
    hidden_chunks = hidden.reshape(batch, num_chunks, chunk, width).swapaxes(0, 1)

    body = jax.checkpoint(functools.partial(_chunk_stats, stats=stats),
                          policy=jax.checkpoint_policies.nothing_saveable)
    per_chunk = jax.lax.map(lambda xs: body(xs[0], kernel, xs[1], xs[2]),
                            (hidden_chunks, split(targets), split(queries)))
    return {stat: values.swapaxes(0, 1).reshape(batch, num_chunks * chunk)[:, :length]
            for stat, values in zip(stats, per_chunk)}


def masked_cross_entropy(logprob: Array, weights: Array, normalizer: Array) -> Array:
    """−Σ weights · logprob / max(normalizer, 1): 0 (not NaN) when nothing is selected.

    logprob, weights: float32[...]; normalizer: the selected-token count (or the response-token
    count), summed over the whole batch so that micro-batch losses add up to the batch loss.
    """
    return -jnp.sum(weights * logprob) / jnp.maximum(normalizer, 1.0)
