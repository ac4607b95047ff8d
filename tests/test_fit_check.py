"""The fit check compiles the pipeline with the TPU and GPU compilers themselves, on this CPU-only
host, and says whether a run fits (`--config.dry_run=True --config.compile_for=...`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jax
import pytest

from configs import math as math_config
from dasd_jax import fit_check, model, sampling, sharding, loading, run_config, step, targets
from dasd_jax.errors import UserError
from tests import processes

REPO = Path(__file__).resolve().parents[1]
TPU, GPU = "v5e:2x4", "h100x8"


@pytest.fixture(scope="module")
def compilers():
    """Skips, with the reason, where the accelerator compilers are not installed (`make test`
    installs them from requirements-compile.txt)."""
    try:
        targets.resolve(TPU)
        targets.resolve(GPU)
    except UserError as error:
        if "not installed" in str(error):
            pytest.skip(str(error))
        raise


def tiny_config(target: str, **sections):
    """The tiny config, for a dry run on `target`, with {section: {field: value}} changes."""
    config = math_config.get_config("tiny")
    config.update(dry_run=True, compile_for=target)
    for section, values in sections.items():
        config[section].update(values)
    return run_config.resolve(config)


def lowered_train_step(config):
    target = targets.resolve(config.compile_for)
    mesh = sharding.make_mesh(config.mesh.shape, devices=target.devices)
    run = step.setup(config, loading.model_config_only(config), mesh)
    return run.train_step.lower(*run.abstract_inputs(config.train.batch_size,
                                                     max(config.data.buckets)))


@pytest.mark.slow
def test_a_tpu_slice_compiles_the_dasd_step_codecoding_and_decoding_and_they_fit(compilers, capsys):
    report = fit_check.check(tiny_config(TPU))
    programs = {(p["stage"], p["program"].split(" (")[0]): p for p in report["programs"]}
    assert set(programs) == {
        ("train", "train step"), ("rewrite", "co-decoding prefill"),
        ("rewrite", "co-decoding decode loop"), ("rewrite", "teacher-forced scoring"),
        ("evaluate", "decoding prefill"), ("evaluate", "decoding decode loop")}
    assert all(p["peak_gib"] > 0 and not p["refused"] for p in programs.values())
    assert report["device_kind"] == "TPU v5e" and report["devices"] == 8 and report["fits"]
    assert report["usable_gib_per_device"] == 16.0
    # The TPU compiler counts the step's FLOPs and bytes, every layer included.
    assert report["compiler_flops_per_device"] > 0.5 * report["model_flops_per_device"]
    assert report["step_seconds_lower_bound"]["memory_s"] > 0
    out = capsys.readouterr().out
    assert "8 x TPU v5e (v5e:2x4, compile-only)" in out and "verdict      fits" in out


@pytest.mark.slow
def test_a_lora_step_compiles_for_a_tpu_slice_and_an_8_gpu_host(compilers):
    for target in (TPU, GPU):
        compiled = lowered_train_step(tiny_config(target, lora=dict(rank=4))).compile()
        assert compiled.memory_analysis().temp_size_in_bytes > 0


@pytest.mark.slow
def test_an_8_gpu_host_compiles_every_program_with_xla_attention_where_cudnn_cannot(compilers):
    config = tiny_config(GPU, model=dict(compute_dtype="bfloat16"))  # where cuDNN would be used
    report = fit_check.check(config)
    assert report["fits"] and report["device_kind"] == "NVIDIA H100 80GB HBM3"
    assert report["compiler_flops_per_device"] is None  # no cost analysis without a GPU
    assert "cudnn" not in lowered_train_step(config).as_text().lower()
    config = tiny_config(GPU, model=dict(compute_dtype="bfloat16", attention_impl="cudnn"))
    with pytest.raises(Exception, match="cuDNN"):
        lowered_train_step(config).compile()


def test_a_tpu_program_contains_none_of_the_cpu_only_paths(compilers):
    # remat none: the CPU backward's condition (a policy may save dots)
    cpu, tpu = (tiny_config(name, model=dict(remat_policy="none")) for name in ("", TPU))
    # The projection backward made for XLA:CPU (model._project) runs on a CPU only.
    scope = model.CPU_PROJECTION_BACKWARD
    assert scope in lowered_train_step(cpu).as_text(debug_info=True)
    assert scope not in lowered_train_step(tpu).as_text(debug_info=True)
    # On a CPU the decode loop reads the layers' weights apart, elsewhere stacked.
    cfg = loading.model_config_only(tpu)
    settings = sampling.Settings(max_new_tokens=8, prompt_buckets=(64,))
    leaves = {}
    for platform, name in (("cpu", ""), ("tpu", TPU)):
        mesh = sharding.make_mesh((1, -1, 1), devices=targets.resolve(name).devices)
        shaped = cfg.replace(platform=platform)
        params = sharding.abstract(model.param_shapes(shaped),
                                   sharding.param_shardings(shaped, mesh))
        with sharding.activation_rules(mesh):
            lowered = sampling.lower_decoding(shaped, params, settings, 8, "plain", mesh)
        leaves[platform] = len(jax.tree.leaves(lowered["decode loop"].args_info))
    assert leaves["cpu"] - leaves["tpu"] == (cfg.num_layers - 1) * len(
        jax.tree.leaves(model.param_shapes(cfg)["layers"]))


@pytest.mark.subprocess
def test_a_run_that_does_not_fit_exits_3_with_one_line_naming_target_shortfall_and_fixes(compilers):
    result = subprocess.run(
        [sys.executable, "-m", "dasd_jax.train", "--config=configs/math.py:tiny",
         "--config.dry_run=True", f"--config.compile_for={TPU}",
         "--config.train.batch_size=131072"],
        cwd=REPO, env=processes.environment(devices=1), capture_output=True, text=True,
        timeout=300)
    assert result.returncode == 3, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert lines[0].startswith(f"error: does not fit {TPU}: the train stage's train step")
    assert "short by at least" in lines[0] and "--config.train.micro_batches=2" in lines[0]
    assert "--config.compile_for=v5e:4x4" in lines[0]
    assert "verdict      does NOT fit" in result.stdout


def test_a_target_name_the_compilers_do_not_know_lists_the_accepted_names():
    with pytest.raises(UserError, match=r"--config.compile_for='tpu-v9' is not a target name; "
                                        r"accepted: v4:AxBxC"):
        targets.resolve("tpu-v9")
    with pytest.raises(UserError, match=r"give 1 to 8 GPUs, or a multiple of 8"):
        targets.resolve("h100x12")


def test_a_slice_shape_the_tpu_compiler_rejects_is_one_line(compilers):
    with pytest.raises(UserError, match=r"--config.compile_for='v5e:3x5': the TPU compiler rejects "
                                        r"this topology \(.+\); accepted: v4:AxBxC"):
        targets.resolve("v5e:3x5")


def test_cloud_tpu_accelerator_types_name_their_slices():
    assert [targets.topology_name(name) for name in (
        "v5litepod-8", "v5litepod-16", "v6e-256", "v5p-8", "v5p-16", "v4-32", "v5p-12")] == [
        "v5e:2x4", "v5e:4x4", "v6e:16x16", "v5p:2x2x1", "v5p:2x2x2", "v4:2x2x4", None]


def test_the_platform_follows_the_target_unless_set():
    config = math_config.get_config("tiny")
    assert targets.platform_for(config) == ""
    config.compile_for = "v5p-16"
    assert targets.platform_for(config) == "tpu"
    config.compile_for = GPU
    assert targets.platform_for(config) == "gpu"
    config.model.platform = "cpu"
    assert targets.platform_for(config) == "cpu"


def test_the_remedies_offered_keep_each_micro_batch_split_over_the_devices(compilers):
    config = math_config.get_config("tiny")
    config.update(compile_for=TPU, dry_run=True)
    target = targets.resolve(TPU)
    for batch, offered in ((8, False), (16, True)):
        config.train.update(batch_size=batch, micro_batches=1)
        remedies = fit_check._remedies(run_config.resolve(config), target, "train", 0.0)
        assert ("--config.train.micro_batches=2" in remedies) == offered, remedies
        assert "--config.model.remat_policy=full" in remedies
