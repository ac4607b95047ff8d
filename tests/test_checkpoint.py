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
    restored, data_state, restored_step = restorer.restore(target)
    restorer.close()
    assert restored_step == 3

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


def damage(directory, step):
    """Cuts every array data file of checkpoint `step` to half, as a failed copy leaves them."""
    for file in (directory / "checkpoints" / str(step) / "state").rglob("*"):
        if file.is_file() and file.parent.name == "d":
            file.write_bytes(file.read_bytes()[:file.stat().st_size // 2])


@pytest.fixture
def three_checkpoints(tmp_path):
    """Checkpoints of steps 2, 4 and 6 of one state (each step's data position its own)."""
    _, state = make_state(sharding.make_mesh((1, 8, 1)))
    saver = checkpoint.Checkpointer(tmp_path, every=2, max_to_keep=3, async_save=False)
    for number in (2, 4, 6):
        assert saver.save(number, state, {"epoch": 0, "index": number})
    saver.close()
    return tmp_path, state


@pytest.mark.slow
def test_a_damaged_newest_checkpoint_is_set_aside_and_the_newest_intact_one_restores(
        three_checkpoints, caplog):
    directory, state = three_checkpoints
    damage(directory, 6)
    restorer = checkpoint.Checkpointer(directory, every=2, max_to_keep=3)
    _, data_state, restored = restorer.restore(state)
    restorer.close()
    assert restored == 4 and data_state == {"epoch": 0, "index": 4}
    assert (directory / "checkpoints" / "6.damaged").is_dir()
    assert not (directory / "checkpoints" / "6").exists()
    (warning,) = [r.getMessage() for r in caplog.records if "set aside" in r.getMessage()]
    assert "checkpoint step 6" in warning and "does not restore (" in warning
    assert "Requested byte range" in warning or "OUT_OF_RANGE" in warning


@pytest.mark.slow
def test_evaluation_restores_the_params_of_the_newest_intact_checkpoint(three_checkpoints):
    directory, state = three_checkpoints
    damage(directory, 6)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            state.params)
    restorer = checkpoint.Checkpointer(directory, every=2, max_to_keep=3)
    params = restorer.restore_params(abstract)
    restorer.close()
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params),
                 jax.device_get(state.params))
    assert (directory / "checkpoints" / "6.damaged").is_dir()


@pytest.mark.slow
def test_with_every_checkpoint_damaged_the_error_is_one_line(three_checkpoints):
    directory, state = three_checkpoints
    for number in (2, 4, 6):
        damage(directory, number)
    restorer = checkpoint.Checkpointer(directory, every=2, max_to_keep=3)
    with pytest.raises(UserError, match=r"^no checkpoint in .*checkpoints restores: set aside as "
                                        r"6.damaged, 4.damaged, 2.damaged; start afresh"):
        restorer.restore(state)
    restorer.close()


@pytest.mark.slow
def test_a_given_resume_step_sets_newer_checkpoints_aside_as_superseded(three_checkpoints):
    directory, state = three_checkpoints
    restorer = checkpoint.Checkpointer(directory, every=2, max_to_keep=3)
    _, data_state, restored = restorer.restore(state, step=2)
    assert restored == 2 and data_state["index"] == 2
    assert restorer.steps() == [2]
    assert {p.name for p in (directory / "checkpoints").iterdir()} >= {
        "2", "4.superseded", "6.superseded"}
    with pytest.raises(UserError, match=r"resume_step=5: no checkpoint of that step"):
        restorer.restore(state, step=5)
    restorer.close()


def test_a_checkpoint_of_other_settings_is_named_not_set_aside(tmp_path):
    _, state = make_state(sharding.make_mesh((1, 8, 1)))
    saver = checkpoint.Checkpointer(tmp_path, every=1, max_to_keep=1, async_save=False)
    saver.save(1, state, {"epoch": 0, "index": 0})
    saver.close()
    other = CFG.replace(num_layers=3)
    config = config_defaults.base_config()
    config.train.update(steps=10, warmup_steps=1)
    target = step.setup(config, other, sharding.make_mesh((1, 8, 1))).init_state(
        model.init(other, jax.random.key(1)))
    restorer = checkpoint.Checkpointer(tmp_path, every=1, max_to_keep=1)
    with pytest.raises(UserError, match=r"checkpoint of step 1 in .* does not fit this run \("):
        restorer.restore(target)
    restorer.close()
    assert (tmp_path / "checkpoints" / "1").is_dir()
