"""Jitted prefill + decode with a donated KV cache: plain sampling and candidate co-decoding.

    decoded = sampling.generate(cfg, params, prompts, settings, rng)            # list[Decoded]
    decoded = sampling.codecode(cfg, params, ref_prompts, base_prompts, settings, rng)

Prompts of mixed length share a batch: they are left-padded to a prompt bucket, so every row
writes the same cache slot at each step; positions count real tokens only and padding is masked
out. Each decode runs two compiled programs: prefill (the prompts into a fresh cache) and the
decode loop (a `lax.while_loop` that stops when every row has emitted an end-of-sequence token
or `max_new_tokens`), with the cache donated from one to the other.

Co-decoding (DESIGN.md, stage 1, mode `dasd`): each example's two contexts, with the reference
(answer-aware, πref) and without it (the base, π0), sit in one batch as rows i and B + i on the
same params. At every step the reference proposes C = {v : πref(v) ≥ α · max πref}, capped at its
`top_k` most likely tokens; the emitted token, appended to both contexts, is the candidate the
base is most confident in (or a sample from the base restricted to C when temperature > 0).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dasd_jax import data, losses, model, sharding
from dasd_jax.errors import UserError

Array = jax.Array
DEFAULT_PROMPT_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096)


@dataclasses.dataclass(frozen=True)
class Settings:
    """How to pick tokens. temperature 0 = greedy; top_k 0 / top_p 1 / min_p 0 = no filter.

    alpha, candidate_top_k: co-decoding's candidate set (min-p ratio and cap; 0 = no cap).
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    eos_ids: tuple[int, ...] = ()
    alpha: float = 0.1
    candidate_top_k: int = 8
    prompt_buckets: tuple[int, ...] = DEFAULT_PROMPT_BUCKETS


@dataclasses.dataclass
class Decoded:
    """One row's output: the generated ids (through the first end-of-sequence token, if any) and,
    per generated token, log p of it under the model's unfiltered distribution.

    Co-decoding fills `logprobs` with the reference's (log πref) and adds `base_logprobs`
    (log π0), `base_top1` (max_v π0(v)), `n_candidates` (|C_t|), and the correction test's
    signals `ref_logprob_base_choice` (log πref(v0), v0 = argmax π0: what the base would have
    written) and `ref_top1` (log max_v πref(v)).
    """

    tokens: list[int]
    logprobs: list[float]
    finished: bool
    base_logprobs: list[float] | None = None
    base_top1: list[float] | None = None
    n_candidates: list[int] | None = None
    ref_logprob_base_choice: list[float] | None = None
    ref_top1: list[float] | None = None


def stop_ids(cfg: model.ModelConfig, tokenizer) -> tuple[int, ...]:
    """End-of-sequence ids of the model's configs, plus the tokenizer's own."""
    extra = tokenizer.eos_token_id
    return cfg.eos_token_ids + (() if extra is None or extra in cfg.eos_token_ids else (extra,))


# ----------------------------------------------------------------------------- token choice


def filter_logits(logits: Array, settings: Settings) -> Array:
    """float32[R, V] logits / temperature with top-k, top-p and min-p applied (-inf outside)."""
    logits = logits.astype(jnp.float32) / settings.temperature
    if settings.top_k:
        kth = jax.lax.top_k(logits, settings.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if settings.min_p > 0:
        log_probs = jax.nn.log_softmax(logits)
        floor = jnp.max(log_probs, -1, keepdims=True) + jnp.log(settings.min_p)
        logits = jnp.where(log_probs < floor, -jnp.inf, logits)
    if settings.top_p < 1:
        order = jnp.argsort(-logits, axis=-1)
        sorted_probs = jax.nn.softmax(jnp.take_along_axis(logits, order, -1))
        before = jnp.cumsum(sorted_probs, -1) - sorted_probs  # mass of strictly better tokens
        drop_sorted = before >= settings.top_p
        drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(
            drop_sorted)
        logits = jnp.where(drop, -jnp.inf, logits)
    return logits


def choose(logits: Array, rng: Array, settings: Settings) -> Array:
    """int32[R] next tokens from logits[R, V]: argmax, or a sample from the filtered logits."""
    if settings.temperature == 0:
        return jnp.argmax(logits, -1).astype(jnp.int32)
    return jax.random.categorical(rng, filter_logits(logits, settings)).astype(jnp.int32)


def _plain_step(logits: Array, rng: Array, settings: Settings):
    """(tokens for every row, the example's token, per-token records) for plain decoding."""
    tokens = choose(logits, rng, settings)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
    picked = jnp.take_along_axis(log_probs, tokens[:, None], -1)[:, 0]
    return tokens, tokens, {"logprobs": picked}


def _codecode_step(logits: Array, rng: Array, settings: Settings):
    """Rows [0, B) are reference contexts, [B, 2B) base contexts of the same examples."""
    ref_logits, base_logits = jnp.split(logits.astype(jnp.float32), 2)
    ref_log_probs, base_log_probs = jax.nn.log_softmax(ref_logits), jax.nn.log_softmax(base_logits)
    floor = jnp.max(ref_log_probs, -1, keepdims=True) + jnp.log(settings.alpha)
    candidates = ref_log_probs >= floor
    if settings.candidate_top_k:
        kth = jax.lax.top_k(ref_log_probs, settings.candidate_top_k)[0][:, -1:]
        candidates &= ref_log_probs >= kth
    restricted = jnp.where(candidates, base_logits, -jnp.inf)
    tokens = choose(restricted, rng, settings)
    pick = lambda table, ids: jnp.take_along_axis(table, ids[:, None], -1)[:, 0]  # noqa: E731
    base_choice = jnp.argmax(base_log_probs, -1)
    records = {"logprobs": pick(ref_log_probs, tokens), "base_logprobs": pick(base_log_probs, tokens),
               "base_top1": jnp.exp(jnp.max(base_log_probs, -1)),
               "n_candidates": jnp.sum(candidates, -1).astype(jnp.int32),
               "ref_logprob_base_choice": pick(ref_log_probs, base_choice),
               "ref_top1": jnp.max(ref_log_probs, -1)}
    return jnp.concatenate([tokens, tokens]), tokens, records


_STEPS = {"plain": _plain_step, "codecode": _codecode_step}


# ----------------------------------------------------------------------------- the compiled parts


@functools.partial(jax.jit, static_argnums=(0, 4))
def _prefill(cfg: model.ModelConfig, params, tokens: Array, valid: Array, cache_length: int):
    """Prompts int32[R, P] (left-padded; valid bool[R, P]) into a fresh cache of cache_length."""
    positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0).astype(jnp.int32)
    cache = model.init_cache(cfg, tokens.shape[0], cache_length)
    logits, cache = model.forward_cached(cfg, params, tokens, positions, valid, cache)
    return logits[:, -1], positions[:, -1] + 1, cache


