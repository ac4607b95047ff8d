"""Jitted prefill + decode with a donated KV cache: plain sampling and candidate co-decoding.

    decoded = sampling.generate(cfg, params, prompts, settings, rng)            # list[Decoded]
    decoded = sampling.codecode(cfg, params, ref_prompts, base_prompts, settings, rng)

Prompts of mixed length share a batch: each row keeps its own length in the KV cache, so
prompts are right-padded (to a multiple of 64 within their bucket) and a row's padding is
overwritten by its next tokens; positions count real tokens only. Each decode runs two compiled
programs: prefill (the prompts into a fresh cache) and the decode loop (a `lax.while_loop` that
stops when every row has emitted an end-of-sequence token or `max_new_tokens`, or, with rows
waiting, when one row ends), with the state donated from one to the other; a finished row is
refilled with the next waiting prompt (continuous batching, `decode_all`). The state is laid
out over the mesh of the params (`decode_state_shardings`).

Co-decoding (docs/method.md, stage 1, mode `dasd`): each example's two contexts, with the reference
(answer-aware, πref) and without it (the base, π0), sit in one batch as rows i and B + i on the
same params. At every step the reference proposes C = {v : πref(v) ≥ α · max πref}, capped at its
`top_k` most likely tokens; the emitted token, appended to both contexts, is the candidate the
base is most confident in (or a sample from the base restricted to C when temperature > 0).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from dasd_jax import data, losses, model, sharding
from dasd_jax.errors import UserError

Array = jax.Array
DEFAULT_PROMPT_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096)


@dataclasses.dataclass(frozen=True)
class Settings:
    """How to pick tokens. temperature 0 = greedy; top_k 0 / top_p 1 / min_p 0 = no filter.

    alpha, candidate_top_k: co-decoding's candidate set (min-p ratio and cap; 0 = no cap).
    sure_reference: when the reference's top token has at least this probability, it is the
    only candidate (1.0 = never): a threshold that adapts to how sharp the reference is.
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    eos_ids: tuple[int, ...] = ()
    alpha: float = 0.1
    candidate_top_k: int = 8
    sure_reference: float = 1.0
    prompt_buckets: tuple[int, ...] = DEFAULT_PROMPT_BUCKETS


@dataclasses.dataclass
class Decoded:
    """One row's output: the generated ids (through the first end-of-sequence token, if any),
    per generated token its log-prob under the decoding context's unfiltered distribution (the
    reference's, in co-decoding), and in co-decoding the signals of `dasd_jax/signals.py` it
    computes anyway (base_logprob, base_top1, n_candidates, ref_logprob_base_choice, ref_top1),
    by name, one value per generated token."""

    tokens: list[int]
    logprobs: list[float]
    finished: bool
    signals: dict[str, list] = dataclasses.field(default_factory=dict)


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
    return tokens, tokens, {"logprob": picked}


def _codecode_step(logits: Array, rng: Array, settings: Settings):
    """Rows [0, B) are reference contexts, [B, 2B) base contexts of the same examples."""
    ref_logits, base_logits = jnp.split(logits.astype(jnp.float32), 2)
    ref_log_probs, base_log_probs = jax.nn.log_softmax(ref_logits), jax.nn.log_softmax(base_logits)
    top = jnp.max(ref_log_probs, -1, keepdims=True)
    alpha = jnp.where(top >= jnp.log(settings.sure_reference), 1.0, settings.alpha)
    candidates = ref_log_probs >= top + jnp.log(alpha)
    if settings.candidate_top_k:
        kth = jax.lax.top_k(ref_log_probs, settings.candidate_top_k)[0][:, -1:]
        candidates &= ref_log_probs >= kth
    restricted = jnp.where(candidates, base_logits, -jnp.inf)
    tokens = choose(restricted, rng, settings)
    pick = lambda table, ids: jnp.take_along_axis(table, ids[:, None], -1)[:, 0]
    base_choice = jnp.argmax(base_log_probs, -1)
    records = {"logprob": pick(ref_log_probs, tokens), "base_logprob": pick(base_log_probs, tokens),
               "base_top1": jnp.exp(jnp.max(base_log_probs, -1)),
               "n_candidates": jnp.sum(candidates, -1).astype(jnp.int32),
               "ref_logprob_base_choice": pick(ref_log_probs, base_choice),
               "ref_top1": jnp.max(ref_log_probs, -1)}
    return jnp.concatenate([tokens, tokens]), tokens, records


_STEPS = {"plain": _plain_step, "codecode": _codecode_step}


# ----------------------------------------------------------------------------- the compiled parts


