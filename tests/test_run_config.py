"""A stage's config is resolved once and then frozen: every stage runs on a frozen config."""

import pytest

from configs import math as math_config
from dasd_jax import analyze, evaluate, rewrite, run_config, train
from dasd_jax.errors import UserError


@pytest.mark.slow
def test_every_stage_runs_on_a_frozen_config_it_never_changes(tmp_path):
    config = math_config.get_config("tiny")
    config.workdir = str(tmp_path)
    config.rewrite.update(generated_examples=4, limit=4, max_new_tokens=16, batch_size=4)
    config.data.update(generated_examples=16, eval_path="", buckets=(256,))
    config.train.update(steps=2, warmup_steps=1, batch_size=8, log_every=1)
    config.checkpoint.update(every=2, async_save=False)
    config.metrics.update(tensorboard=False, progress_bar=False)
    config.eval.update(limit=2, max_new_tokens=8, baseline="")
    config.analyze.update(limit=4, examples=2)
    frozen = run_config.resolve(config)
    before = frozen.to_dict()
    with pytest.raises(AttributeError, match="immutable"):
        frozen.train.steps = 3
    assert rewrite.rewrite(frozen)["records"] == 4
    assert train.train(frozen)["loss"] > 0
    assert "synthetic" in evaluate.evaluate(frozen)["tasks"]
    assert analyze.analyze(frozen)
    assert run_config.resolve(frozen) is frozen
    assert frozen.to_dict() == before


def test_a_copy_with_other_fields_leaves_the_frozen_original_as_it_was():
    config = math_config.get_config("tiny")
    config.workdir = "/tmp/unused"
    frozen = run_config.resolve(config)
    other = run_config.replaced_fields(frozen, {"eval.shift.limit": 5, "train.steps": 7})
    assert (other.eval.shift.limit, other.train.steps) == (5, 7)
    assert (frozen.eval.shift.limit, frozen.train.steps) == (config.eval.shift.limit,
                                                            config.train.steps)
    assert run_config.mutable(frozen).eval.shift.limit == config.eval.shift.limit


def test_a_resolved_config_still_names_what_a_stage_lacks():
    config = math_config.get_config("tiny")
    config.workdir = ""
    frozen = run_config.resolve(config)
    with pytest.raises(UserError, match=r"^--config.workdir is required: where checkpoints"):
        run_config.resolve(frozen, "train")


def test_the_mesh_batch_layout_is_checked_where_the_mesh_is_resolved():
    config = math_config.get_config("tiny")
    config.mesh.shape = (1, 8, 1)
    config.train.update(batch_size=12, micro_batches=1)
    with pytest.raises(UserError, match=r"batch_size=12 / --config.train.micro_batches=1 must be "
                                        r"a whole multiple of the mesh's data x fsdp size 8"):
        run_config.resolve(config)
