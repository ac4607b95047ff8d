"""Faults a long run meets, as real processes: a damaged checkpoint, a full disk, a second
process on a busy workdir. Each ends in one line (or, for a damaged checkpoint, one warning)
and the same command picks up afterwards."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dasd_jax import disk, host_memory, stages, workdir_lock
from dasd_jax.errors import UserError
from tests import processes

REPO = Path(__file__).resolve().parents[1]
QUICK = ["--config.checkpoint.every=2", "--config.train.log_every=1",
         "--config.train.warmup_steps=1", "--config.checkpoint.export=False",
         "--config.metrics.progress_bar=False", "--config.metrics.tensorboard=False",
         "--config.data.eval_path=", "--config.data.generated_examples=64"]
pytestmark = pytest.mark.subprocess


def train(workdir, steps: int, *extra: str, timeout: int = 300, wait: bool = True):
    command = [sys.executable, "-m", "dasd_jax.train", "--config=configs/math.py:tiny",
               f"--config.workdir={workdir}", f"--config.train.steps={steps}", *QUICK, *extra]
    kwargs = dict(cwd=REPO, env=processes.environment(devices=1), text=True)
    if not wait:
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                **kwargs)
    return subprocess.run(command, capture_output=True, timeout=timeout, **kwargs)


def errors_and_warnings(stderr: str) -> list[str]:
    """stderr without the informational lines every run prints."""
    return [line for line in stderr.strip().splitlines()
            if "base_confidence=auto" not in line]


@pytest.mark.slow
def test_a_damaged_newest_checkpoint_is_set_aside_and_training_resumes_from_the_last_intact(
        tmp_path):
    first = train(tmp_path, 6)
    assert first.returncode == 0, first.stderr[-2000:]
    for file in (tmp_path / "checkpoints" / "6" / "state").rglob("*"):
        if file.is_file() and file.parent.name == "d":  # a copy cut short
            file.write_bytes(file.read_bytes()[:file.stat().st_size // 2])
    resumed = train(tmp_path, 8)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    lines = errors_and_warnings(resumed.stderr)
    assert len([line for line in lines if "set aside" in line]) == 1
    assert "checkpoint step 6" in lines[0] and "does not restore (" in lines[0]
    assert "resumed from step 4" in resumed.stderr and "Traceback" not in resumed.stderr
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "4", "6", "6.damaged", "8"]


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs at tmp_path / "disk" (root only), unmounted afterwards; yields a function
    that resizes it."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")

    def resize(size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(mount)], check=True)

    try:
        yield mount, resize
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow
def test_a_full_disk_ends_training_in_one_line_and_the_run_resumes_once_there_is_room(
        small_disk):
    mount, resize = small_disk
    workdir = mount / "run"
    full = train(workdir, 8)
    assert full.returncode == 4, full.stderr[-2000:]
    lines = errors_and_warnings(full.stderr)
    assert len(lines) == 1 and "Traceback" not in full.stderr, full.stderr[-2000:]
    assert lines[0].startswith(f"error: no space left on the disk of {workdir}/checkpoints for "
                               "the checkpoint of step 2 (needs about ")
    assert "run the same command again: it resumes from the checkpoint of step 1" in lines[0]
    assert not list((workdir / "checkpoints").glob("*tmp*"))
    resize("64m")
    resumed = train(workdir, 8)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from step 1" in resumed.stderr
    steps = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text()
             .splitlines()]
    assert steps == list(range(1, 9))


@pytest.mark.slow
def test_a_full_disk_keeps_the_rewrite_file_to_whole_lines_and_the_rewrite_goes_on(small_disk):
    mount, resize = small_disk
    resize("96k")
    command = [sys.executable, "-m", "dasd_jax.rewrite", "--config=configs/math.py:tiny",
               f"--config.workdir={mount / 'run'}", "--config.rewrite.generated_examples=48",
               "--config.rewrite.batch_size=8", "--config.rewrite.max_new_tokens=48"]
    kwargs = dict(cwd=REPO, env=processes.environment(devices=1), capture_output=True,
                  text=True, timeout=300)
    full = subprocess.run(command, **kwargs)
    assert full.returncode == 4 and "Traceback" not in full.stderr, full.stderr[-2000:]
    assert "error: no space left on the disk of" in full.stderr
    text = (mount / "run" / "rewrites.jsonl").read_text()
    assert text == "" or text.endswith("\n")  # whole lines only
    written = len(text.splitlines())
    resize("64m")
    done = subprocess.run(command, **kwargs)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = (mount / "run" / "rewrites.jsonl").read_text().splitlines()
    assert len(lines) == 48 > written and len({json.loads(line)["id"] for line in lines}) == 48


@pytest.mark.slow
def test_a_second_trainer_on_a_busy_workdir_is_refused_and_a_dead_ones_lock_is_taken_over(
        tmp_path):
    first = train(tmp_path, 100_000, wait=False)
    lock = tmp_path / workdir_lock.LOCK_NAME
    deadline = time.monotonic() + 120
    while not lock.exists() and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.2)
    try:
        assert lock.exists(), first.stderr.read() if first.poll() is not None else "no lock"
        second = train(tmp_path, 4, timeout=120)
        assert second.returncode == 2
        (line,) = errors_and_warnings(second.stderr)
        assert line.startswith(f"error: the workdir {tmp_path} is in use by another run: pid "
                               f"{first.pid} on this machine, started ")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    assert json.loads(lock.read_text())["pid"] == first.pid  # a killed run leaves its lock
    third = train(tmp_path, 2, timeout=300)
    assert third.returncode == 0, third.stderr[-2000:]
    assert f"taking over the lock of the workdir {tmp_path} left by pid {first.pid}" in \
        third.stderr
    assert not lock.exists()


def test_a_write_that_fails_for_space_is_one_line_naming_the_place_and_the_way_on(tmp_path):
    with pytest.raises(disk.DiskFull, match=rf"^no space left on the disk of {tmp_path} for "
                                            r"metrics.jsonl \(.* MiB free\): .*: it resumes"):
        with disk.guard(tmp_path, "metrics.jsonl", "it resumes"):
            raise OSError(28, "No space left on device")
    with pytest.raises(disk.DiskFull):  # a library's error that carries the system's words
        with disk.guard(tmp_path, "a checkpoint", "it resumes"):
            raise ValueError("RESOURCE_EXHAUSTED: ... No space left on device [os_error_code='28']")
    with pytest.raises(ValueError, match="other"), disk.guard(tmp_path, "x", "y"):
        raise ValueError("other")
    with pytest.raises(disk.DiskFull, match=r"needs about 1,048,576.0 MiB"):
        disk.require(tmp_path, 2 ** 40, "a huge export", "it resumes")


def test_a_stage_resolves_its_config_locks_its_output_and_gives_memory_back(tmp_path,
                                                                             monkeypatch):
    from configs import math as math_config

    released = []
    monkeypatch.setattr(host_memory, "release", lambda: released.append(1))

    @stages.stage("train")
    def failing(config):
        assert (Path(config.workdir) / workdir_lock.LOCK_NAME).exists()
        assert config.train.base_confidence in ("model", "cached")
        raise RuntimeError("stopped")

    config = math_config.get_config("tiny")
    config.workdir = str(tmp_path)
    with pytest.raises(RuntimeError, match="stopped"):
        failing(config)
    assert released == [1] and not (tmp_path / workdir_lock.LOCK_NAME).exists()
    workdir_lock.acquire(tmp_path / workdir_lock.LOCK_NAME, "the workdir")
    with pytest.raises(UserError, match=r"is in use by another run: pid \d+ on this machine"):
        failing(config)
