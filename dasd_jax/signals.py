"""The per-token signals a rewrite records and the training step reads, each declared once.

A signal has one name everywhere: the key of a rewrite line (a list with one value per response
token), the key of a training batch (an array [B, T] whose position t scores token t + 1) and
the key of what decoding records (`sampling.Decoded.signals`). Everything that lists signals
(data, step, selection, sampling, rewrite, analyze, the tests and the benchmarks) derives its
list from `SIGNALS`, so a new signal is one line here.

    signals.TRAINED                      # the names a batch carries, in order
    signals.BATCH_DTYPES                 # batch key -> numpy dtype, masks and tokens included
    batch = signals.example_batch(4, 64, rng=0)         # a valid host batch (tests, benchmarks)

Rewrite files written before the names were unified hold "ref_logprobs" and "base_logprobs";
`canonical_key` reads them as "ref_logprob" and "base_logprob".
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class Signal:
    """One per-token signal: its name, dtype, the value where nothing was recorded, what
    produces it, what it means, and whether training batches carry it."""

    name: str
    dtype: str
    fill: float
    produced_by: str
    meaning: str
    trains: bool = True


SIGNALS = (
    Signal("ref_logprob", "float32", math.nan,
           "co-decoding; sdft decoding (its context is the reference's); a teacher-forced pass "
           "in the answer-aware context", "log πref(ŷ_t), the answer-aware reference's log-prob"),
    Signal("base_logprob", "float32", math.nan,
           "co-decoding; a teacher-forced pass in the plain context",
           "log π0(ŷ_t), the base's log-prob under the plain prompt"),
    Signal("base_top1", "float32", math.nan, "as base_logprob", "max_v π0(v)"),
    Signal("ref_logprob_base_choice", "float32", math.nan,
           "co-decoding; a teacher-forced pass in the answer-aware context",
           "log πref(v0), v0 = argmax π0: how acceptable the reference finds the base's choice"),
    Signal("ref_top1", "float32", math.nan, "as ref_logprob_base_choice", "log max_v πref(v)"),
    Signal("n_candidates", "int32", 0, "co-decoding", "|C_t|, the candidates co-decoding offered",
           trains=False),
)
BY_NAME = {signal.name: signal for signal in SIGNALS}
TRAINED = tuple(signal.name for signal in SIGNALS if signal.trains)
BASE = ("base_logprob", "base_top1")  # what `train.base_confidence="cached"` reads
MASKS = ("loss_mask", "fallback", "structural")  # bool [B, T] keys of a batch
BATCH_DTYPES = {"tokens": np.dtype(np.int32), "targets": np.dtype(np.int32),
                **{mask: np.dtype(bool) for mask in MASKS},
                **{name: np.dtype(BY_NAME[name].dtype) for name in TRAINED}}
BATCH_KEYS = tuple(BATCH_DTYPES)
LEGACY_KEYS = {"ref_logprobs": "ref_logprob", "base_logprobs": "base_logprob"}


def canonical_key(key: str) -> str:
    """The signal name of a record key, old rewrite files' plural names included."""
    return LEGACY_KEYS.get(key, key)


def empty(name: str, shape) -> np.ndarray:
    """An array of `shape` holding the signal's fill value (nothing recorded)."""
    signal = BY_NAME[name]
    return np.full(shape, signal.fill, signal.dtype)


def example_batch(batch_size: int, seq_len: int, *, rng: int = 0, vocab_size: int = 100,
                  prompt_share: float = 0.25, **values: float) -> dict[str, np.ndarray]:
    """A valid host batch (every key of BATCH_KEYS, with its dtype) for tests and benchmarks:
    random tokens, the first `prompt_share` of each row the prompt and the rest response
    targets, no fallback or structural token; each trained signal NaN, or the constant given
    as a keyword (`base_logprob=-1.0`)."""
    unknown = set(values) - set(TRAINED)
    if unknown:
        raise ValueError(f"unknown signals {sorted(unknown)}; the trained ones are {TRAINED}")
    shape = (batch_size, seq_len)
    tokens = np.random.default_rng(rng).integers(0, vocab_size, shape).astype(np.int32)
    batch = {"tokens": tokens, "targets": np.roll(tokens, -1, axis=1),
             "loss_mask": np.arange(seq_len)[None].repeat(batch_size, 0)
             >= int(seq_len * prompt_share),
             "fallback": np.zeros(shape, bool), "structural": np.zeros(shape, bool)}
    batch["loss_mask"][:, -1] = False
    for name in TRAINED:
        batch[name] = (np.full(shape, values[name], BATCH_DTYPES[name]) if name in values
                       else empty(name, shape))
    return batch
