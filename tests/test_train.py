"""`python -m dasd_jax.train` end to end, as real processes: metrics, checkpoints, export,
resume."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import transformers

from dasd_jax import config_defaults, hf, train
from dasd_jax.errors import UserError
from configs import math as math_config
from tests import processes

REPO = Path(__file__).resolve().parents[1]
# Small and quick, but every part of the run: 1 device, checkpoints every 4 steps, log every step.
QUICK = ["--config.train.steps=24", "--config.train.batch_size=8", "--config.train.log_every=1",
         "--config.checkpoint.every=4", "--config.data.generated_examples=256",
         "--config.metrics.tensorboard=False"]


def train_command(workdir, *extra):
    return [sys.executable, "-m", "dasd_jax.train", "--config=configs/math.py:tiny",
            f"--config.workdir={workdir}", *QUICK, *extra]


def run(workdir, *extra, timeout=300):
    env = processes.environment(devices=1)
    return subprocess.run(train_command(workdir, *extra), cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def losses_by_step(workdir) -> dict[int, float]:
    lines = (Path(workdir) / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    steps = [row["step"] for row in rows if "loss" in row]
    assert len(steps) == len(set(steps)), "a resumed run must not repeat steps in metrics.jsonl"
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    result = run(workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, result


@pytest.mark.slow
def test_tiny_run_writes_metrics_checkpoints_and_an_export_transformers_loads(uninterrupted):
    workdir, result = uninterrupted
    losses = losses_by_step(workdir)
    assert sorted(losses) == list(range(1, 25))
    assert losses[24] < losses[1]
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_loss" in row for row in rows)
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == 24
    assert "step 24/24" in result.stdout

    exported = transformers.AutoModelForCausalLM.from_pretrained(str(workdir / "hf"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(workdir / "hf"))
    ids = tokenizer("Start with 3, add 4.", return_tensors="pt").input_ids
    assert exported(ids).logits.shape == (1, ids.shape[1], len(tokenizer))
    cfg, _ = hf.load(workdir / "hf")
    assert cfg.vocab_size == len(tokenizer)


@pytest.mark.slow
@pytest.mark.subprocess
def test_a_killed_run_resumes_to_the_uninterrupted_losses_exactly(uninterrupted, tmp_path):
    expected = losses_by_step(uninterrupted[0])
    workdir = tmp_path / "killed"
    env = processes.environment(devices=1)
    process = subprocess.Popen(train_command(workdir), cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not (workdir / "checkpoints" / "8").is_dir():
            assert process.poll() is None, "the run ended before its second checkpoint"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        process.kill()
    assert process.returncode == -signal.SIGKILL
    killed_at = max(losses_by_step(workdir))
    assert killed_at < 24

    result = run(workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = losses_by_step(workdir)
    assert sorted(resumed) == list(range(1, 25))
    assert resumed == expected  # every step, before and after the kill, bit for bit


@pytest.mark.slow
@pytest.mark.subprocess
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    workdir = tmp_path / "preempted"
    env = processes.environment(devices=1)
    process = subprocess.Popen(train_command(workdir, "--config.train.steps=400"), cwd=REPO,
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    deadline = time.monotonic() + 240
    while not (workdir / "metrics.jsonl").exists() or not (workdir / "metrics.jsonl").read_text():
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-3000:]
    assert "preempted: saved step" in stderr
    saved = int(stderr.split("preempted: saved step ")[1].split(",")[0])
    assert (workdir / "checkpoints" / str(saved)).is_dir() and saved < 400


@pytest.mark.slow
def test_dry_run_reports_parameters_and_memory_per_device(capsys):
    config = math_config.get_config("tiny")
    config.workdir = "/unused"
    config.dry_run = True
    config.mesh.shape = (1, 8, 1)
    report = train.train(config)
    assert report["params"] > 0 and report["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert report["peak_gib_per_device"] > 0 and report["temp_gib"] > 0
    assert "memory/device" in capsys.readouterr().out


def test_hub_id_offline_fails_at_once_naming_the_flag(tmp_path):
    config = math_config.get_config()
    config.workdir = str(tmp_path)
    start = time.monotonic()
    with pytest.raises(UserError, match=r"--config.model.path: Qwen/Qwen2.5-1.5B-Instruct is not a "
                                        r"local directory.*pass DIR instead"):
        train.train(config)
    assert time.monotonic() - start < 10


@pytest.mark.subprocess
def test_missing_workdir_is_named(capsys):
    result = subprocess.run([sys.executable, "-m", "dasd_jax.train",
                             "--config=configs/math.py:tiny", "--config.workdir="], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().endswith("error: --config.workdir is required: where checkpoints, "
                                          "metrics.jsonl and the HF export go")


def test_every_task_config_and_variant_builds():
    from configs import code, commonsense
    for module in (math_config, code, commonsense):
        for variant in (None, "tiny", "sft", "tiny,sdft"):
            config = module.get_config(variant)
            assert config.selection.rule in ("dasd", "all")
    with pytest.raises(UserError, match="unknown config variant 'huge'"):
        math_config.get_config("huge")
    assert config_defaults.base_config().selection.rule == "dasd"


def test_micro_batches_the_mesh_cannot_split_are_refused():
    config = math_config.get_config("tiny")
    config.workdir = "/unused"
    config.train.update(batch_size=16, micro_batches=4)  # 4 per micro-batch on 8 devices
    with pytest.raises(UserError, match=r"batch_size=16 / --config.train.micro_batches=4 must be "
                                        r"a whole multiple of the mesh's data x fsdp size 8"):
        train.train(config)


@pytest.mark.slow
@pytest.mark.subprocess
def test_a_diverging_run_stops_with_one_message_keeps_its_last_good_checkpoint_and_exports_nothing(
        tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "dasd_jax.train", "--config=configs/math.py:tiny",
         f"--config.workdir={tmp_path}", "--config.train.learning_rate=1e30",
         "--config.train.steps=12", "--config.checkpoint.every=2", "--config.train.log_every=5",
         "--config.metrics.progress_bar=False"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: step 3: loss 4.6") and "gradient norm nan" in message
    assert "last finite loss" in message and "checkpoint, step 2, is kept" in message
    assert "--config.train.learning_rate (now 1e+30)" in message
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [1, 2]
    assert not (tmp_path / "hf").exists()