@functools.partial(jax.jit, static_argnums=(0, 4))
def _prefill(cfg: model.ModelConfig, params, tokens: Array, lengths: Array, cache_length: int):
    """Prompts int32[R, P] (right-padded, real lengths int32[R]) into a fresh cache of
    cache_length slots: (the logits after each prompt's last token float32[R, V], cache). Only
    that position is projected onto the vocabulary."""
    cache = model.init_cache(cfg, tokens.shape[0], cache_length)
    hidden, cache = model.hidden_cached(cfg, params, tokens, cache)
    last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]
    logits = model.unembed(cfg, params, last).astype(jnp.float32)
    return logits, cache._replace(lengths=lengths.astype(jnp.int32))


def _empty_outputs(step, logits: Array, examples: int, steps: int, rng: Array) -> dict:
    _, _, template = jax.eval_shape(step, logits, rng)
    return {"tokens": jnp.zeros((examples, steps), jnp.int32),
            "records": {name: jnp.zeros((examples, steps), spec.dtype)
                        for name, spec in template.items()}}


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3), donate_argnums=(5,))
def _decode(cfg: model.ModelConfig, settings: Settings, step_kind: str, until_a_row_ends: bool,
            params, state: dict, rng: Array) -> dict:
    """Decodes until every example row is done, or (until_a_row_ends) until one more is.

    state (donated, updated in place): logits float32[R, V] (the next-token logits of every
    row), cache (R rows), count int32[E] (tokens each example emitted), done bool[E], tokens
    int32[E, N] and records (float32 / int32 [E, N]) of the emitted tokens, step int32[] (for
    the rng). E = R, or R / 2 for co-decoding (rows e and E + e are example e's two contexts).
    An example is done after an end-of-sequence token or N = max_new_tokens tokens.
    """
    step = functools.partial(_STEPS[step_kind], settings=settings)
    eos = jnp.asarray(settings.eos_ids or (-1,), jnp.int32)
    examples = state["done"].shape[0]
    rows = jnp.arange(examples)
    pairs = 2 if step_kind == "codecode" else 1
    done_at_start = jnp.sum(state["done"])

    def cond(state):
        all_done = jnp.all(state["done"])
        if until_a_row_ends:
            return ~all_done & (jnp.sum(state["done"]) == done_at_start)
        return ~all_done

    def body(state):
        fed, emitted, picked = step(state["logits"], jax.random.fold_in(rng, state["step"]))
        live = ~state["done"]
        write = jnp.where(live, state["count"], settings.max_new_tokens)  # dropped: past N
        tokens = state["tokens"].at[rows, write].set(emitted, mode="drop")
        records = {name: state["records"][name].at[rows, write].set(picked[name], mode="drop")
                   for name in picked}
        count = state["count"] + live
        done = state["done"] | (live & jnp.isin(emitted, eos)) | (count >= settings.max_new_tokens)
        # A done row still runs (the batch has one shape); its cache slot past its length is
        # never read, and it stops growing so that it never writes past its slots.
        cache = state["cache"]
        frozen = jnp.tile(~live, pairs)
        hidden, cache = model.hidden_cached(cfg, params, fed[:, None], cache)
        cache = cache._replace(lengths=cache.lengths - frozen)
        logits = model.unembed(cfg, params, hidden[:, 0]).astype(jnp.float32)
        return dict(state, logits=logits, cache=cache, count=count, done=done, tokens=tokens,
                    records=records, step=state["step"] + 1)

    return jax.lax.while_loop(cond, body, state)


@functools.partial(jax.jit, donate_argnums=(0,))
def _refill(state: dict, rows: Array, pair_rows: Array, logits: Array,
            cache: model.KVCache) -> dict:
    """`state` with example rows `rows` (int32[k]) restarted on freshly prefilled prompts: their
    cache rows `pair_rows` (int32[k * pairs]) take `cache`'s slots (the prompts) and lengths,
    their logits `logits` [k * pairs, V]; count 0, not done, outputs cleared."""
    old = state["cache"]
    slots = cache.keys.shape[3]
    keys = old.keys.at[:, pair_rows, :, :slots].set(cache.keys)
    values = old.values.at[:, pair_rows, :, :slots].set(cache.values)
    lengths = old.lengths.at[pair_rows].set(cache.lengths)
    return dict(state, cache=model.KVCache(keys, values, lengths),
                logits=state["logits"].at[pair_rows].set(logits),
                count=state["count"].at[rows].set(0), done=state["done"].at[rows].set(False),
                tokens=state["tokens"].at[rows].set(0),
                records={k: v.at[rows].set(0) for k, v in state["records"].items()})


