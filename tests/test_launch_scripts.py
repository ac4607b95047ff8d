"""The launch scripts (launch/): the commands their dry runs print, their argument errors, the
preemption / failure handling of their real runs against fake gcloud / ssh / srun, and shellcheck.

Nothing here reaches a network: dry runs get a PATH whose gcloud, ssh, scontrol and srun fail
the test when called, and the real runs get scripted stand-ins that record their arguments.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.subprocess

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
TPU_VM = LAUNCH / "tpu_vm.sh"
GPU_MULTIHOST = LAUNCH / "gpu_multihost.sh"
SLURM_GPU = LAUNCH / "slurm_gpu.sbatch"
JAX_VERSION = re.search(r"^jax==(\S+)", (ROOT / "requirements.txt").read_text(), re.M).group(1)

TPU_BASE = ["--name", "dasd-v5e", "--zone", "us-west4-a", "--workdir", "gs://bucket/run",
            "--config", "configs/math.py:tiny"]


# ----------------------------------------------------------------------------- helpers


def write_program(directory: Path, name: str, body: str) -> None:
    path = directory / name
    path.write_text("#!/usr/bin/env bash\n" + textwrap.dedent(body))
    path.chmod(0o755)


@pytest.fixture
def offline_path(tmp_path):
    """A PATH on which gcloud, ssh, scontrol and srun only leave a mark that fails the test."""
    bin_dir = tmp_path / "poisoned-bin"
    bin_dir.mkdir()
    marker = tmp_path / "called"
    for name in ("gcloud", "ssh", "scontrol", "srun"):
        write_program(bin_dir, name, f'echo "{name} $*" >> {shlex.quote(str(marker))}\nexit 97\n')
    yield f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    assert not marker.exists(), f"a dry run called a real tool: {marker.read_text()}"


def launch(script: Path, *args: str, path: str, env: dict | None = None, timeout: float = 20):
    return subprocess.run([str(script), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PATH": path, **(env or {})}, cwd=ROOT)


def printed_commands(stdout: str) -> list[list[str]]:
    """Every `+ cmd` line of a dry run, as the argv it stands for."""
    lines = stdout.splitlines()
    assert lines and all(line.startswith("+ ") for line in lines), stdout
    return [shlex.split(line[2:]) for line in lines]


def gcloud_verb(argv: list[str]) -> str:
    """'tpu-vm create', 'queued-resources describe', ... of a gcloud argv; 'git archive';
    'fit check' for the local dry run."""
    if argv[0] == "git":
        return "git archive"
    if argv[1:3] == ["-m", "dasd_jax.train"] and "--config.dry_run=True" in argv:
        return "fit check"
    assert argv[:3] == ["gcloud", "compute", "tpus"], argv
    return f"{argv[3]} {argv[4]}"


def remote_command(argv: list[str]) -> str:
    """The --command=... of a `gcloud compute tpus tpu-vm ssh` argv."""
    (command,) = [arg.removeprefix("--command=") for arg in argv if arg.startswith("--command=")]
    return command


def python_argv(remote: str) -> list[str]:
    """The words from `python`'s `-m` on, in a remote shell line `... exec PYTHON -m ...`."""
    words = shlex.split(remote)
    return words[words.index("-m"):]


def tpu_dry_run(*args: str, path: str):
    result = launch(TPU_VM, "--dry-run", *TPU_BASE, *args, path=path)
    assert result.returncode == 0, result.stderr
    return printed_commands(result.stdout), result


# ----------------------------------------------------------------------------- TPU VM


