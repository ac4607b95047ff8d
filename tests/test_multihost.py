"""Two processes × 4 CPU devices (jax.distributed on localhost) compute what one process × 8
does."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from dasd_jax import rewrite, train
from configs import math as math_config
from tests import processes

pytestmark = [pytest.mark.subprocess, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
SETTINGS = ["--config.rewrite.generated_examples=8", "--config.rewrite.batch_size=8",
            "--config.rewrite.max_new_tokens=12", "--config.data.path={workdir}/rewrites.jsonl",
            "--config.data.target=response", "--config.train.steps=6",
            "--config.train.warmup_steps=1",
            "--config.train.batch_size=8", "--config.train.log_every=1",
            "--config.checkpoint.every=3", "--config.metrics.tensorboard=False",
            "--config.data.eval_path="]


def apply(config, flags):
    for flag in flags:
        key, value = flag[len("--config."):].split("=", 1)
        *parents, leaf = key.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        node[leaf] = type(node[leaf])(value) if node[leaf] is not None else value


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def run_two_processes(stage: str, workdir: Path) -> None:
    port = free_port()
    env = processes.environment(devices=4)
    hosts = [subprocess.Popen(
        [sys.executable, "-m", f"dasd_jax.{stage}", "--config=configs/math.py:tiny",
         f"--config.workdir={workdir}", *SETTINGS,
         f"--config.distributed.coordinator=localhost:{port}",
         "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)]
    try:
        outputs = [p.communicate(timeout=300)[0] for p in hosts]
    finally:
        for p in hosts:
            p.kill()
    for p, output in zip(hosts, outputs):
        assert p.returncode == 0, output[-3000:]


def test_two_hosts_rewrite_and_train_like_one(tmp_path):
    assert jax.device_count() == 8
    single, multi = tmp_path / "single", tmp_path / "multi"
    config = math_config.get_config("tiny")
    config.workdir = str(single)
    apply(config, SETTINGS)
    rewrite.rewrite(config)
    train.train(config)

    run_two_processes("rewrite", multi)
    run_two_processes("train", multi)

    lines = {d: [json.loads(x) for x in (d / "rewrites.jsonl").read_text().splitlines()]
             for d in (single, multi)}
    for one, two in zip(lines[single], lines[multi]):
        assert one["response_ids"] == two["response_ids"] and one["source"] == two["source"]
        np.testing.assert_allclose(one["ref_logprob"], two["ref_logprob"], atol=1e-5)
    losses = {d: [json.loads(x)["loss"] for x in (d / "metrics.jsonl").read_text().splitlines()]
              for d in (single, multi)}
    assert len(losses[multi]) == 6
    np.testing.assert_allclose(losses[multi], losses[single], rtol=1e-5)
    params = {d: load_file(str(d / "hf" / "model.safetensors")) for d in (single, multi)}
    for name, value in params[single].items():
        np.testing.assert_allclose(params[multi][name], value, atol=1e-5, err_msg=name)
    checkpoints = sorted(int(p.name) for p in (multi / "checkpoints").iterdir() if p.name.isdigit())
    assert checkpoints[-1] == 6
