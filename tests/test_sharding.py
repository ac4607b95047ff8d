"""Params load straight into their shardings on a (data, fsdp, tensor) mesh of 8 CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from dasd_jax import hf, model, sharding
from dasd_jax.errors import UserError
from tests import tiny_models


def test_the_suite_sees_eight_simulated_devices():
    assert jax.device_count() == 8


@pytest.mark.slow
def test_load_onto_a_mesh_places_each_param_in_its_sharding(checkpoint_dir):
    directory = checkpoint_dir("qwen2")
    mesh = sharding.make_mesh((2, 2, 2))
    cfg, params = hf.load(directory, mesh=mesh)

    q_kernel = params["layers"]["self_attn"]["q_proj"]["kernel"]  # [L, D, heads, head_dim]
    assert q_kernel.sharding.spec == P(None, "fsdp", "tensor", None)
    assert params["embed_tokens"]["embedding"].sharding.spec == P("tensor", "fsdp")
    shard_shapes = {s.data.shape for s in q_kernel.addressable_shards}
    assert shard_shapes == {(2, 32, 2, 16)}

    tokens = jnp.asarray(tiny_models.random_tokens(4, 64))
    _, plain = hf.load(directory)
    with sharding.activation_rules(mesh):
        sharded_logits = jax.jit(model.forward, static_argnums=0)(cfg, params, tokens)
    np.testing.assert_allclose(sharded_logits, model.forward(cfg, plain, tokens), atol=1e-4)


def test_dimensions_the_mesh_does_not_divide_are_replicated():
    mesh = sharding.make_mesh((1, 1, 8))
    spec = sharding.logical_to_physical(P("embed", "kv_heads", "head_dim"), (64, 2, 16), mesh)
    assert spec == P("fsdp", None, None)
    spec = sharding.logical_to_physical(P("embed", "heads", "head_dim"), (64, 8, 16), mesh)
    assert spec == P("fsdp", "tensor", None)


def test_mesh_shape_minus_one_takes_the_remaining_devices():
    assert dict(sharding.make_mesh((2, -1, 1)).shape) == {"data": 2, "fsdp": 4, "tensor": 1}


@pytest.mark.parametrize("shape, message", [
    ((3, -1, 1), "does not divide 8 devices"),
    ((2, 2, 1), "needs 4 devices but 8"),
    ((8, 1), "must give 3 sizes"),
])
def test_bad_mesh_shapes_are_explained(shape, message):
    with pytest.raises(UserError, match=message):
        sharding.make_mesh(shape)