def test_tpu_dry_run_creates_the_spot_vm_installs_the_pinned_jax_tpu_and_trains_on_all_workers(
        offline_path):
    commands, _ = tpu_dry_run("--accelerator", "v5litepod-16", "--create", "--spot", "--",
                              "--config.train.steps=2000", path=offline_path)
    assert [gcloud_verb(c) for c in commands] == [
        "fit check", "git archive", "tpu-vm create", "tpu-vm scp", "tpu-vm ssh", "tpu-vm ssh",
        "tpu-vm describe"]
    fit, archive, create, scp, install, train, describe = commands
    assert fit[1:] == ["-m", "dasd_jax.train", f"--config={ROOT}/configs/math.py:tiny",
                       "--config.dry_run=True", "--config.compile_for=v5litepod-16",
                       "--config.train.steps=2000"]
    assert archive[-1] == "HEAD" and archive[1:3] == ["-C", str(ROOT)]
    assert create == ["gcloud", "compute", "tpus", "tpu-vm", "create", "dasd-v5e",
                      "--zone=us-west4-a", "--accelerator-type=v5litepod-16",
                      "--version=tpu-ubuntu2204-base", "--spot"]
    tarball = next(arg.split("=", 1)[1] for arg in archive if arg.startswith("--output="))
    assert scp[5:7] == [tarball, "dasd-v5e:dasd_jax.tar.gz"] and "--worker=all" in scp
    for ssh in (install, train):
        assert ssh[5:8] == ["dasd-v5e", "--zone=us-west4-a", "--worker=all"]
    install_words = shlex.split(remote_command(install).replace(";", " ; "))
    assert f"jax[tpu]=={JAX_VERSION}" in install_words
    assert ["-r", "dasd_jax/requirements.txt", "-e", "./dasd_jax"] == \
        install_words[install_words.index("-r"):install_words.index("-r") + 4]
    assert python_argv(remote_command(train)) == [
        "-m", "dasd_jax.train", "--config=configs/math.py:tiny", "--config.workdir=gs://bucket/run",
        "--config.train.steps=2000"]
    assert describe[5:] == ["dasd-v5e", "--zone=us-west4-a", "--format=value(state)"]


def test_tpu_simulated_preemption_deletes_recreates_reinstalls_and_reruns_the_same_command(
        offline_path):
    commands, result = tpu_dry_run("--accelerator", "v5litepod-16", "--create", "--spot",
                                   "--simulate-preemption", path=offline_path)
    assert [gcloud_verb(c) for c in commands] == [
        "fit check", "git archive", "tpu-vm create", "tpu-vm scp", "tpu-vm ssh", "tpu-vm ssh",
        "tpu-vm describe", "tpu-vm delete", "tpu-vm create", "tpu-vm scp", "tpu-vm ssh",
        "tpu-vm ssh", "tpu-vm describe"]
    commands = commands[1:]
    assert commands[6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "dasd-v5e",
                           "--zone=us-west4-a", "--quiet"]
    assert commands[7] == commands[1]  # recreated as it was created
    assert commands[10] == commands[4]  # same workdir: the trainer resumes from its checkpoint
    assert "restart 1 of 5" in result.stderr


def test_tpu_queued_spot_resource_is_waited_for_and_recreated_through_the_queue(offline_path):
    commands, _ = tpu_dry_run("--accelerator", "v5litepod-16", "--version", "v2-alpha-tpuv5-lite",
                              "--create", "--queued", "--spot", "--project", "my-project",
                              "--simulate-preemption", path=offline_path)
    verbs = [gcloud_verb(c) for c in commands]
    commands = commands[1:]
    assert verbs == ["fit check", "git archive", "queued-resources create",
                     "queued-resources describe",
                     "tpu-vm scp", "tpu-vm ssh", "tpu-vm ssh", "queued-resources describe",
                     "queued-resources delete", "queued-resources create",
                     "queued-resources describe", "tpu-vm scp", "tpu-vm ssh", "tpu-vm ssh",
                     "queued-resources describe"]
    assert commands[1] == [
        "gcloud", "compute", "tpus", "queued-resources", "create", "dasd-v5e",
        "--node-id=dasd-v5e", "--zone=us-west4-a", "--project=my-project",
        "--accelerator-type=v5litepod-16", "--runtime-version=v2-alpha-tpuv5-lite", "--spot"]
    assert commands[2][-1] == "--format=value(state.state)"
    assert commands[7][-2:] == ["--force", "--quiet"]
    assert all("--project=my-project" in c for c in commands[1:])


def test_tpu_run_on_an_existing_on_demand_vm_neither_creates_nor_watches_it(offline_path):
    commands, result = tpu_dry_run("--stage", "rewrite", path=offline_path)
    assert [gcloud_verb(c) for c in commands] == [
        "git archive", "tpu-vm scp", "tpu-vm ssh", "tpu-vm ssh"]
    assert "no --accelerator: the fit check is skipped" in result.stderr
    assert python_argv(remote_command(commands[-1]))[:2] == ["-m", "dasd_jax.rewrite"]