# ----------------------------------------------------------------------------- host side


def prompt_bucket(length: int, buckets: Sequence[int]) -> int:
    return data.smallest_bucket(length, buckets, "add a larger one to the stage's prompt_buckets "
                                "(--config.rewrite.prompt_buckets / --config.eval.prompt_buckets)")


def right_pad(prompts: Sequence[Sequence[int]], length: int, pad_id: int = 0):
    """(tokens int32[R, length] with each prompt at the left, lengths int32[R])."""
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, :len(prompt)] = prompt
    return tokens, np.asarray([len(p) for p in prompts], np.int32)


def _check(cfg, prompts, settings: Settings) -> int:
    """The cache length for `prompts`: their largest bucket + max_new_tokens, rounded up to a
    whole number of the decode step's attention blocks."""
    if any(not prompt for prompt in prompts):
        raise UserError("cannot decode from an empty prompt")
    length = prompt_bucket(max(map(len, prompts)), settings.prompt_buckets)
    if length + settings.max_new_tokens > cfg.max_position_embeddings:
        raise UserError(f"prompt bucket {length} + max_new_tokens {settings.max_new_tokens} "
                        f"exceeds the model's window of {cfg.max_position_embeddings} positions")
    return cache_length(length, settings)


def cache_length(bucket: int, settings: Settings) -> int:
    """Cache slots for prompts of up to `bucket` tokens: bucket + max_new_tokens, rounded up to
    a whole number of the decode step's attention blocks."""
    return -(-(bucket + settings.max_new_tokens) // model.DECODE_BLOCK) * model.DECODE_BLOCK


PREFILL_STEP = 64  # a prefill pads its prompts to a multiple of this (at most their bucket)


def _prefilled(cfg, params, groups: list[list[list[int]]], settings: Settings):
    """(logits, cache) of the prompts of `groups` (each a list of row prompts: 1, or the 2
    contexts of co-decoding), rows ordered context-major (all first contexts, then all second),
    padded to a multiple of PREFILL_STEP within their bucket: a prefill costs in proportion to
    its padded length, and steps of 64 bound the compiles to a few per bucket."""
    rows = [group[part] for part in range(len(groups[0])) for group in groups]
    longest = max(map(len, rows))
    bucket = min(prompt_bucket(longest, settings.prompt_buckets),
                 -(-longest // PREFILL_STEP) * PREFILL_STEP)
    tokens, lengths = right_pad(rows, bucket)
    return _prefill(cfg, params, tokens, lengths, bucket)


def _fresh_state(step_kind, settings, logits, cache, examples, rng) -> dict:
    step = functools.partial(_STEPS[step_kind], settings=settings)
    return dict(logits=logits, cache=cache, count=jnp.zeros((examples,), jnp.int32),
                done=jnp.zeros((examples,), bool), step=jnp.zeros((), jnp.int32),
                **_empty_outputs(step, logits, examples, settings.max_new_tokens, rng))


def _results(state: dict, rows: Sequence[int], settings: Settings) -> list[Decoded]:
    """The Decoded of example rows `rows` (host copies of their outputs only)."""
    index = jnp.asarray(list(rows), jnp.int32)
    tokens, count, done, records = sharding.to_host(
        (state["tokens"][index], state["count"][index], state["done"][index],
         {k: v[index] for k, v in state["records"].items()}))
    eos = set(settings.eos_ids)
    out = []
    for i in range(len(index)):
        emitted, length = tokens[i, :int(count[i])], int(count[i])
        finished = bool(len(emitted)) and int(emitted[-1]) in eos
        out.append(Decoded(tokens=emitted.tolist(), finished=finished,
                           logprobs=records["logprob"][i, :length].tolist(),
                           signals={k: v[i, :length].tolist() for k, v in records.items()
                                    if k != "logprob"}))
    return out


def decode_all(cfg: model.ModelConfig, params, examples: Sequence[list[list[int]]],
               settings: Settings, batch_size: int, step_kind: str = "plain",
               rng: Array | None = None) -> Iterator[tuple[int, Decoded]]:
    """Continuous batching: (example index, Decoded) of every example, as each finishes.

    examples: per example its row prompts (one, or co-decoding's reference and base contexts).
    `batch_size` examples decode at once; whenever one ends (end-of-sequence token or
    max_new_tokens), the next waiting example is prefilled into its rows, so the batch never
    idles until its slowest row ends. Greedy outputs equal `generate`'s.
    """
    rng = jax.random.PRNGKey(0) if rng is None else rng
    if not examples:
        return
    cache_length = _check(cfg, [p for group in examples for p in group], settings)
    step_params = _decode_params(cfg, params)
    size, pairs = min(batch_size, len(examples)), len(examples[0])
    state = _idle_state(cfg, step_kind, settings, size, pairs, cache_length, rng,
                        sharding.mesh_of(params))
    owner: dict[int, int] = {}  # example row -> the example it decodes
    waiting, free = list(range(len(examples))), list(range(size))
    while waiting or owner:
        refill = free[:len(waiting)]
        if refill:  # prefill waiting examples into the free rows (each prompt in its bucket)
            chosen, waiting, free = waiting[:len(refill)], waiting[len(refill):], []
            padded = _power_of_two(len(refill), size)
            rows = refill + [refill[0]] * (padded - len(refill))
            groups = [examples[i] for i in chosen] + [examples[chosen[0]]] * (padded - len(refill))
            logits, cache = _prefilled(cfg, params, groups, settings)
            pair_rows = [row + part * size for part in range(pairs) for row in rows]
            state = _refill(state, jnp.asarray(rows, jnp.int32),
                            jnp.asarray(pair_rows, jnp.int32), logits, cache)
            owner.update(zip(refill, chosen))
        state = _decode(cfg, settings, step_kind, bool(waiting), step_params, state, rng)
        done = sharding.to_host(state["done"])
        free = [row for row in owner if done[row]]
        for row, result in zip(free, _results(state, free, settings)):
            yield owner.pop(row), result


def _idle_state(cfg, step_kind, settings, examples: int, pairs: int, cache_length: int,
                rng, mesh=None) -> dict:
    """A decode state of `examples` rows, all done (free), on an empty cache: laid out over
    `mesh` (`decode_state_shardings`) when one is given, so that no device ever holds the whole
    cache."""
    def build(rng):
        logits = jnp.zeros((examples * pairs, cfg.vocab_size), jnp.float32)
        cache = model.init_cache(cfg, examples * pairs, cache_length)
        state = _fresh_state(step_kind, settings, logits, cache, examples, rng)
        return dict(state, done=jnp.ones((examples,), bool))

    if mesh is None:
        return build(rng)
    shardings = decode_state_shardings(mesh, jax.eval_shape(build, rng))
    return jax.jit(build, out_shardings=shardings)(rng)


def decode_state_shardings(mesh, state: dict) -> dict:
    """NamedShardings of a decode state (or of its shapes) on `mesh`: every per-row array split
    over the batch axes, the cache's KV heads over `tensor`, as the model's activation rules
    place them (a dimension they do not divide is replicated)."""
    rules = nn.get_logical_axis_rules() or sharding.LOGICAL_AXIS_RULES

    def place(path, leaf):
        name = getattr(path[-1], "name", None) or getattr(path[-1], "key", None)
        if name in ("keys", "values"):
            logical = (None, "act_batch", "act_kv_heads", None, None)
        else:
            logical = ("act_batch",) + (None,) * (len(leaf.shape) - 1) if leaf.shape else ()
        spec = sharding.logical_to_physical(PartitionSpec(*logical), leaf.shape, mesh, rules)
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(place, state)


def _decode_params(cfg: model.ModelConfig, params):
    """The params the decode loop reads: on a CPU a copy with the layers apart
    (`model.split_layers`, made once per decode_all); prefills, few and long, keep the stacked
    weights. Abstract params (ShapeDtypeStructs) give abstract ones, with their shardings."""
    if model.compile_platform(cfg) != "cpu":
        return params
    if not isinstance(jax.tree.leaves(params)[0], jax.ShapeDtypeStruct):
        return model.split_layers(params)

    def one_layer(x):
        if not isinstance(x.sharding, NamedSharding):
            return jax.ShapeDtypeStruct(x.shape[1:], x.dtype)
        spec = PartitionSpec(*x.sharding.spec[1:])
        return jax.ShapeDtypeStruct(x.shape[1:], x.dtype,
                                    sharding=NamedSharding(x.sharding.mesh, spec))

    count = jax.tree.leaves(params["layers"])[0].shape[0]
    return {**params, "layers": (jax.tree.map(one_layer, params["layers"]),) * count}


def lower_decoding(cfg: model.ModelConfig, params, settings: Settings, batch_size: int,
                   step_kind: str, mesh) -> dict:
    """Decoding's two programs, lowered (not run) for `batch_size` examples at once at the
    longest prompt bucket: {"prefill": ..., "decode loop": ...}. params: ShapeDtypeStructs with
    their shardings on `mesh` (trace inside `sharding.activation_rules(mesh)`). The fit check
    compiles them for a target's devices."""
    pairs = 2 if step_kind == "codecode" else 1
    bucket = max(settings.prompt_buckets)
    rows = batch_size * pairs
    replicated = NamedSharding(mesh, PartitionSpec())
    tokens = jax.ShapeDtypeStruct((rows, bucket), jnp.int32, sharding=replicated)
    lengths = jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=replicated)
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated)
    slots = cache_length(bucket, settings)
    build = functools.partial(_idle_state, cfg, step_kind, settings, batch_size, pairs, slots)
    shapes = jax.eval_shape(build, jax.ShapeDtypeStruct((2,), jnp.uint32))
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                         shapes, decode_state_shardings(mesh, shapes))
    return {"prefill": _prefill.lower(cfg, params, tokens, lengths, bucket),
            "decode loop": _decode.lower(cfg, settings, step_kind, False,
                                         _decode_params(cfg, params), state, rng)}


