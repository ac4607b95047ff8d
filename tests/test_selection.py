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
    base = dict(rule="dasd", tau=0.1, tau_quantile=None, tau_min=0.01, tau_max=0.5, kappa=0.5,
                gamma=0.5, confidence_model="base", rho1_keep=0.5, missing_ref="drop")
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
    hopeless = signals(q=jnp.full(Q.shape, 0.01))._replace(base_logprob=jnp.log(jnp.full(B.shape, 1e-4)))
    weights = selection.select("dasd", hopeless, config())
    assert float(weights.sum()) == 0.0 and not np.any(np.isnan(weights))


def test_a_batch_without_response_tokens_selects_nothing():
    empty = jnp.zeros(MASK.shape, bool)
    for rule in ("all", "dasd", "ppl_filter", "rho1", "dft"):
        assert float(selection.select(rule, signals(mask=empty), config(tau_quantile=0.3)).sum()) == 0
    assert float(selection.select("random", signals(mask=empty), config(), jax.random.PRNGKey(0)).sum()) == 0


def test_rules_are_jit_safe():
    fn = jax.jit(lambda s, k: selection.select("random", s, config(tau_quantile=0.5), k))
    assert fn(signals(), jax.random.PRNGKey(0)).shape == MASK.shape


@pytest.mark.parametrize("field, value, message", [
    ("rule", "most", "rule='most' is not one of all, dasd"),
    ("confidence_model", "teacher", "confidence_model must be 'base' or 'current'"),
    ("missing_ref", "guess", "missing_ref must be 'drop' or 'keep'"),
    ("tau_min", 0.9, "tau_min <= --config.selection.tau_max"),
    ("rho1_keep", 0.0, "rho1_keep must lie in"),
])
def test_bad_selection_settings_name_the_flag(field, value, message):
    with pytest.raises(UserError, match=message):
        selection.validate(config(**{field: value}))
