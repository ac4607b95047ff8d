"""Token log-probs, top-1 probability and entropy over sequence chunks, the shift between two
models' distributions, and masked cross-entropy.

The vocabulary projection is the largest activation of an LLM step (`[B, T, V]` float32 is 4.7 GB
for B=8, T=1024 and Qwen's 152k vocabulary). `token_stats` projects `chunk` positions at a time
and reduces each chunk to per-token scalars at once; under autodiff each chunk is rematerialized,
so at no point does more than one `[B, chunk, V]` float32 block exist.
"""

from __future__ import annotations


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
    picked = lambda ids: jnp.take_along_axis(logits, ids[..., None], axis=-1)[..., 0]
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
    body = lambda h, t, q: _chunk_stats(h, kernel, t, q, stats)
    return dict(zip(stats, _map_chunks(body, chunk, hidden, targets, queries)))


SHIFT_STATS = ("kl", "logprob_base", "logprob_tuned", "top1_kept")


def distribution_shift(base_hidden: Array, base_kernel: Array, tuned_hidden: Array,
                       tuned_kernel: Array, targets: Array, *, chunk: int = 512
                       ) -> dict[str, Array]:
    """How far a tuned model's next-token distribution lies from its base's, per position,
    `chunk` positions at a time (no [B, T, V] float32 array in one piece).

    *_hidden: [B, T, D] final hidden states of the base and the tuned model on the same
    tokens; *_kernel: [D, V] their output embeddings; targets: int32[B, T]. Returns float32
    [B, T] each: "kl" = KL(π_base || π_tuned) = Σ_v π_base(v) (log π_base(v) − log π_tuned(v)),
    "logprob_base" / "logprob_tuned" = log π(target), "top1_kept" = 1 where the base's most
    likely token is the tuned model's most likely too.
    """
    def body(base_h, tuned_h, ids):
        base = jax.nn.log_softmax(jnp.einsum("bcd,dv->bcv", base_h, base_kernel.astype(
            base_h.dtype), preferred_element_type=jnp.float32), axis=-1)
        tuned = jax.nn.log_softmax(jnp.einsum("bcd,dv->bcv", tuned_h, tuned_kernel.astype(
            tuned_h.dtype), preferred_element_type=jnp.float32), axis=-1)
        picked = lambda table: jnp.take_along_axis(table, ids[..., None], axis=-1)[..., 0]
        kl = jnp.sum(jnp.exp(base) * (base - tuned), axis=-1)
        kept = jnp.argmax(base, axis=-1) == jnp.argmax(tuned, axis=-1)
        return kl, picked(base), picked(tuned), kept.astype(jnp.float32)

    return dict(zip(SHIFT_STATS, _map_chunks(body, chunk, base_hidden, tuned_hidden, targets)))


def _map_chunks(body, chunk: int, *arrays: Array) -> tuple[Array, ...]:
    """body(*chunks) -> a tuple of [B, C] arrays, applied to `chunk` positions of `arrays`
    ([B, T, ...] each) at a time and concatenated back to [B, T]. Each chunk is
    rematerialized under autodiff, so only one chunk's intermediates (the [B, C, V] logits)
    ever exist. chunk <= 0 or >= T: one call on the whole sequence."""
    batch, length = arrays[0].shape[:2]
    if chunk <= 0 or chunk >= length:
        return body(*arrays)
    num_chunks = -(-length // chunk)
    pad = num_chunks * chunk - length

    def split(x: Array) -> Array:
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return x.reshape(batch, num_chunks, chunk, *x.shape[2:]).swapaxes(0, 1)

    per_chunk = jax.lax.map(lambda xs: jax.checkpoint(
        body, policy=jax.checkpoint_policies.nothing_saveable)(*xs), tuple(map(split, arrays)))
    return tuple(values.swapaxes(0, 1).reshape(batch, num_chunks * chunk)[:, :length]
                 for values in per_chunk)


def masked_cross_entropy(logprob: Array, weights: Array, normalizer: Array) -> Array:
    """−Σ weights · logprob / max(normalizer, 1): 0 (not NaN) when nothing is selected.

    logprob, weights: float32[...]; normalizer: the selected-token count (or the response-token
    count), summed over the whole batch so that micro-batch losses add up to the batch loss.
    """
    return -jnp.sum(weights * logprob) / jnp.maximum(normalizer, 1.0)
