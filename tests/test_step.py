"""The jitted train step: same results on every mesh, with micro-batches, for every rule."""

import jax
import numpy as np
import pytest

from dasd_jax import config_defaults, model, selection, sharding, signals, step

CFG = model.ModelConfig(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
BATCH, LENGTH = 8, 24


def make_config(rule="dasd", **train):
    config = config_defaults.base_config()
    config.model.compute_dtype = "float32"
    config.train.update(steps=20, warmup_steps=2, batch_size=BATCH, learning_rate=1e-2,
                        loss_chunk=8, base_dtype="float32", **train)
    config.selection.update(rule=rule, tau_quantile=0.5, tau_min=0.0)
    return config


def make_batch(seed=0):
    """signals.example_batch with varied prompt and response lengths, recorded reference
    signals on half the tokens and a structural token at each response's end."""
    rng = np.random.default_rng(seed)
    batch = signals.example_batch(BATCH, LENGTH, rng=seed, vocab_size=CFG.vocab_size, ref_top1=0.0)
    prompt = rng.integers(3, 10, (BATCH, 1))
    length = rng.integers(15, LENGTH, (BATCH, 1))
    position = np.arange(LENGTH)[None]
    recorded = rng.uniform(size=(BATCH, LENGTH)) < 0.5
    ref = np.where(recorded, np.log(rng.uniform(size=(BATCH, LENGTH))), np.nan)
    batch.update(loss_mask=(position >= prompt) & (position < length - 1),
                 ref_logprob=ref.astype(np.float32),
                 ref_logprob_base_choice=(ref - rng.uniform(0, 3, (BATCH, LENGTH))
                                          ).astype(np.float32),
                 structural=(position == length - 2) & np.ones((BATCH, 1), bool))
    return batch


@pytest.fixture(scope="module")
def initial_params():
    return model.init(CFG, jax.random.key(0))


def run_steps(config, params, mesh, steps=3):
    run = step.setup(config, CFG, mesh)
    state, base = run.init_state(params), run.base_params(params)
    history = []
    for i in range(steps):
        state, metrics = run.train_step(state, base, run.place(make_batch(i)))
        history.append(jax.device_get(metrics))
    return state, history


@pytest.fixture(scope="module")
def single_device_run(initial_params):
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    return run_steps(make_config(), initial_params, mesh)


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)])
def test_every_mesh_gives_the_single_device_losses_and_params(shape, initial_params,
                                                              single_device_run):
    expected_state, expected_history = single_device_run
    state, history = run_steps(make_config(), initial_params, sharding.make_mesh(shape))
    for got, expected in zip(history, expected_history):
        for name in ("loss", "kept_ratio", "grad_norm", "aligned", "correction"):
            np.testing.assert_allclose(got[name], expected[name], atol=1e-5, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
                 jax.device_get(state.params), jax.device_get(expected_state.params))
    q_kernel = state.params["layers"]["self_attn"]["q_proj"]["kernel"]
    assert len({s.device for s in q_kernel.addressable_shards}) == 8


@pytest.mark.slow
def test_micro_batches_change_memory_not_results(initial_params, single_device_run):
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    state, history = run_steps(make_config(micro_batches=4), initial_params, mesh)
    expected_state, expected_history = single_device_run
    for got, expected in zip(history, expected_history):
        np.testing.assert_allclose(got["loss"], expected["loss"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
                 jax.device_get(state.params), jax.device_get(expected_state.params))


@pytest.mark.slow
@pytest.mark.parametrize("rule", selection.RULES)
def test_every_rule_trains_and_reports_its_metrics(rule, initial_params):
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    state, history = run_steps(make_config(rule), initial_params, mesh, steps=2)
    metrics = history[-1]
    assert int(state.step) == 2 and np.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0
    assert 0 < metrics["kept_ratio"] <= 1
    if "base" in selection.needs(rule, make_config(rule).selection):
        categories = ("aligned", "correction", "drift", "structural")
        assert {"high_ppl_10", "high_ppl_100", "kept_high_ppl", *categories} <= set(metrics)
        np.testing.assert_allclose(sum(metrics[c] for c in categories), 1, rtol=1e-6)
        assert metrics["structural"] > 0 and metrics["kept_ratio"] >= metrics["structural"]


def test_sft_skips_the_base_forward(initial_params):
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    assert step.setup(make_config("all"), CFG, mesh).base_params(initial_params) is None
    assert step.setup(make_config("dasd"), CFG, mesh).base_params(initial_params) is not None


@pytest.mark.slow
def test_cached_base_confidence_is_read_from_the_batch(initial_params):
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    config = make_config("dasd", base_confidence="cached")
    config.selection.update(tau_quantile=None, keep_structural=False)
    run = step.setup(config, CFG, mesh)
    assert run.base_params(initial_params) is None
    batch = make_batch()
    confident = np.zeros_like(batch["base_logprob"])  # b = 1 everywhere: all aligned
    batch.update(base_logprob=confident, base_top1=np.ones_like(confident))
    state = run.init_state(initial_params)
    _, metrics = run.train_step(state, None, run.place(batch))
    assert float(metrics["aligned"]) == 1.0 and float(metrics["kept_ratio"]) == 1.0


@pytest.mark.slow
def test_nothing_selected_gives_zero_loss_and_no_update(initial_params):
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    config = make_config("ppl_filter")
    config.selection.update(tau_quantile=None, tau=1.0, keep_structural=False)
    state, history = run_steps(config, initial_params, mesh, steps=1)
    assert float(history[0]["loss"]) == 0.0 and float(history[0]["kept_ratio"]) == 0.0
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params),
                 jax.device_get(initial_params))


@pytest.mark.slow
def test_eval_step_reports_the_train_step_loss_without_updating(initial_params):
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    config = make_config("dasd")
    run = step.setup(config, CFG, mesh)
    state, base = run.init_state(initial_params), run.base_params(initial_params)
    batch = run.place(make_batch())
    evaluated = run.eval_step(state, base, batch)
    _, trained = run.train_step(state, base, batch)
    np.testing.assert_allclose(evaluated["loss"], trained["loss"], rtol=1e-6)


@pytest.mark.slow
def test_a_step_with_a_non_finite_gradient_skips_its_update_and_says_so(initial_params):
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    config = make_config()
    broken = jax.tree.map(lambda x: x, initial_params)
    broken["norm"]["scale"] = broken["norm"]["scale"].at[0].set(np.inf)
    state, metrics = run_steps(config, broken, mesh, steps=1)
    assert metrics[0]["nonfinite"] == 1.0 and not np.isfinite(metrics[0]["grad_norm"])
    same = jax.tree.map(lambda a, b: np.array_equal(a, b, equal_nan=True),
                        jax.device_get(state.params), jax.device_get(broken))
    assert all(jax.tree.leaves(same)) and int(state.step) == 1
    assert run_steps(config, initial_params, mesh, steps=1)[1][0]["nonfinite"] == 0.0