def test_tpu_stage_flags_with_spaces_quotes_and_dollars_reach_the_workers_unchanged(offline_path):
    extra = ["--config.data.system_prompt=Think, then say it's done.",
             '--config.data.prompt_format=Q: "$HOME" `x` \\ {prompt}']
    commands, _ = tpu_dry_run("--", *extra, path=offline_path)
    assert python_argv(remote_command(commands[-1]))[-2:] == extra


@pytest.mark.parametrize("args, message", [
    (["--name", "n", "--zone", "z"], "--workdir is required"),
    (["--zone", "z", "--workdir", "gs://b/r"], "--name is required"),
    ([*TPU_BASE, "--spot"], "--accelerator is required"),
    ([*TPU_BASE, "--stage", "deploy"], "--stage must be"),
    ([*TPU_BASE, "--max-restarts", "many"], "--max-restarts must be"),
    ([*TPU_BASE, "--config", "configs/nope.py"], "no file configs/nope.py"),
    ([*TPU_BASE, "--workdir"], "--workdir needs a value"),
    ([*TPU_BASE, "--steps=3"], "unknown argument '--steps'"),
])
def test_tpu_argument_errors_exit_2_with_the_problem_and_the_usage(args, message, offline_path):
    result = launch(TPU_VM, "--dry-run", *args, path=offline_path)
    assert result.returncode == 2
    assert message in result.stderr and "usage: tpu_vm.sh" in result.stderr
    assert result.stdout == ""


def test_tpu_simulated_preemption_is_refused_outside_a_spot_dry_run(offline_path):
    result = launch(TPU_VM, *TPU_BASE, "--accelerator", "v4-8", "--spot", "--simulate-preemption",
                    path=offline_path)
    assert result.returncode == 2 and "needs --dry-run and --spot" in result.stderr


@pytest.fixture
def fake_local_python(tmp_path):
    """A local interpreter for the fit check that records its arguments and exits
    $FAKE_FIT_STATUS (0 when unset)."""
    program = tmp_path / "fake-local-python"
    write_program(tmp_path, program.name, f"""\
        printf '%s\t' "$@" >> {tmp_path / 'fit-checks.tsv'}; echo >> {tmp_path / 'fit-checks.tsv'}
        exit "${{FAKE_FIT_STATUS:-0}}"
        """)
    return str(program)


@pytest.fixture
def fake_gcloud(tmp_path):
    """A gcloud that records each call; `tpu-vm describe` prints $FAKE_STATE, the run command's
    ssh exits $FAKE_RUN_STATUS, the rest succeed."""
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.tsv"
    write_program(bin_dir, "gcloud", f"""\
        {{ printf '%s\t' "$@"; echo; }} >> {calls}
        case "$*" in
          *"tpu-vm describe"*) echo "$FAKE_STATE" ;;
          *"tpu-vm scp"*) [ -s "$5" ] || exit 5 ;;  # the tarball was made
          *dasd_jax.train*) exit "$FAKE_RUN_STATUS" ;;
        esac
        """)
    path = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    return path, lambda: [line.split("\t")[:-1] for line in calls.read_text().splitlines()]


def test_tpu_real_spot_run_recreates_after_each_preemption_until_max_restarts(
        fake_gcloud, fake_local_python):
    path, calls = fake_gcloud
    result = launch(TPU_VM, *TPU_BASE, "--accelerator", "v5litepod-16", "--spot",
                    "--local-python", fake_local_python,
                    "--max-restarts", "1", "--preemption-grace", "0", path=path,
                    env={"FAKE_STATE": "PREEMPTED", "FAKE_RUN_STATUS": "255"})
    assert result.returncode == 1
    assert "--max-restarts 1 are used up" in result.stderr
    assert [" ".join(call[2:4]) for call in calls()] == [
        "tpu-vm scp", "tpu-vm ssh", "tpu-vm ssh", "tpu-vm describe",
        "tpu-vm delete", "tpu-vm create", "tpu-vm scp", "tpu-vm ssh", "tpu-vm ssh",
        "tpu-vm describe"]


def test_tpu_real_spot_run_that_ends_on_a_ready_vm_is_final(fake_gcloud):
    path, calls = fake_gcloud
    finished = launch(TPU_VM, *TPU_BASE, "--accelerator", "v4-8", "--spot",
                      "--preemption-grace", "0", "--skip-fit-check", path=path,
                      env={"FAKE_STATE": "READY", "FAKE_RUN_STATUS": "0"})
    assert finished.returncode == 0, finished.stderr
    assert "fit check skipped (--skip-fit-check)" in finished.stderr
    failed = launch(TPU_VM, *TPU_BASE, "--accelerator", "v4-8", "--spot",
                    "--preemption-grace", "0", "--skip-fit-check", path=path,
                    env={"FAKE_STATE": "READY", "FAKE_RUN_STATUS": "3"})
    assert failed.returncode == 3 and "was not preempted" in failed.stderr
    assert not any("delete" in call for call in calls())