def lower_scoring(cfg: model.ModelConfig, params, rows: int, length: int, stats: tuple[str, ...],
                  mesh):
    """The teacher-forced scoring pass (`score_stats`) of `rows` sequences of `length` tokens,
    lowered for abstract `params` on `mesh`."""
    tokens = jax.ShapeDtypeStruct((rows, length), jnp.int32,
                                  sharding=NamedSharding(mesh, PartitionSpec()))
    return _score.lower(cfg, params, tokens, None, tuple(stats))


def _power_of_two(count: int, limit: int) -> int:
    """The smallest power of two >= count, at most `limit` (bounds the prefill compiles)."""
    return min(1 << (count - 1).bit_length(), limit)


def generate_all(cfg: model.ModelConfig, params, prompts: Sequence[Sequence[int]],
                 settings: Settings, batch_size: int, rng: Array | None = None) -> list[Decoded]:
    """`generate` for any number of prompts, `batch_size` at a time with continuous batching
    (`decode_all`); results in prompt order."""
    out = [None] * len(prompts)
    for index, result in decode_all(cfg, params, [[list(p)] for p in prompts], settings,
                                    batch_size, "plain", rng):
        out[index] = result
    return out


def generate(cfg: model.ModelConfig, params, prompts: Sequence[Sequence[int]],
             settings: Settings, rng: Array | None = None) -> list[Decoded]:
    """Decodes a continuation of each prompt (token id lists of any lengths) in one batch."""
    return generate_all(cfg, params, prompts, settings, len(prompts), rng)


