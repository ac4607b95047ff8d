"""Selection rules on small hand-built arrays, with the expected masks written out by hand."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dasd_jax import selection
from dasd_jax.errors import UserError

NAN = float("nan")


def config(**overrides):
    """The hand-built cases below were written for the base_unsure test (m < gamma); the veto
    test has its own cases (R)."""
    base = dict(rule="dasd", tau=0.1, tau_quantile=None, tau_min=0.01, tau_max=0.5, kappa=0.5,
                gamma=0.5, confidence_model="base", rho1_keep=0.5, missing_ref="drop",
                correction_test="base_unsure", rho=0.1, fallback="rule", keep_structural=True)
    return ml_collections.ConfigDict({**base, **overrides})


# One sequence of 8 positions: 0-1 prompt, 2-6 response, 7 padding.
MASK = jnp.array([[0, 0, 1, 1, 1, 1, 1, 0]], bool)
B = jnp.array([[0.9, 0.01, 0.8, 0.05, 0.02, 0.03, 0.3, 0.001]])   # base prob of the target
M = jnp.array([[0.9, 0.9, 0.8, 0.3, 0.9, 0.2, 0.3, 0.9]])         # base top-1 prob
Q = jnp.array([[0.9, 0.9, 0.9, 0.9, 0.9, 0.1, 0.9, 0.9]])         # answer-aware reference prob
TRAINEE = jnp.array([[0.5, 0.5, 0.7, 0.01, 0.5, 0.02, 0.2, 0.5]])


def signals(q=Q, mask=MASK):
    return selection.Signals(
        loss_mask=mask, base_logprob=jnp.log(B), base_top1=M, ref_logprob=jnp.log(q),
        trainee_logprob=jnp.log(TRAINEE), trainee_top1=jnp.full(B.shape, 0.9))


def as_list(weights):
    return np.asarray(weights).astype(float).tolist()[0]


def test_dasd_keeps_aligned_tokens_and_logical_corrections_and_drops_drift():
    # pos 2: b=.8 aligned; 3: b=.05, q=.9, m=.3 correction; 4: m=.9 drift (base prefers another
    # token); 5: q=.1 drift (reference unsure); 6: b=.3 aligned. Prompt and padding: never.
    groups = selection.categories(signals(), config())
    assert as_list(groups["aligned"]) == [0, 0, 1, 0, 0, 0, 1, 0]
    assert as_list(groups["correction"]) == [0, 0, 0, 1, 0, 0, 0, 0]
    assert as_list(groups["drift"]) == [0, 0, 0, 0, 1, 1, 0, 0]
    assert as_list(selection.select("dasd", signals(), config())) == [0, 0, 1, 1, 0, 0, 1, 0]


def test_ppl_filter_keeps_only_confident_tokens():
    assert as_list(selection.select("ppl_filter", signals(), config())) == [0, 0, 1, 0, 0, 0, 1, 0]


def test_all_keeps_every_response_token_and_nothing_else():
    assert as_list(selection.select("all", signals(), config())) == [0, 0, 1, 1, 1, 1, 1, 0]


def test_tokens_without_a_reference_probability_follow_missing_ref():
    no_q = jnp.full(Q.shape, NAN)
    assert as_list(selection.select("dasd", signals(no_q), config())) == [0, 0, 1, 0, 0, 0, 1, 0]
    kept = selection.select("dasd", signals(no_q), config(missing_ref="keep"))
    assert as_list(kept) == [0, 0, 1, 1, 1, 1, 1, 0]


def test_tau_quantile_is_taken_over_response_tokens_and_clipped():
    # Response confidences sorted: .02 .03 .05 .3 .8; the 0.5 quantile is .05.
    groups = selection.categories(signals(), config(tau_quantile=0.5))
    assert float(groups["tau"]) == pytest.approx(0.05)
    assert as_list(groups["aligned"]) == [0, 0, 1, 1, 0, 0, 1, 0]
    clipped = selection.categories(signals(), config(tau_quantile=0.0, tau_min=0.04))
    assert float(clipped["tau"]) == pytest.approx(0.04)
    clipped = selection.categories(signals(), config(tau_quantile=1.0, tau_max=0.25))
    assert float(clipped["tau"]) == pytest.approx(0.25)


def test_confidence_from_the_current_trainee():
    # trainee probs on the response: .7 .01 .5 .02 .2; with top-1 .9 no token is a correction.
    weights = selection.select("dasd", signals(), config(confidence_model="current"))
    assert as_list(weights) == [0, 0, 1, 0, 1, 0, 1, 0]


def test_rho1_keeps_the_tokens_with_the_highest_excess_loss():
    # excess = log b - log p_trainee on positions 2..6: log(.8/.7) log(.05/.01) log(.02/.5)
    # log(.03/.02) log(.3/.2) -> .13 1.61 -3.2 .41 .41; keep round(.5 * 5) = 2 (ties by position).
    assert as_list(selection.select("rho1", signals(), config())) == [0, 0, 0, 1, 0, 1, 0, 0]


def test_dft_weights_tokens_by_the_trainee_probability_without_gradient():
    weights = selection.select("dft", signals(), config())
    np.testing.assert_allclose(as_list(weights), [0, 0, .7, .01, .5, .02, .2, 0], rtol=1e-6)
    grad = jax.grad(lambda lp: jnp.sum(selection.select(
        "dft", signals()._replace(trainee_logprob=lp), config())))(jnp.log(TRAINEE))
    assert float(jnp.max(jnp.abs(grad))) == 0.0


@pytest.mark.slow
def test_random_keeps_as_many_tokens_as_dasd_at_random_positions():
    mask = jnp.ones((4, 64), bool)
    rng = np.random.default_rng(0)
    sig = selection.Signals(loss_mask=mask, base_logprob=jnp.log(rng.uniform(0, 1, (4, 64))),
                            base_top1=jnp.full((4, 64), 0.9), ref_logprob=jnp.full((4, 64), NAN))
    dasd = selection.select("dasd", sig, config())
    first = selection.select("random", sig, config(), jax.random.PRNGKey(0))
    second = selection.select("random", sig, config(), jax.random.PRNGKey(1))
    assert float(first.sum()) == float(dasd.sum()) == float(second.sum())
    assert not np.array_equal(first, second) and not np.array_equal(first, dasd)


def test_random_never_selects_prompt_or_padding():
    weights = selection.select("random", signals(), config(), jax.random.PRNGKey(3))
    assert float(weights.sum()) == 3.0
    assert float(jnp.sum(jnp.where(MASK, 0.0, weights))) == 0.0


def test_everything_dropped_is_an_empty_mask_not_nan():
    hopeless = signals(q=jnp.full(Q.shape, 0.01))._replace(
        base_logprob=jnp.log(jnp.full(B.shape, 1e-4)))
    weights = selection.select("dasd", hopeless, config())
    assert float(weights.sum()) == 0.0 and not np.any(np.isnan(weights))


def test_a_batch_without_response_tokens_selects_nothing():
    empty = jnp.zeros(MASK.shape, bool)
    for rule in ("all", "dasd", "ppl_filter", "rho1", "dft"):
        weights = selection.select(rule, signals(mask=empty), config(tau_quantile=0.3))
        assert float(weights.sum()) == 0
    weights = selection.select("random", signals(mask=empty), config(), jax.random.PRNGKey(0))
    assert float(weights.sum()) == 0


def test_rules_are_jit_safe():
    fn = jax.jit(lambda s, k: selection.select("random", s, config(tau_quantile=0.5), k))
    assert fn(signals(), jax.random.PRNGKey(0)).shape == MASK.shape


@pytest.mark.parametrize("field, value, message", [
    ("rule", "most", "rule='most' is not one of all, dasd"),
    ("confidence_model", "teacher", "confidence_model must be 'base' or 'current'"),
    ("missing_ref", "guess", "missing_ref must be 'drop' or 'keep'"),
    ("tau_min", 0.9, "tau_min <= --config.selection.tau_max"),
    ("rho1_keep", 0.0, "rho1_keep must lie in"),
    ("correction_test", "gamma", "correction_test='gamma' is not one of veto"),
    ("fallback", "keep", "fallback='keep' is not one of rule, ppl_filter, drop, all"),
])
def test_bad_selection_settings_name_the_flag(field, value, message):
    with pytest.raises(UserError, match=message):
        selection.validate(config(**{field: value}))


# The veto test: r = πref(v0) / max πref, v0 the base's own choice. On the response positions
# 2..6: r = .05 (vetoed), .5 (the base's choice is acceptable), .05, .05, .05.
R = jnp.array([[1.0, 1.0, 1.0, 0.05, 0.5, 0.05, 0.05, 1.0]])


def veto_signals(r=R, **fields):
    ref_top1 = jnp.log(jnp.full(R.shape, 0.9))
    return signals()._replace(ref_logprob_base_choice=ref_top1 + jnp.log(r), ref_top1=ref_top1,
                              **fields)


def test_the_veto_test_keeps_a_high_ppl_token_where_the_reference_rules_out_the_base_choice():
    # pos 3: b=.05, q=.9, r=.05 < rho: correction. 4: r=.5: the base's own choice was fine,
    # drift (although m=.9 — confidently wrong is no obstacle, unlike base_unsure). 5: q=.1 drift.
    groups = selection.categories(veto_signals(), config(correction_test="veto"))
    assert as_list(groups["correction"]) == [0, 0, 0, 1, 0, 0, 0, 0]
    assert as_list(groups["drift"]) == [0, 0, 0, 0, 1, 1, 0, 0]
    confidently_wrong = veto_signals(r=jnp.where(jnp.arange(8) == 4, 0.05, R))
    kept = selection.select("dasd", confidently_wrong, config(correction_test="veto"))
    assert as_list(kept) == [0, 0, 1, 1, 1, 0, 1, 0]  # pos 4: m=.9, yet vetoed: kept
    kept = selection.select("dasd", confidently_wrong, config())
    assert as_list(kept) == [0, 0, 1, 1, 0, 0, 1, 0]


def test_rho_sets_how_firmly_the_reference_must_rule_the_base_choice_out():
    kept = selection.select("dasd", veto_signals(), config(correction_test="veto", rho=0.6))
    assert as_list(kept) == [0, 0, 1, 1, 1, 0, 1, 0]  # r=.5 < .6 now counts too


def test_reference_confident_needs_q_alone():
    kept = selection.select("dasd", veto_signals(), config(correction_test="reference_confident"))
    assert as_list(kept) == [0, 0, 1, 1, 1, 0, 1, 0]


def test_without_the_veto_signals_a_high_ppl_token_follows_missing_ref():
    old_file = signals()  # q recorded, r not (a rewrite file from before the veto test)
    dropped = selection.select("dasd", old_file, config(correction_test="veto"))
    assert as_list(dropped) == [0, 0, 1, 0, 0, 0, 1, 0]
    kept = selection.select("dasd", old_file, config(correction_test="veto", missing_ref="keep"))
    assert as_list(kept) == [0, 0, 1, 1, 1, 1, 1, 0]


FALLBACK = jnp.array([[0, 0, 1, 1, 1, 1, 1, 0]], bool)  # the whole line fell back


@pytest.mark.parametrize("mode, expected", [
    ("rule", [0, 0, 1, 1, 0, 0, 1, 0]), ("ppl_filter", [0, 0, 1, 0, 0, 0, 1, 0]),
    ("drop", [0, 0, 0, 0, 0, 0, 0, 0]), ("all", [0, 0, 1, 1, 1, 1, 1, 0])])
def test_fallback_lines_train_as_selection_fallback_says(mode, expected):
    weights = selection.select("dasd", veto_signals(fallback=FALLBACK),
                               config(correction_test="veto", fallback=mode))
    assert as_list(weights) == expected
    other_line = veto_signals(fallback=jnp.zeros_like(FALLBACK))
    assert as_list(selection.select("dasd", other_line, config(correction_test="veto",
                                                                fallback=mode))) == expected_rule


expected_rule = [0, 0, 1, 1, 0, 0, 1, 0]
STRUCTURAL = jnp.array([[0, 0, 0, 0, 0, 1, 1, 0]], bool)  # pos 5: the end-of-turn token, 6: "\n"


@pytest.mark.parametrize("rule", ["dasd", "ppl_filter", "rho1", "random"])
def test_every_selecting_rule_keeps_the_structural_tokens(rule):
    sig = veto_signals(structural=STRUCTURAL)
    weights = as_list(selection.select(rule, sig, config(correction_test="veto"),
                                       jax.random.PRNGKey(0)))
    assert weights[5] == weights[6] == 1.0
    if rule in ("dasd", "ppl_filter"):
        off = as_list(selection.select(rule, sig, config(correction_test="veto",
                                                         keep_structural=False)))
        assert off[5] == 0.0  # b=.03, q=.1: drift like any other token


def test_structural_tokens_are_a_category_of_their_own():
    groups = selection.categories(veto_signals(structural=STRUCTURAL),
                                  config(correction_test="veto"))
    assert as_list(groups["structural"]) == [0, 0, 0, 0, 0, 1, 1, 0]
    parts = sum(np.asarray(groups[c], int)
                for c in ("aligned", "correction", "drift", "structural"))
    assert parts.tolist() == [np.asarray(MASK, int).tolist()[0]]