def test_a_run_that_does_not_fit_the_slice_stops_before_anything_is_created(
        fake_gcloud, fake_local_python, tmp_path):
    path, calls = fake_gcloud
    result = launch(TPU_VM, *TPU_BASE, "--accelerator", "v5litepod-8", "--create", "--spot",
                    "--local-python", fake_local_python, "--", "--config.train.batch_size=512",
                    path=path, env={"FAKE_FIT_STATUS": "3", "FAKE_STATE": "READY",
                                    "FAKE_RUN_STATUS": "0"})
    assert result.returncode == 3
    assert "the fit check for v5litepod-8 failed (exit 3" in result.stderr
    assert not (tmp_path / "calls.tsv").exists()  # gcloud was never called
    (check,) = [line.split("\t")[:-1] for line in (tmp_path / "fit-checks.tsv").read_text()
                .splitlines()]
    assert check == ["-m", "dasd_jax.train", f"--config={ROOT}/configs/math.py:tiny",
                     "--config.dry_run=True", "--config.compile_for=v5litepod-8",
                     "--config.train.batch_size=512"]


# ----------------------------------------------------------------------------- GPU hosts


def test_gpu_dry_run_starts_one_process_per_host_with_coordinator_count_and_id(offline_path):
    result = launch(GPU_MULTIHOST, "--dry-run", "--hosts", "gpu01,ubuntu@gpu02",
                    "--coordinator-port", "4321", "--gpus-per-host", "4",
                    "--workdir", "/shared/runs/math", "--config", "configs/math.py:tiny",
                    "--remote-dir", "/opt/dasd jax", "--", "--config.train.steps=5",
                    path=offline_path)
    assert result.returncode == 0, result.stderr
    fit, *commands = printed_commands(result.stdout)
    assert fit[1:] == ["-m", "dasd_jax.train", f"--config={ROOT}/configs/math.py:tiny",
                       "--config.dry_run=True", "--config.compile_for=h100x8",
                       "--config.train.steps=5"]
    assert [c[:-1] for c in commands] == [["ssh", "-tt", "-o", "BatchMode=yes", "gpu01"],
                                          ["ssh", "-tt", "-o", "BatchMode=yes", "ubuntu@gpu02"]]
    for process_id, command in enumerate(commands):
        remote = shlex.split(command[-1])
        assert remote[:5] == ["cd", "/opt/dasd jax", "&&", "CUDA_VISIBLE_DEVICES=0,1,2,3",
                              "PYTHONUNBUFFERED=1"]
        assert python_argv(command[-1]) == [
            "-m", "dasd_jax.train", "--config=configs/math.py:tiny",
            "--config.workdir=/shared/runs/math",
            "--config.distributed.coordinator=gpu01:4321",
            "--config.distributed.num_processes=2",
            f"--config.distributed.process_id={process_id}",
            "--config.metrics.progress_bar=False", "--config.train.steps=5"]


@pytest.mark.parametrize("args, message", [
    (["--hosts", "a,b"], "--workdir is required"),
    (["--workdir", "/w"], "--hosts is required"),
    (["--hosts", "a,,b", "--workdir", "/w"], "empty"),
    (["--hosts", "a", "--workdir", "/w", "--coordinator-port", "70000"], "--coordinator-port"),
    (["--hosts", "a", "--workdir", "/w", "--gpu", "v100"], "--gpu must be h100, h200 or a100"),
])
def test_gpu_argument_errors_exit_2_with_the_problem_and_the_usage(args, message, offline_path):
    result = launch(GPU_MULTIHOST, "--dry-run", *args, path=offline_path)
    assert result.returncode == 2
    assert message in result.stderr and "usage: gpu_multihost.sh" in result.stderr