@functools.partial(jax.jit, static_argnums=(0, 1, 2), donate_argnums=(5,))
def _decode(cfg: model.ModelConfig, settings: Settings, step_kind: str, params, logits: Array,
            cache: model.KVCache, positions: Array, rng: Array):
    """The decode loop: tokens int32[B, N], finished bool[B], records [B, N], steps taken, and
    the cache, returned so that the loop updates the donated prefill cache in place."""
    step = functools.partial(_STEPS[step_kind], settings=settings)
    rows = logits.shape[0]
    examples = rows // (2 if step_kind == "codecode" else 1)
    steps = settings.max_new_tokens
    eos = jnp.asarray(settings.eos_ids or (-1,), jnp.int32)
    _, _, template = jax.eval_shape(step, logits, rng)
    records = {name: jnp.zeros((examples, steps), spec.dtype) for name, spec in template.items()}
    state = dict(i=jnp.zeros((), jnp.int32), logits=logits, cache=cache, positions=positions,
                 done=jnp.zeros((examples,), bool), tokens=jnp.zeros((examples, steps), jnp.int32),
                 records=records)

    def cond(state):
        return (state["i"] < steps) & ~jnp.all(state["done"])

    def body(state):
        i = state["i"]
        fed, emitted, picked = step(state["logits"], jax.random.fold_in(rng, i))
        live = ~state["done"]
        tokens = state["tokens"].at[:, i].set(jnp.where(live, emitted, 0))
        records = {name: state["records"][name].at[:, i].set(jnp.where(live, picked[name], 0))
                   for name in picked}
        done = state["done"] | jnp.isin(emitted, eos)
        logits, cache = model.forward_cached(
            cfg, params, fed[:, None], state["positions"][:, None], jnp.ones((rows, 1), bool),
            state["cache"])
        return dict(i=i + 1, logits=logits[:, 0], cache=cache, positions=state["positions"] + 1,
                    done=done, tokens=tokens, records=records)

    state = jax.lax.while_loop(cond, body, state)
    return state["tokens"], state["done"], state["records"], state["i"], state["cache"]


# ----------------------------------------------------------------------------- host side


def prompt_bucket(length: int, buckets: Sequence[int]) -> int:
    return data.smallest_bucket(length, buckets, "add a larger one to the stage's prompt_buckets "
                                "(--config.rewrite.prompt_buckets / --config.eval.prompt_buckets)")


def left_pad(prompts: Sequence[Sequence[int]], length: int, pad_id: int = 0):
    """(tokens int32[R, length], valid bool[R, length]) with each prompt at the right end."""
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    valid = np.zeros((len(prompts), length), bool)
    for row, prompt in enumerate(prompts):
        if prompt:
            tokens[row, -len(prompt):] = prompt
            valid[row, -len(prompt):] = True
    return tokens, valid


