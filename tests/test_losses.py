"""Chunked token statistics equal the naive full-vocabulary computation, at a fraction of the
memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dasd_jax import config_defaults, losses, model, sharding, step

B, T, D, V = 2, 37, 16, 101


@pytest.fixture(scope="module")
def inputs():
    keys = jax.random.split(jax.random.key(0), 3)
    hidden = jax.random.normal(keys[0], (B, T, D))
    kernel = jax.random.normal(keys[1], (D, V)) * 0.5
    targets = jax.random.randint(keys[2], (B, T), 0, V)
    return hidden, kernel, targets


def naive_stats(hidden, kernel, targets, queries):
    logits = jnp.einsum("btd,dv->btv", hidden, kernel).astype(jnp.float32)
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    probs = jnp.exp(logprobs)
    return {"logprob": jnp.take_along_axis(logprobs, targets[..., None], -1)[..., 0],
            "query_logprob": jnp.take_along_axis(logprobs, queries[..., None], -1)[..., 0],
            "top1": jnp.max(probs, -1), "top1_logprob": jnp.max(logprobs, -1),
            "argmax": jnp.argmax(logits, -1), "entropy": -jnp.sum(probs * logprobs, -1)}


@pytest.mark.slow
@pytest.mark.parametrize("chunk", [1, 8, 16, 37, 0])
def test_chunked_stats_equal_the_naive_computation(inputs, chunk):
    queries = jnp.roll(inputs[2], 3, axis=1)
    got = losses.token_stats(*inputs, chunk=chunk, stats=losses.STATS, queries=queries)
    expected = naive_stats(*inputs, queries)
    for name in losses.STATS:
        np.testing.assert_allclose(got[name], expected[name], atol=1e-5, rtol=1e-5)
    assert got["argmax"].dtype == jnp.int32


@pytest.mark.slow
def test_chunked_masked_loss_has_the_naive_value_and_gradient(inputs):
    hidden, kernel, targets = inputs
    weights = (jax.random.uniform(jax.random.key(4), (B, T)) > 0.4).astype(jnp.float32)

    def loss(hidden, kernel, chunk):
        if chunk:
            logprob = losses.token_stats(hidden, kernel, targets, chunk=chunk)["logprob"]
        else:
            logprob = naive_stats(hidden, kernel, targets, targets)["logprob"]
        return losses.masked_cross_entropy(logprob, weights, jnp.sum(weights))

    value, grads = jax.value_and_grad(loss, argnums=(0, 1))(hidden, kernel, 8)
    naive_value, naive_grads = jax.value_and_grad(loss, argnums=(0, 1))(hidden, kernel, 0)
    np.testing.assert_allclose(value, naive_value, rtol=1e-5)
    for got, expected in zip(grads, naive_grads):
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_masked_cross_entropy_of_nothing_selected_is_zero_not_nan():
    value = losses.masked_cross_entropy(jnp.full((2, 3), -5.0), jnp.zeros((2, 3)), jnp.zeros(()))
    assert float(value) == 0.0
    grad = jax.grad(lambda lp: losses.masked_cross_entropy(lp, jnp.zeros((2, 3)), jnp.zeros(())))(
        jnp.full((2, 3), -5.0))
    assert not np.any(np.isnan(grad))


@pytest.mark.slow
def test_a_step_with_a_152k_vocabulary_needs_less_memory_chunked():
    cfg = model.ModelConfig(model_type="qwen2", vocab_size=151936, hidden_size=16,
                            intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                            head_dim=8, qkv_bias=True, tie_word_embeddings=True)
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])

    def temp_bytes(chunk):
        config = config_defaults.base_config()
        config.model.compute_dtype = "float32"
        config.train.update(steps=10, warmup_steps=1, batch_size=2, loss_chunk=chunk)
        config.data.update(max_seq_len=256, buckets=(256,))
        run = step.setup(config, cfg, mesh)
        compiled = run.train_step.lower(*run.abstract_inputs(2, 256)).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    naive, chunked = temp_bytes(0), temp_bytes(32)
    full_logits = 2 * 256 * 151936 * 4
    assert naive > full_logits  # the naive step holds [B, T, V] float32 at least once
    assert chunked < naive / 4
