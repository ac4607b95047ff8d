"""The sandbox that runs model-written programs: outcomes, limits, and hostile programs contained.

Every hostile program runs with timeout_s=3, so a broken sandbox fails these tests instead of
hanging them. Tests of the guarantees that need root (privilege drop, namespaces, cleanup by uid)
skip when the suite does not run as root.
"""

import os
import secrets
import socket
import tempfile
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from dasd_jax.errors import UserError
from dasd_jax.tasks.sandbox import Outcome, run_python

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="privilege drop and namespaces need root")
HOSTILE = {"timeout_s": 3}


def program(text: str) -> str:
    return textwrap.dedent(text).lstrip()


def live_processes(uid: int) -> list[int]:
    """Pids of the processes (zombies excepted) that have `uid` among their uids."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if str(uid) in fields["Uid"].split() and not fields["State"].strip().startswith(("Z", "X")):
            found.append(int(entry.name))
    return found


def is_running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


# ----------------------------------------------------------------------------- outcomes


def test_a_program_that_exits_0_passes_and_its_output_comes_back():
    outcome = run_python("print('hello')\n")
    assert isinstance(outcome, Outcome)
    assert (outcome.status, outcome.returncode, outcome.stdout) == ("passed", 0, "hello\n")
    assert outcome.passed and 0 < outcome.seconds < 10


def test_a_failed_assert_or_a_syntax_error_fails_with_the_traceback():
    outcome = run_python("assert 1 + 1 == 3, 'arithmetic'\n")
    assert (outcome.status, outcome.returncode) == ("failed", 1)
    assert "AssertionError: arithmetic" in outcome.stderr
    assert run_python("def f(:\n").status == "failed"


def test_a_program_killed_by_a_signal_crashed():
    outcome = run_python("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n")
    assert (outcome.status, outcome.returncode) == ("crashed", -11)


def test_output_is_truncated_to_a_few_kilobytes():
    outcome = run_python("import sys\nsys.stdout.write('x' * 1_000_000)\n")
    assert outcome.passed
    assert len(outcome.stdout) < 5000 and outcome.stdout.endswith("more bytes]")


def test_stdin_is_empty_and_the_environment_minimal():
    outcome = run_python(program("""
        import os, sys
        assert sys.stdin.read() == ""
        assert sys.flags.isolated
        assert not any(key.endswith(("TOKEN", "KEY", "SECRET")) for key in os.environ), os.environ
        assert set(os.environ) >= {"PATH", "LANG", "HOME"}
    """), **HOSTILE)
    assert outcome.passed, outcome.stderr


def test_bad_limits_are_user_errors():
    with pytest.raises(UserError, match="timeout_s"):
        run_python("pass", timeout_s=0)
    with pytest.raises(UserError, match="python"):
        run_python("pass", python="/nonexistent/python")


def test_the_program_runs_in_a_fresh_directory_that_is_removed_afterwards():
    outcome = run_python(program("""
        import os
        assert os.listdir(".") == ["program.py"], os.listdir(".")
        open("scratch.txt", "w").write("data")
        print(os.getcwd())
    """), **HOSTILE)
    assert outcome.passed, outcome.stderr
    name = Path(outcome.stdout.strip()).name
    assert name.startswith("dasd-sandbox-")
    assert not (Path(tempfile.gettempdir()) / name).exists()


# ----------------------------------------------------------------------------- hostile programs


@needs_root
def test_the_program_runs_as_an_unprivileged_uid_of_its_own():
    outcome = run_python("import os\nprint(os.getuid(), os.geteuid(), os.getgid(), "
                         "os.getgroups())\n")
    uid, euid, gid, groups = outcome.stdout.strip().split(maxsplit=3)
    assert uid == euid != "0" and gid != "0" and groups == "[]"
    second = run_python("import os\nprint(os.getuid())\n")
    assert second.stdout.strip() != uid


def test_killing_the_parent_or_everyone_fails_and_the_test_run_survives():
    outcome = run_python("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n", **HOSTILE)
    assert outcome.status == "failed" and "PermissionError" in outcome.stderr
    if ROOT:  # kill(-1) reaches the processes of the caller's uid: only the run's own
        outcome = run_python("import os, signal\nos.kill(-1, signal.SIGKILL)\nprint('alive')\n",
                             **HOSTILE)
        assert outcome.passed and outcome.stdout == "alive\n"
    assert is_running(os.getpid()) and is_running(os.getppid())


@pytest.mark.subprocess
def test_a_fork_bomb_is_bounded_and_leaves_no_process_behind():
    started = time.monotonic()
    outcome = run_python(program("""
        import os
        print(os.getuid(), flush=True)
        while True:
            try:
                os.fork()
            except OSError:
                pass
    """), max_processes=16, **HOSTILE)
    assert outcome.status in ("timeout", "failed", "crashed")
    assert time.monotonic() - started < 3 + 10
    if ROOT:
        assert live_processes(int(outcome.stdout.split()[0])) == []


@pytest.mark.subprocess
@needs_root
def test_a_fork_bomb_in_one_run_does_not_starve_a_concurrent_run():
    bomb = program("""
        import os
        while True:
            try:
                os.fork()
            except OSError:
                pass
    """)
    with ThreadPoolExecutor(2) as pool:
        bombed = pool.submit(run_python, bomb, max_processes=16, **HOSTILE)
        time.sleep(0.5)
        honest = pool.submit(run_python, "print(sum(range(10)))\n", timeout_s=10)
        assert honest.result().passed, honest.result()
        assert not bombed.result().passed


def test_a_memory_hog_gets_a_memory_error_not_the_machine():
    outcome = run_python("block = bytearray(10 * 1024 ** 3)\n", memory_mb=512, **HOSTILE)
    assert outcome.status in ("failed", "crashed") and "MemoryError" in outcome.stderr
    outcome = run_python("chunks = []\nwhile True:\n    chunks.append(bytearray(64 << 20))\n",
                         memory_mb=512, **HOSTILE)
    assert outcome.status in ("failed", "crashed")


@pytest.mark.subprocess
def test_an_infinite_loop_times_out_and_the_whole_group_is_killed():
    started = time.monotonic()
    outcome = run_python(program("""
        import os, subprocess
        child = subprocess.Popen(["sleep", "100"])
        print(os.getpid(), child.pid, os.getuid(), flush=True)
        while True:
            pass
    """), timeout_s=1.5)
    assert outcome.status == "timeout" and outcome.returncode == -9
    assert 1.5 <= outcome.seconds < 1.5 + 5 and time.monotonic() - started < 1.5 + 5
    pid, child, uid = map(int, outcome.stdout.split())
    assert not is_running(pid) and not is_running(child)
    if ROOT:
        assert live_processes(uid) == []


@pytest.mark.subprocess
@needs_root
def test_a_background_process_in_its_own_session_does_not_outlive_the_run():
    started = time.monotonic()
    outcome = run_python(program("""
        import os, subprocess, sys
        sleeper = subprocess.Popen(["sleep", "100"], start_new_session=True)
        if os.fork() == 0:  # a double-forked daemon, too
            os.setsid()
            if os.fork() == 0:
                while True:
                    pass
            os._exit(0)
        print(sleeper.pid, os.getuid(), flush=True)
    """), **HOSTILE)
    assert outcome.passed, outcome.stderr
    assert time.monotonic() - started < 3  # did not wait for the sleeper
    sleeper, uid = map(int, outcome.stdout.split())
    assert not is_running(sleeper)
    assert live_processes(uid) == []


@needs_root
def test_writes_outside_the_working_directory_do_not_reach_the_machine(tmp_path):
    tag = secrets.token_hex(6)
    targets = [Path(f"/tmp/owned-{tag}"), Path(f"/var/tmp/owned-{tag}"),
               Path(f"/dev/shm/owned-{tag}"), Path(f"/work/owned-{tag}"), tmp_path / f"owned-{tag}",
               Path(__file__).with_name(f"owned-{tag}.py")]
    outcome = run_python(program(f"""
        for path in {[str(t) for t in targets]!r}:
            try:
                open(path, "w").write("owned")
                print("wrote", path)
            except OSError as error:
                print("refused", path, type(error).__name__)
    """), **HOSTILE)
    assert outcome.passed, outcome.stderr
    assert "refused /work/" in outcome.stdout  # read-only, and not its directory
    assert [target for target in targets if target.exists()] == []


@needs_root
def test_the_program_cannot_reach_a_listener_on_the_loopback():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(0.5)
        port = listener.getsockname()[1]
        outcome = run_python(program(f"""
            import socket
            socket.create_connection(("127.0.0.1", {port}), timeout=1).sendall(b"leak")
        """), **HOSTILE)
        assert outcome.status == "failed" and "OSError" in outcome.stderr, outcome
        with pytest.raises(socket.timeout):
            listener.accept()


def test_concurrent_runs_are_independent():
    sources = [f"import time\ntime.sleep(0.2)\nprint({i})\n" for i in range(6)]
    with ThreadPoolExecutor(3) as pool:
        outcomes = list(pool.map(run_python, sources))
    assert [o.stdout.strip() for o in outcomes] == [str(i) for i in range(6)]


@pytest.mark.subprocess
def test_an_interpreter_inside_tmp_is_still_reachable_behind_the_private_tmp(tmp_path):
    # CI clones (and their virtualenvs) may live under /tmp, which the sandbox replaces.
    import subprocess
    import sys

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=60)
    outcome = run_python("import sys; print(sys.prefix)", python=str(venv / "bin" / "python"),
                         timeout_s=5)
    assert outcome.status == "passed", outcome.stderr
    assert outcome.stdout.strip() == str(venv)
