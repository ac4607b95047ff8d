"""Every command line turns a bad flag, config file or field value into one line and exit 2,
before any work starts and without leaving anything behind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import jax

from dasd_jax import cli, run_config, validation
from dasd_jax.errors import UserError
from configs import math as math_config

REPO = Path(__file__).resolve().parents[1]


def run_cli(stage: str, *args: str, timeout: int = 240):
    return subprocess.run([sys.executable, "-m", f"dasd_jax.{stage}", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.parametrize("stage, args, message", [
    ("train", ["--config=configs/math.py:tiny", "--config.train.stepz=3"],
     "error: --config.train.stepz: train has no field 'stepz'; did you mean steps?"),
    ("rewrite", ["--config=configs/nope.py"],
     "error: --config=configs/nope.py: no config file at configs/nope.py"),
    ("evaluate", ["--config=configs/math.py:tiny", "--config.selection.rule=dasdd"],
     "error: --config.selection.rule='dasdd': choose from all, dasd, ppl_filter"),
    ("analyze", ["--config=configs/code.py:tinyy"],
     "error: --config=configs/code.py:tinyy: unknown config variant 'tinyy'; choose from tiny"),
    ("train", ["--config=configs/math.py:tiny", "--config.train.steps=abc"],
     "error: flag --config.train.steps=abc: invalid literal for int()"),
    ("train", ["--config=configs/math.py:tiny", "--config.train.learning_rate=-0.1"],
     "error: --config.train.learning_rate=-0.1: must be a number > 0.0"),
])
def test_a_bad_flag_file_or_value_is_one_line_and_exit_2(tmp_path, stage, args, message):
    result = run_cli(stage, *args, f"--config.workdir={tmp_path / 'run'}")
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().startswith(message), result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.subprocess
def test_a_rewrite_whose_model_cannot_load_leaves_no_output_file(tmp_path):
    result = run_cli("rewrite", "--config=configs/math.py:tiny", f"--config.workdir={tmp_path}",
                     f"--config.model.path={tmp_path / 'absent'}")
    assert result.returncode == 2 and result.stderr.startswith("error: --config.model.path")
    assert list(tmp_path.iterdir()) == []


def test_overrides_are_checked_against_the_config_file_with_suggestions():
    with pytest.raises(UserError, match=r"--config.selection.kapa: selection has no field "
                                         r"'kapa'; did you mean kappa\?"):
        cli.check_command_line(["x", "--config=configs/math.py:tiny",
                                   "--config.selection.kapa=0.3"])
    with pytest.raises(UserError, match=r"--config.train.steps.x: train.steps has no field 'x'"):
        cli.check_command_line(["x", "--config", "configs/math.py", "--config.train.steps.x=1"])
    cli.check_command_line(["x", "--config=configs/math.py:tiny,sft",
                               "--config.data.fields.prompt=question"])


@pytest.mark.parametrize("field, value, problem", [
    ("train.steps", 0, "must be >= 1"), ("train.warmup_steps", -1, "must be >= 0"),
    ("train.learning_rate", 0.0, "must be a number > 0"), ("train.b2", 1.0, "[0.0, 1.0)"),
    ("train.grad_clip", 0.0, "must be a number > 0"), ("selection.tau", 1.5, "[0.0, 1.0]"),
    ("selection.kappa", -0.1, "[0.0, 1.0]"), ("rewrite.alpha", 0.0, "(0.0, 1.0]"),
    ("rewrite.top_p", 0.0, "(0.0, 1.0]"), ("eval.temperature", -1.0, "must be >= 0"),
    ("data.buckets", (), "non-empty tuple"), ("mesh.shape", (1, -1, -1), "3 sizes"),
    ("model.compute_dtype", "float8", "choose from float32"), ("lora.dropout", 1.0, "[0.0, 1.0)"),
    ("checkpoint.every", 0, "must be >= 1"), ("rewrite.mode", "both", "choose from sdft, dasd"),
])
def test_every_field_out_of_range_is_refused_by_name(field, value, problem):
    config = math_config.get_config("tiny")
    section, name = field.split(".")
    with config.unlocked():
        config[section][name] = value
    with pytest.raises(UserError) as error:
        validation.validate(config)
    assert str(error.value).startswith(f"--config.{field}=") and problem in str(error.value)


def test_fields_that_only_make_sense_together_are_checked_together():
    config = math_config.get_config("tiny")
    config.train.warmup_steps = config.train.steps
    with pytest.raises(UserError, match="warmup_steps=60 must be below --config.train.steps=60"):
        validation.validate(config)
    config = math_config.get_config("tiny")
    config.selection.update(tau_min=0.6, tau_max=0.5)
    with pytest.raises(UserError, match="tau_min=0.6 must not exceed"):
        validation.validate(config)


def test_the_config_is_resolved_once_paths_resolved_fields_checked_and_frozen():
    config = math_config.get_config()
    config.workdir = "~/runs/math"
    config.eval.paths.humaneval = "{workdir}/he.jsonl"
    final = run_config.resolve(config)
    home = str(Path.home())
    assert final.workdir == f"{home}/runs/math"
    assert final.data.path == f"{home}/runs/math/rewrites.jsonl"
    assert final.rewrite.output == final.data.path and final.eval.output == f"{home}/runs/math/eval"
    assert final.eval.paths.humaneval == f"{home}/runs/math/he.jsonl"
    assert final.eval.paths.gsm8k == "hf:openai/gsm8k:main" and final.eval.baseline == "base"
    assert final.selection.rho == config.rewrite.alpha  # no rewrite file: rewrite.alpha
    assert final.mesh.shape == (1, jax.device_count(), 1) and final.model.platform == "cpu"
    assert run_config.resolve(final) is final
    assert config.data.path == "{workdir}/rewrites.jsonl"  # the given config is left as it was
    with pytest.raises(AttributeError, match="immutable"):
        final.train.steps = 3
    config.train.steps = -3
    with pytest.raises(UserError, match=r"--config.train.steps=-3"):
        run_config.resolve(config)
