"""Token signals -> selection weights: the DASD rule and every baseline (pure jnp, jit-safe).

All arrays share one shape (`[B, T]`, or `[A, B, T]` with micro-batches); per-batch statistics
(the τ quantile, the rho1 and random keep counts) are taken over every response token passed in.

The DASD rule (docs/method.md), with confidence `b_t = π(ŷ_t)` and top-1 probability
`m_t = max_v π(v)` from the frozen base (or the trainee, `confidence_model="current"`), and from
the rewrite `q_t = πref(ŷ_t)` and `r_t = πref(v0_t) / max_v πref(v)`, where `v0_t = argmax π0`
is what the base itself would have written:

    aligned     b_t ≥ τ                                       keep
    correction  b_t < τ  and  q_t ≥ κ  and  the test below    keep   (knowledge the base lacks)
    drift       any other b_t < τ                             drop   (style, or no evidence)

`correction_test`: "veto" (default) r_t < ρ, the answer-aware reference rules out the base's own
choice (ρ defaults to the rewrite's α: exactly where co-decoding's candidate set excludes v0);
"base_unsure" m_t < γ, the base had no strong competing preference; "reference_confident" no
further test.

Records without the test's signals (plain references; old rewrite files lack r): a high-PPL
token has no evidence that the reference wanted it. `missing_ref="drop"` (default) treats it as
drift, so on such tokens DASD is exactly `ppl_filter`; `missing_ref="keep"` treats it as a
correction, so there DASD is `all`. Signals that are NaN count as absent.

Fallback lines (`fallback`, records whose rewrite fell back to the reference): under `dasd`
and `random`, `fallback="rule"` treats them like any line, "ppl_filter" keeps their aligned
tokens only, "drop" none, "all" every one. Structural tokens (the target's end-of-turn /
end-of-sequence tokens and what follows them, `structural`) are kept by every selecting rule
(`dasd`, `ppl_filter`, `rho1`, `random`) when `keep_structural`, and are then no category's.

Baselines (same signals, same step): `all` keeps every response token; `ppl_filter` keeps
aligned tokens only; `rho1` keeps the top `rho1_keep` fraction by excess loss
`L_θ − L_θ0 = log π0(ŷ_t) − log πθ(ŷ_t)`; `dft` weights each token by `sg(πθ(ŷ_t))`; `random`
keeps a uniformly random subset of exactly as many tokens as `dasd` keeps on the same batch.
Prompt and padding tokens (`loss_mask` False) never get weight.
"""

from __future__ import annotations

import collections
from typing import Any

import jax
import jax.numpy as jnp

from dasd_jax import signals
from dasd_jax.errors import UserError

Array = jax.Array
RULES = ("all", "dasd", "ppl_filter", "rho1", "dft", "random")
CORRECTION_TESTS = ("veto", "base_unsure", "reference_confident")
FALLBACKS = ("rule", "ppl_filter", "drop", "all")


TRAINEE = ("trainee_logprob", "trainee_top1")  # the current trainee's, computed in the step
Signals = collections.namedtuple(
    "Signals", (*signals.MASKS, *signals.TRAINED, *TRAINEE),
    defaults=(None,) * (len(signals.MASKS) + len(signals.TRAINED) + len(TRAINEE) - 1))
Signals.__doc__ = """Per-token inputs to selection, all of one shape; `None` where not computed.

loss_mask: bool, True on response targets (never on prompt or padding); fallback / structural:
bool, response targets of a fallback line / structural targets; every trained signal of
`dasd_jax/signals.py` (ref_logprob, base_logprob, base_top1, ref_logprob_base_choice, ref_top1:
float32, NaN where none was recorded; base_* from the frozen base forward or the records);
trainee_logprob / trainee_top1: log πθ(ŷ_t) and max_v πθ(v) of the current trainee, without
gradient."""


def validate(config: Any) -> None:
    """Raises UserError naming the bad `config.selection` field."""
    if config.rule not in RULES:
        raise UserError(f"--config.selection.rule={config.rule!r} is not one of {', '.join(RULES)}")
    if config.confidence_model not in ("base", "current"):
        raise UserError("--config.selection.confidence_model must be 'base' or 'current', "
                        f"not {config.confidence_model!r}")
    if config.missing_ref not in ("drop", "keep"):
        raise UserError(f"--config.selection.missing_ref must be 'drop' or 'keep', "
                        f"not {config.missing_ref!r}")
    if not 0.0 <= config.tau_min <= config.tau_max <= 1.0:
        raise UserError("need 0 <= --config.selection.tau_min <= --config.selection.tau_max <= 1")
    if config.tau_quantile is not None and not 0.0 <= config.tau_quantile <= 1.0:
        raise UserError("--config.selection.tau_quantile must lie in [0, 1]")
    if not 0.0 < config.rho1_keep <= 1.0:
        raise UserError("--config.selection.rho1_keep must lie in (0, 1]")
    if config.correction_test not in CORRECTION_TESTS:
        raise UserError(f"--config.selection.correction_test={config.correction_test!r} is not "
                        f"one of {', '.join(CORRECTION_TESTS)}")
    if config.correction_test == "veto" and not (
            isinstance(config.rho, (int, float)) and 0.0 < config.rho <= 1.0):
        raise UserError(f"--config.selection.rho={config.rho!r} must lie in (0, 1] (unset: the "
                        "rewrite's alpha, resolved by the stage before the step is built)")
    if config.fallback not in FALLBACKS:
        raise UserError(f"--config.selection.fallback={config.fallback!r} is not one of "
                        f"{', '.join(FALLBACKS)}")