def _run(cfg, params, prompts, settings: Settings, rng, step_kind: str) -> list[Decoded]:
    if any(not prompt for prompt in prompts):
        raise UserError("cannot decode from an empty prompt")
    length = prompt_bucket(max(map(len, prompts)), settings.prompt_buckets)
    if length + settings.max_new_tokens > cfg.max_position_embeddings:
        raise UserError(f"prompt bucket {length} + max_new_tokens {settings.max_new_tokens} "
                        f"exceeds the model's window of {cfg.max_position_embeddings} positions")
    tokens, valid = left_pad(prompts, length)
    logits, positions, cache = _prefill(cfg, params, tokens, valid, length + settings.max_new_tokens)
    *outputs, cache = _decode(cfg, settings, step_kind, params, logits, cache, positions, rng)
    cache.keys.delete()
    cache.values.delete()
    out_tokens, done, records, steps = sharding.to_host(outputs)
    results = []
    for row in range(out_tokens.shape[0]):
        emitted = out_tokens[row, :int(steps)]
        stops = np.flatnonzero(np.isin(emitted, settings.eos_ids)) if settings.eos_ids else []
        count = int(stops[0]) + 1 if len(stops) else len(emitted)
        fields = {name: values[row, :count].tolist() for name, values in records.items()}
        results.append(Decoded(tokens=emitted[:count].tolist(), finished=bool(done[row]),
                               **fields))
    return results


def generate(cfg: model.ModelConfig, params, prompts: Sequence[Sequence[int]],
             settings: Settings, rng: Array | None = None) -> list[Decoded]:
    """Decodes a continuation of each prompt (token id lists of any lengths) in one batch."""
    rng = jax.random.PRNGKey(0) if rng is None else rng
    return _run(cfg, params, [list(p) for p in prompts], settings, rng, "plain")


def codecode(cfg: model.ModelConfig, params, reference_prompts: Sequence[Sequence[int]],
             base_prompts: Sequence[Sequence[int]], settings: Settings,
             rng: Array | None = None) -> list[Decoded]:
    """Candidate co-decoding of each example from its reference and base contexts."""
    if len(reference_prompts) != len(base_prompts):
        raise ValueError("one base prompt per reference prompt")
    rng = jax.random.PRNGKey(0) if rng is None else rng
    prompts = [list(p) for p in reference_prompts] + [list(p) for p in base_prompts]
    return _run(cfg, params, prompts, settings, rng, "codecode")


def score(cfg: model.ModelConfig, params, contexts: Sequence[Sequence[int]],
          continuations: Sequence[Sequence[int]], buckets: Sequence[int] = DEFAULT_PROMPT_BUCKETS):
    """Teacher-forced (log p, top-1 p) of each continuation token after its context.

    Returns one (float32[len], float32[len]) pair per example.
    """
    stats = score_stats(cfg, params, contexts, continuations, ("logprob", "top1"), buckets)
    return [(found["logprob"], found["top1"]) for found in stats]


def score_stats(cfg: model.ModelConfig, params, contexts: Sequence[Sequence[int]],
                continuations: Sequence[Sequence[int]], stats: tuple[str, ...],
                buckets: Sequence[int] = DEFAULT_PROMPT_BUCKETS,
                queries: Sequence[Sequence[int]] | None = None,
                batch_size: int | None = None) -> list[dict[str, np.ndarray]]:
    """Teacher-forced `losses.token_stats` of the distribution before each continuation token:
    per example {stat: [len(continuation)]}. `queries` (one token per continuation position)
    are the tokens "query_logprob" scores. `batch_size`: rows per compiled pass (the last pass
    padded with copies of its first row, so every pass has one shape); None = all at once."""
    size = batch_size or max(len(contexts), 1)
    out = []
    for start in range(0, len(contexts), size):
        rows = slice(start, start + size)
        chunk = [list(contexts[rows]), list(continuations[rows]),
                 None if queries is None else list(queries[rows])]
        count = len(chunk[0])
        if batch_size:
            chunk = [None if part is None else part + [part[0]] * (size - count)
                     for part in chunk]
        out.extend(_score_chunk(cfg, params, *chunk, stats, buckets)[:count])
    return out


def _score_chunk(cfg, params, contexts, continuations, queries, stats, buckets):
    sequences = [list(c) + list(r) for c, r in zip(contexts, continuations)]
    length = prompt_bucket(max(map(len, sequences)), buckets)
    tokens = np.zeros((len(sequences), length), np.int32)
    asked = np.zeros((len(sequences), length), np.int32)
    for row, sequence in enumerate(sequences):
        tokens[row, :len(sequence)] = sequence
        if queries is not None:
            start = len(contexts[row]) - 1
            asked[row, start:start + len(queries[row])] = queries[row]
    found = sharding.to_host(_score(cfg, params, tokens, asked if queries is not None else None,
                                    tuple(stats)))
    out = []
    for row, (context, continuation) in enumerate(zip(contexts, continuations)):
        span = slice(len(context) - 1, len(context) - 1 + len(continuation))
        out.append({stat: values[row, span] for stat, values in found.items()})
    return out


@functools.partial(jax.jit, static_argnums=(0, 4))
def _score(cfg, params, tokens, queries, stats):
    hidden = model.hidden_states(cfg, params, tokens)
    targets = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
    return losses.token_stats(hidden, model.output_embedding(cfg, params), targets,
                              stats=stats, queries=queries)