def codecode_all(cfg: model.ModelConfig, params, reference_prompts: Sequence[Sequence[int]],
                 base_prompts: Sequence[Sequence[int]], settings: Settings, batch_size: int,
                 rng: Array | None = None) -> Iterator[tuple[int, Decoded]]:
    """Candidate co-decoding of every example with continuous batching: (index, Decoded) as
    each finishes."""
    if len(reference_prompts) != len(base_prompts):
        raise ValueError("one base prompt per reference prompt")
    examples = [[list(r), list(b)] for r, b in zip(reference_prompts, base_prompts)]
    return decode_all(cfg, params, examples, settings, batch_size, "codecode", rng)


def codecode(cfg: model.ModelConfig, params, reference_prompts: Sequence[Sequence[int]],
             base_prompts: Sequence[Sequence[int]], settings: Settings,
             rng: Array | None = None) -> list[Decoded]:
    """Candidate co-decoding of each example from its reference and base contexts, one batch."""
    out = [None] * len(reference_prompts)
    for index, result in codecode_all(cfg, params, reference_prompts, base_prompts, settings,
                                      len(reference_prompts), rng):
        out[index] = result
    return out


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


# Positions a scoring pass projects onto the vocabulary at a time: its float32 logits are rows x
# SCORE_CHUNK x V (32 x 128 x 49152 for SmolLM2: 0.8 GB; at 512 the rewrite's scoring pass of 32
# x 1280 tokens compiled to 6.0 GiB of temporaries on a CPU).
SCORE_CHUNK = 128
# Tokens a scoring pass holds at most where its caller chooses the rows (the rewrite's
# teacher-forced signals): XLA's attention keeps rows x heads x T x T float32 scores, 1.9 GB for
# SmolLM2's 32 x 1280-token pass, 0.7 GB for 12 rows.
SCORE_TOKENS = 16384


def scoring_rows(batch_size: int, length: int) -> int:
    """Rows of a scoring pass of `length`-token sequences: batch_size, fewer where that would
    hold more than SCORE_TOKENS tokens."""
    return max(1, min(batch_size, SCORE_TOKENS // length))


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
                              chunk=SCORE_CHUNK, stats=stats, queries=queries)