def needs(rule: str, config: Any) -> frozenset[str]:
    """Which models' signals `rule` needs: a subset of {"base", "trainee"}."""
    confidence = "trainee" if config.confidence_model == "current" else "base"
    return frozenset({
        "all": (),
        "dasd": (confidence,),
        "ppl_filter": (confidence,),
        "random": (confidence,),
        "rho1": ("base", "trainee"),
        "dft": ("trainee",),
    }[rule])


def _confidence(signals: Signals, config: Any) -> tuple[Array, Array]:
    """(b, m): probability of the target and top-1 probability under the confidence model."""
    if config.confidence_model == "current":
        return jnp.exp(signals.trainee_logprob), signals.trainee_top1
    return jnp.exp(signals.base_logprob), signals.base_top1


def threshold(confidence: Array, loss_mask: Array, config: Any) -> Array:
    """τ: `config.tau`, or the `tau_quantile` quantile of confidence over response tokens,
    clipped to [tau_min, tau_max] (tau_max when the batch has no response token)."""
    if config.tau_quantile is None:
        return jnp.asarray(config.tau, jnp.float32)
    values = jnp.where(loss_mask, confidence, jnp.nan)
    quantile = jnp.nanquantile(values, config.tau_quantile)
    quantile = jnp.where(jnp.any(loss_mask), quantile, config.tau_max)
    return jnp.clip(quantile, config.tau_min, config.tau_max).astype(jnp.float32)


def _absent(values: Array | None, shape) -> Array:
    return jnp.full(shape, jnp.nan) if values is None else values


def categories(signals: Signals, config: Any) -> dict[str, Array]:
    """bool masks `aligned`, `correction`, `drift`, `structural` (a partition of the response
    tokens; `structural` is empty unless `keep_structural`) and `tau` (over the others)."""
    mask = signals.loss_mask
    structural = _structural(signals, config)
    content = mask & ~structural
    confidence, top1 = _confidence(signals, config)
    tau = threshold(confidence, content, config)
    aligned = content & (confidence >= tau)
    high_ppl = content & ~aligned
    ref = _absent(signals.ref_logprob, mask.shape)
    evidence = ~jnp.isnan(ref)
    if config.correction_test == "veto":
        choice = _absent(signals.ref_logprob_base_choice, mask.shape)
        ref_top1 = _absent(signals.ref_top1, mask.shape)
        evidence &= ~jnp.isnan(choice) & ~jnp.isnan(ref_top1)
        test = jnp.where(evidence, choice - ref_top1, 0.0) < jnp.log(config.rho)
    elif config.correction_test == "base_unsure":
        test = top1 < config.gamma
    else:
        test = jnp.ones_like(mask)
    reference_confident = evidence & (jnp.exp(jnp.where(evidence, ref, -jnp.inf)) >= config.kappa)
    correction = high_ppl & reference_confident & test
    if config.missing_ref == "keep":
        correction = correction | (high_ppl & ~evidence)
    return {"aligned": aligned, "correction": correction, "drift": high_ppl & ~correction,
            "structural": structural, "tau": tau}


def keep_top(scores: Array, mask: Array, count: Array) -> Array:
    """bool mask of the `count` highest-scoring tokens where `mask` (ties broken by position)."""
    flat = jnp.where(mask, scores, -jnp.inf).reshape(-1)
    order = jnp.argsort(-flat, stable=True)
    ranks = jnp.zeros_like(order).at[order].set(jnp.arange(order.size, dtype=order.dtype))
    return (ranks.reshape(mask.shape) < count) & mask


def select(rule: str, signals: Signals, config: Any, rng: Array | None = None) -> Array:
    """float32 per-token loss weights for `rule` (see the module docstring); 0 off the response.

    rng: a PRNG key, needed by `random` only.
    """
    mask = signals.loss_mask
    if rule == "all":
        weights = mask
    elif rule in ("dasd", "ppl_filter", "random"):
        groups = categories(signals, config)
        content = mask & ~groups["structural"]
        dasd = _with_fallback(groups["aligned"] | groups["correction"], groups, content,
                              signals.fallback, config.fallback)
        if rule == "dasd":
            weights = dasd
        elif rule == "ppl_filter":
            weights = groups["aligned"]
        else:
            if rng is None:
                raise ValueError("the random rule needs an rng key")
            noise = jax.random.uniform(rng, mask.shape)
            weights = keep_top(noise, content, jnp.sum(dasd))
        weights = weights | groups["structural"]
    elif rule == "rho1":
        structural = _structural(signals, config)
        content = mask & ~structural
        excess = signals.base_logprob - signals.trainee_logprob
        count = jnp.round(config.rho1_keep * jnp.sum(content)).astype(jnp.int32)
        weights = keep_top(excess, content, count) | structural
    elif rule == "dft":
        weights = jnp.where(mask, jax.lax.stop_gradient(jnp.exp(signals.trainee_logprob)), 0.0)
    else:
        raise UserError(f"--config.selection.rule={rule!r} is not one of {', '.join(RULES)}")
    return jnp.asarray(weights, jnp.float32)


def _structural(signals: Signals, config: Any) -> Array:
    if not config.keep_structural or signals.structural is None:
        return jnp.zeros_like(signals.loss_mask)
    return signals.loss_mask & signals.structural


def _with_fallback(kept: Array, groups: dict, content: Array, fallback: Array | None,
                   mode: str) -> Array:
    """`kept` with the tokens of fallback lines chosen by `mode` (selection.fallback)."""
    if fallback is None or mode == "rule":
        return kept
    lines = fallback & content
    chosen = {"ppl_filter": groups["aligned"], "drop": jnp.zeros_like(kept), "all": content}[mode]
    return jnp.where(lines, chosen, kept)