@pytest.fixture
def fake_ssh(tmp_path):
    """An ssh whose session on a host named `bad*` fails with status 3 after half a second;
    the others run until terminated (and note that in `terminated`) or end after `ok*`."""
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir()
    terminated = tmp_path / "terminated"
    write_program(bin_dir, "ssh", f"""\
        host=${{@: -2:1}}
        echo "hello from process ${{@: -1}}" | grep -o 'process_id=[0-9]*'
        case $host in
          bad*) sleep 0.5; echo failing; exit 3 ;;
          ok*) exit 0 ;;
        esac
        trap 'kill $!; echo "$host" >> {terminated}; exit 143' TERM
        sleep 20 & wait
        """)
    return f"{bin_dir}{os.pathsep}{os.environ['PATH']}", terminated


def test_gpu_run_streams_prefixed_output_and_stops_every_host_when_one_fails(fake_ssh):
    path, terminated = fake_ssh
    result = launch(GPU_MULTIHOST, "--hosts", "slow1,bad,slow2", "--workdir", "/w",
                    "--skip-fit-check", path=path, timeout=10)
    assert result.returncode == 3
    assert sorted(result.stdout.splitlines()) == [
        "[bad] failing", "[bad] process_id=1", "[slow1] process_id=0", "[slow2] process_id=2"]
    assert sorted(terminated.read_text().split()) == ["slow1", "slow2"]
    assert "bad (process 1) exited with status 3" in result.stderr


def test_gpu_run_exits_0_when_every_host_succeeds(fake_ssh, fake_local_python, tmp_path):
    path, terminated = fake_ssh
    result = launch(GPU_MULTIHOST, "--hosts", "ok1,ok2", "--workdir", "/w", "--gpu", "h200",
                    "--local-python", fake_local_python, path=path)
    assert result.returncode == 0, result.stderr
    assert not terminated.exists()
    checks = (tmp_path / "fit-checks.tsv").read_text().splitlines()
    assert [line.split("\t")[4] for line in checks] == ["--config.compile_for=h200x16"]


# ----------------------------------------------------------------------------- SLURM


def test_slurm_job_runs_one_process_per_node_with_all_its_gpus(tmp_path):
    """scontrol / srun stand-ins: srun runs the task command once per node with SLURM_PROCID
    and SLURM_LOCALID set, and `python` prints what it was started with."""
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir()
    write_program(bin_dir, "scontrol", """\
        [ "$*" = "show hostnames gpu[01-02]" ] || exit 9
        printf 'gpu01\\ngpu02\\n'
        """)
    write_program(bin_dir, "srun", """\
        [ "$1" = --kill-on-bad-exit=1 ] || exit 9
        shift
        for id in 0 1; do SLURM_PROCID=$id SLURM_LOCALID=0 "$@" || exit; done
        """)
    write_program(bin_dir, "fake-python", """\
        printf '%s\t' "${SLURM_LOCALID-unset}" "$@"; echo
        """)
    result = subprocess.run(
        ["bash", str(SLURM_GPU), "--config.train.steps=5"], capture_output=True, text=True,
        cwd=ROOT, timeout=10,
        env={**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
             "SLURM_JOB_ID": "1234", "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_JOB_NUM_NODES": "2",
             "PYTHON": "fake-python", "CONFIG": "configs/code.py", "WORKDIR": "/shared/code"})
    assert result.returncode == 0, result.stderr
    fit_check, *processes = [line.split("\t")[:-1] for line in result.stdout.splitlines()[1:]]
    assert fit_check[1:] == ["-m", "dasd_jax.train", "--config=configs/code.py",
                             "--config.dry_run=True", "--config.compile_for=h100x16",
                             "--config.train.steps=5"]
    port = 1234 % 4096 + 61440
    for process_id, (local_id, *argv) in enumerate(processes):
        assert local_id == "unset"  # else JAX would give the process GPU 0 only
        assert argv[:2] == ["-m", "dasd_jax.train"]
        assert set(argv[2:]) == {
            "--config=configs/code.py", "--config.workdir=/shared/code",
            f"--config.distributed.coordinator=gpu01:{port}",
            "--config.distributed.num_processes=2", f"--config.distributed.process_id={process_id}",
            "--config.train.steps=5"}
    assert len(processes) == 2


# ----------------------------------------------------------------------------- shellcheck


def test_every_launch_script_is_shellcheck_clean():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    scripts = sorted(LAUNCH.glob("*.sh")) + [SLURM_GPU]
    result = subprocess.run(["shellcheck", "-x", *map(str, scripts)], capture_output=True,
                            text=True, cwd=LAUNCH, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
