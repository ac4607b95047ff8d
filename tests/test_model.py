"""Decoder behaviour that does not need a transformers reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

from dasd_jax import model

CFG = model.ModelConfig(model_type="qwen3", vocab_size=97, hidden_size=64, intermediate_size=96,
                        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32, qk_norm=True,
                        rope_theta=12345.0)


forward = jax.jit(model.forward, static_argnums=0)


@pytest.fixture(scope="module")
def params():
    return model.init(CFG, jax.random.key(0))


@pytest.mark.slow
def test_packed_sequences_equal_each_sequence_run_alone(params):
    rng = np.random.default_rng(0)
    first, second = rng.integers(0, CFG.vocab_size, 37), rng.integers(0, CFG.vocab_size, 27)
    packed = jnp.asarray(np.concatenate([first, second, [0, 0]])[None], jnp.int32)
    segments = jnp.asarray([[1] * 37 + [2] * 27 + [0, 0]], jnp.int32)

    packed_logits = forward(CFG, params, packed, segment_ids=segments)
    alone_first = forward(CFG, params, jnp.asarray(first[None], jnp.int32))
    alone_second = forward(CFG, params, jnp.asarray(second[None], jnp.int32))
    np.testing.assert_allclose(packed_logits[0, :37], alone_first[0], atol=1e-5)
    np.testing.assert_allclose(packed_logits[0, 37:64], alone_second[0], atol=1e-5)
    unpacked = forward(CFG, params, packed)
    assert np.max(np.abs(unpacked[0, 37:64] - alone_second[0])) > 1e-2


def test_segment_positions_restart_at_each_segment():
    segments = jnp.asarray([[1, 1, 1, 2, 2, 3, 0, 0], [5, 5, 5, 5, 5, 5, 5, 5]])
    np.testing.assert_array_equal(
        model.segment_positions(segments),
        [[0, 1, 2, 0, 1, 0, 0, 1], [0, 1, 2, 3, 4, 5, 6, 7]],
    )


@pytest.mark.slow
def test_explicit_positions_shift_rope(params):
    tokens = jnp.asarray([[3, 4, 5, 6]])
    shifted = forward(CFG, params, tokens, positions=jnp.arange(10, 14)[None])
    default = forward(CFG, params, tokens)
    # Relative positions are unchanged, so attention scores are equal up to float error.
    np.testing.assert_allclose(shifted, default, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["full", "dots", "dots_no_batch"])
def test_remat_policies_change_memory_not_results(params, policy):
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, CFG.vocab_size, (2, 24)), jnp.int32)

    def loss(cfg, p):
        return jnp.mean(jax.nn.logsumexp(model.forward(cfg, p, tokens), axis=-1))

    expected_loss, expected_grads = jax.jit(jax.value_and_grad(lambda p: loss(CFG, p)))(params)
    remat_cfg = CFG.replace(remat_policy=policy)
    got_loss, got_grads = jax.jit(jax.value_and_grad(lambda p: loss(remat_cfg, p)))(params)
    np.testing.assert_allclose(got_loss, expected_loss, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), got_grads,
                 expected_grads)


def test_every_param_has_logical_axes_of_its_rank(params):
    axes = model.param_logical_axes(CFG)
    shapes = jax.tree.map(jnp.shape, params)
    flat_axes = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    flat_shapes = jax.tree.leaves(shapes, is_leaf=lambda x: isinstance(x, tuple))
    assert [len(a) for a in flat_axes] == [len(s) for s in flat_shapes]
    assert axes["layers"]["self_attn"]["q_proj"]["kernel"] == jax.sharding.PartitionSpec(
        "layers", "embed", "heads", "head_dim")


def test_num_params_counts_every_array(params):
    assert CFG.num_params == sum(x.size for x in jax.tree.leaves(params))
    tied = CFG.replace(tie_word_embeddings=True)
    assert tied.num_params == sum(x.size for x in jax.tree.leaves(model.param_shapes(tied)))


def test_bad_config_names_each_problem():
    with pytest.raises(ValueError,
                       match="num_heads=6 must be a multiple of num_kv_heads=4.*remat_policy"):
        CFG.replace(num_heads=6, num_kv_heads=4, remat_policy="sometimes")


@pytest.mark.parametrize("contract", [1, 2])
def test_the_cpu_backward_of_a_projection_equals_autodiff(contract):
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(3, 5, 4, 6)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(4, 6, 7)[2 - contract:]), jnp.float32)
    dims = ((tuple(range(4 - contract, 4)), tuple(range(contract))), ((), ()))

    def loss(project):
        return lambda x, k: jnp.sum(jnp.sin(project(x, k)))

    expected = jax.grad(loss(lambda x, k: jax.lax.dot_general(x, k, dims)), (0, 1))(x, kernel)
    got = jax.jit(jax.grad(loss(lambda x, k: model._project(x, k, contract)), (0, 1)))(x, kernel)
    for g, e in zip(got, expected):
        assert g.shape == e.shape
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)


def test_a_remat_policy_that_saves_dots_keeps_autodiffs_projection(capsys):
    """A dots-saving policy cannot see a product inside a custom VJP: such configs must keep
    autodiff's projection, or they would silently rematerialize everything."""
    x = jnp.ones((1, 8, CFG.hidden_size))
    cos, sin = model.rope_tables(CFG, jnp.arange(8)[None])

    def saved_dots(cfg):
        layer = model.DecoderLayer(cfg)
        variables = layer.init(jax.random.key(0), (x, None), cos, sin, None)
        run = jax.checkpoint(lambda v, x: jnp.sum(layer.apply(v, (x, None), cos, sin, None)[0][0]),
                             policy=jax.checkpoint_policies.checkpoint_dots)
        print_saved_residuals(run, variables, x)
        return capsys.readouterr().out.count("output of dot_general")

    assert saved_dots(CFG.replace(remat_policy="dots")) >= 7
    assert saved_dots(CFG) < 7
