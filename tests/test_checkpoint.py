"""Orbax checkpoints: restore into the current shardings, also on a different mesh shape."""

import jax
import numpy as np
import pytest

from dasd_jax import checkpoint, config_defaults, model, sharding, step
from dasd_jax.errors import UserError

CFG = model.ModelConfig(model_type="qwen3", vocab_size=64, hidden_size=32, intermediate_size=64,
                        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, qk_norm=True)


def make_state(mesh):
    config = config_defaults.base_config()
    config.train.update(steps=10, warmup_steps=1)
    return config, step.setup(config, CFG, mesh).init_state(model.init(CFG, jax.random.key(1)))


@pytest.mark.slow
def test_a_checkpoint_restores_onto_a_different_mesh_shape(tmp_path):
    saving_mesh = sharding.make_mesh((1, 8, 1))
    _, state = make_state(saving_mesh)
    saver = checkpoint.Checkpointer(tmp_path, every=1, max_to_keep=2)
    assert saver.save(3, state, {"epoch": 1, "index": 48})
    saver.close()

    restoring_mesh = sharding.make_mesh((2, 2, 2))
    config, target = make_state(restoring_mesh)
    restorer = checkpoint.Checkpointer(tmp_path, every=1, max_to_keep=2)
    assert restorer.latest_step() == 3
    restored, data_state = restorer.restore(target)
    restorer.close()

    assert data_state == {"epoch": 1, "index": 48}
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), jax.device_get(state))
    expected = step.setup(config, CFG, restoring_mesh).state_shardings
    jax.tree.map(lambda array, wanted: _assert_sharding(array, wanted), restored, expected)


def _assert_sharding(array, wanted):
    assert array.sharding.is_equivalent_to(wanted, array.ndim)


@pytest.mark.slow
def test_saving_the_same_step_twice_is_a_no_op(tmp_path):
    _, state = make_state(sharding.make_mesh((1, 8, 1)))
    saver = checkpoint.Checkpointer(tmp_path, every=5, max_to_keep=1)
    assert saver.save(5, state, {"epoch": 0, "index": 0})
    saver.wait()
    assert not saver.save(5, state, {"epoch": 0, "index": 0}, force=True)
    assert not saver.save(6, state, {"epoch": 0, "index": 0})  # off the interval
    saver.close()


def test_restoring_without_a_checkpoint_says_where_it_looked(tmp_path):
    _, state = make_state(sharding.make_mesh((1, 8, 1)))
    empty = checkpoint.Checkpointer(tmp_path, every=1, max_to_keep=1)
    with pytest.raises(UserError, match=r"no checkpoint to restore in .*checkpoints"):
        empty.restore(state)
    empty.close()
