"""Run an untrusted Python program (a model's solution plus its tests) and report pass/fail.

    outcome = sandbox.run_python("assert 1 + 1 == 2\\n", timeout_s=10)
    outcome.status      # "passed" | "failed" | "timeout" | "crashed"
    outcome.returncode, outcome.stdout, outcome.stderr, outcome.seconds

passed = exit status 0 within `timeout_s`; failed = another exit status (an exception, a failed
assert, MemoryError); timeout = still running at `timeout_s` (everything is then killed); crashed
= killed by a signal (CPU or file-size limit, segfault).

How a run is set up. A small root-side launcher (`_LAUNCHER`, a fresh `python -I -S`, so no
fork-unsafe `preexec_fn` runs in this possibly multi-threaded process) is started in a new
session and process group, with stdin from /dev/null, stdout/stderr into unlinked temporary
files and a minimal environment (PATH, LANG, HOME = the working directory; nothing inherited).
The launcher then, before `execve` of `python -I program.py`:

* raises its OOM score to 1000, so under memory pressure the kernel kills sandboxed processes
  before anything else;
* when root: enters a new network namespace (only a loopback device, down: every connection
  fails) and a new mount namespace in which every mount is re-mounted read-only and nosuid, and
  /tmp, /var/tmp and /dev/shm are one fresh tmpfs of `disk_mb` MiB. The program's working
  directory is a fresh directory inside that tmpfs; nothing it writes reaches the host's disk,
  and it all disappears with the run's last process. An interpreter under a directory others
  cannot enter (pyenv under /root, mode 700) is made reachable by covering that directory with
  a tmpfs holding only the interpreter's own directories (the rest of it stays hidden);
* sets RLIMIT_AS (`memory_mb`), RLIMIT_CPU (`timeout_s` + 1 s), RLIMIT_FSIZE (`max_file_mb`),
  RLIMIT_NPROC (`max_processes`), RLIMIT_NOFILE (256) and RLIMIT_CORE (0);
* when root: drops to a fresh, otherwise unused uid/gid for this run (no supplementary groups)
  and sets no_new_privs. A uid of its own rather than the shared `nobody`: RLIMIT_NPROC counts
  the processes of a uid, so concurrent runs as `nobody` would share one budget (a fork bomb in
  one would fail the others), and `nobody` may own system processes and files (this machine's
  ext4 reserves blocks for uid 65534). The program cannot signal, ptrace or write to root's
  processes or files: `os.kill(os.getppid(), 9)` fails with PermissionError.

After the program exits or the time is up, the whole process group is SIGKILLed, and then every
remaining process of the run's uid (daemons that called setsid, double forks) is killed with one
`kill(-1, SIGKILL)` sent as that uid, which the kernel applies atomically (no fork can slip
through) and which cannot reach any other uid. `run_python` returns only when no process of the
run is left; the host working directory is removed whatever happened.

Not guaranteed:
* Memory is bounded per process (RLIMIT_AS): `max_processes` processes can together map
  `max_processes * memory_mb` (plus `disk_mb` of tmpfs). There is no per-run cgroup; the OOM
  score makes the kernel kill sandboxed processes first if the machine runs short.
* The program can read whatever world-readable files the machine has (the project, the data,
  /etc) and see the host's process list in /proc (no PID namespace); it cannot write them.
* CPU: processes compete for the host's cores; each is limited to `timeout_s` + 1 s of CPU and
  the run to `timeout_s` of wall time.
* Not root (a developer's machine): no privilege drop. The launcher tries an unprivileged user
  namespace to get the same network and mount isolation; where the kernel refuses, the program
  runs with network access in the host working directory, RLIMIT_NPROC is the user's current
  process count + `max_processes`, and only the process group is killed (a program that calls
  setsid can outlive the run). Each fallback is reported once as a `SandboxWarning`.
* As root, if the network or mount namespace cannot be created (a container without
  CAP_SYS_ADMIN), the run goes on without it and warns; if privileges cannot be dropped, no
  program runs (`SandboxError`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pwd
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

from dasd_jax.errors import UserError

STATUSES = ("passed", "failed", "timeout", "crashed")
OUTPUT_LIMIT = 4096  # bytes of stdout / stderr kept in an Outcome
OPEN_FILES = 256
ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
       "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
       "MKL_NUM_THREADS": "1"}
# Per-run ids are drawn from a range no distribution or container runtime allocates.
_ID_BASE, _ID_SPAN = 1_610_612_736, 1 << 24


class SandboxError(RuntimeError):
    """The sandbox itself could not be set up (the program did not run)."""


class SandboxWarning(UserWarning):
    """An isolation layer is unavailable on this machine; the run used a weaker fallback."""


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How a program run ended. `stdout` / `stderr` keep the first `OUTPUT_LIMIT` bytes."""

    status: str  # one of STATUSES
    returncode: int | None  # negative: killed by that signal (-9 after a timeout)
    stdout: str
    stderr: str
    seconds: float
    verdict: str = ""  # what the program wrote to its verdict file (runs with private_input)

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# Runs as root (or the calling user) in the new session; argv[1] is the JSON run config.
_LAUNCHER = r'''
import ctypes, json, os, resource, sys
c = json.loads(sys.argv[1])
report = c["report_fd"]
def say(line):
    os.write(report, (line + "\n").encode())
def fail(what, error):
    say("error: %s: %s" % (what, error))
    os._exit(125)
libc = ctypes.CDLL(None, use_errno=True)
def call(name, *args):
    if getattr(libc, name)(*args) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))
def mount(source, target, fstype, flags, data):
    call("mount", source and source.encode(), target.encode(), fstype and fstype.encode(),
         ctypes.c_ulong(flags), data and data.encode())
NEWNS, NEWUSER, NEWNET = 0x20000, 0x10000000, 0x40000000
RDONLY, NOSUID, NODEV, NOEXEC, REMOUNT, BIND, REC, PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18
KEPT = {"nodev": NODEV, "noexec": NOEXEC, "noatime": 1024, "nodiratime": 2048,
        "relatime": 1 << 21, "strictatime": 1 << 24}

def interpreter_directories():
    # The launcher runs with -S, so sys.prefix is the base interpreter's even in a virtualenv:
    # the virtualenv's root (two levels above its bin/python) is named explicitly.
    python = os.path.abspath(c["python"])
    needed = sorted({os.path.realpath(p) for p in
                     (sys.base_prefix, sys.prefix, os.path.dirname(os.path.dirname(python)),
                      os.path.dirname(os.path.realpath(python)))})
    return [d for i, d in enumerate(needed)
            if not any(d.startswith(o.rstrip("/") + "/") for o in needed[:i])]

SCRATCH = ("/tmp", "/var/tmp", "/dev/shm")

def under_scratch(directory):
    return any(directory == s or directory.startswith(s + "/") for s in SCRATCH)

def expose_interpreter():
    # An interpreter under a directory others cannot enter (pyenv in /root, mode 700): cover
    # that directory with a tmpfs holding only the interpreter's own directories, bound in.
    closed = {}
    for directory in interpreter_directories():
        if under_scratch(directory):
            continue  # put back after the private /tmp is mounted, see below
        parts = directory.strip("/").split("/")
        for depth in range(1, len(parts)):
            ancestor = "/" + "/".join(parts[:depth])
            if not os.stat(ancestor).st_mode & 0o001:
                closed.setdefault(ancestor, []).append(directory)
                break
    for ancestor, directories in sorted(closed.items()):
        handles = {d: os.open(d, os.O_PATH | os.O_DIRECTORY) for d in directories}
        mount("tmpfs", ancestor, "tmpfs", NOSUID | NODEV, "size=16k,mode=755")
        for directory, handle in handles.items():
            os.makedirs(directory, 0o755, exist_ok=True)
            mount("/proc/self/fd/%d" % handle, directory, None, BIND | REC, None)
            os.close(handle)

try:
    with open("/proc/self/oom_score_adj", "w") as f:
        f.write("1000")
except OSError:
    pass
with open(c["program"], "rb") as f:
    source = f.read()

isolated = False
if c["root"]:
    try:
        call("unshare", NEWNS | NEWNET)
        isolated = True
    except OSError as error:
        say("warning: no mount and network namespace (%s): the program can reach the network "
            "and write to world-writable directories" % error)
else:
    try:
        uid, gid = os.getuid(), os.getgid()
        call("unshare", NEWUSER | NEWNS | NEWNET)
        for name, text in (("setgroups", "deny"), ("uid_map", "%d %d 1" % (uid, uid)),
                           ("gid_map", "%d %d 1" % (gid, gid))):
            with open("/proc/self/" + name, "w") as f:
                f.write(text)
        isolated = True
    except OSError as error:
        say("warning: not root and no user namespace (%s): the program can reach the network, "
            "write where this user can, and outlive the run with setsid" % error)

cwd = c["workdir"]
if isolated:
    try:
        mount(None, "/", None, REC | PRIVATE, None)
        if c["root"]:
            expose_interpreter()
        with open("/proc/self/mountinfo") as f:
            mounts = [line.split() for line in f]
        for fields in mounts:
            target = fields[4].encode().decode("unicode_escape")
            flags = sum(KEPT.get(option, 0) for option in fields[5].split(","))
            try:
                mount(None, target, None, REMOUNT | BIND | RDONLY | NOSUID | flags, None)
            except OSError:
                pass  # a mount hidden under another one, or one this namespace cannot change
        # An interpreter (a virtualenv) under /tmp, /var/tmp or /dev/shm would vanish under the
        # private /tmp: hold on to its directories and bind them back, read-only.
        scratch_handles = {d: os.open(d, os.O_PATH | os.O_DIRECTORY)
                           for d in interpreter_directories() if under_scratch(d)}
        mount("tmpfs", "/tmp", "tmpfs", NOSUID | NODEV,
              "size=%dm,nr_inodes=%d,mode=1777" % (c["disk_mb"], 16 * c["disk_mb"] + 256))
        for target in ("/var/tmp", "/dev/shm"):
            if os.path.isdir(target):
                mount("/tmp", target, None, BIND, None)
        for directory, handle in scratch_handles.items():
            os.makedirs(directory, 0o755, exist_ok=True)
            mount("/proc/self/fd/%d" % handle, directory, None, BIND | REC, None)
            mount(None, directory, None, REMOUNT | BIND | RDONLY | NOSUID, None)
            os.close(handle)
        cwd = "/tmp/" + os.path.basename(c["workdir"])
        os.mkdir(cwd, 0o700)
        os.chown(cwd, c["uid"], c["gid"])
        with open(cwd + "/program.py", "wb") as f:
            f.write(source)
    except OSError as error:
        if c["root"]:
            fail("mount namespace set-up", error)
        say("warning: no private /tmp (%s): the program can write where this user can" % error)
        cwd = c["workdir"]

try:
    for name, value in c["limits"].items():
        limit = getattr(resource, name)
        resource.setrlimit(limit, (value, value + 1) if name == "RLIMIT_CPU" else (value, value))
except (OSError, ValueError) as error:
    fail("resource limits", error)
if c["root"]:
    try:
        os.setgroups([])
        os.setresgid(c["gid"], c["gid"], c["gid"])
        os.setresuid(c["uid"], c["uid"], c["uid"])
    except OSError as error:
        fail("dropping privileges", error)
    if os.getuid() == 0 or os.geteuid() == 0:
        fail("dropping privileges", "still root")
try:
    call("prctl", 38, ctypes.c_ulong(1), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0))
except OSError:
    pass  # PR_SET_NO_NEW_PRIVS: extra, the uid drop is what matters
try:
    os.chdir(cwd)
    env = dict(c["env"], HOME=cwd, TMPDIR=cwd)
    os.set_inheritable(report, False)
    os.execve(c["python"], [c["python"]] + c["flags"] + ["program.py"] + c["program_args"], env)
except OSError as error:
    fail("starting " + c["python"], error)
'''

# Run as root with the run's (uid, gid): kill(-1) then reaches exactly that uid's processes.
_KILL_ALL_OF_UID = r'''
import os, sys
uid, gid = int(sys.argv[1]), int(sys.argv[2])
os.setgroups([])
os.setresgid(gid, gid, gid)
os.setresuid(uid, uid, uid)
try:
    os.kill(-1, 9)
except ProcessLookupError:
    pass
'''

# The ids of this process's runs in flight, so that concurrent threads never share one.
_ids_in_use: set[int] = set()
_ids_lock = threading.Lock()


def run_python(source: str, *, timeout_s: float = 10.0, memory_mb: int = 1024,
               max_processes: int = 32, max_file_mb: int = 16, disk_mb: int = 64,
               site_packages: bool = True, python: str | None = None,
               private_input: bytes | None = None) -> Outcome:
    """Runs `source` as `python -I program.py` in the sandbox described in the module docstring.

    `memory_mb` bounds each process's address space, `max_processes` the processes and threads
    the run may have at once, `max_file_mb` each file it writes (and its stdout / stderr),
    `disk_mb` all it writes. `site_packages=False` adds -S (standard library only, faster
    start). `python` is the interpreter (default: this one).

    `private_input`: bytes the program alone receives, as `python -I program.py INPUT_FD
    VERDICT_FD`: INPUT_FD is an unlinked file holding them (read it and close it before
    anything untrusted runs), VERDICT_FD an unlinked file whose content comes back as
    `Outcome.verdict` (tasks.harness uses them for a verdict only its tests can write).
    """
    python = python or sys.executable
    _check_arguments(timeout_s, memory_mb, max_processes, max_file_mb, disk_mb, python)
    root = os.geteuid() == 0
    run_id = _claim_id() if root else None
    uid, gid = (run_id, run_id) if root else (os.getuid(), os.getgid())
    workdir = Path(tempfile.mkdtemp(prefix="dasd-sandbox-"))
    try:
        program = workdir / "program.py"
        program.write_text(source, encoding="utf-8")
        program.chmod(0o644)
        if root:
            os.chown(workdir, uid, gid)
        limits = {"RLIMIT_AS": int(memory_mb * 2**20), "RLIMIT_CPU": math.ceil(timeout_s) + 1,
                  "RLIMIT_FSIZE": int(max_file_mb * 2**20), "RLIMIT_NOFILE": OPEN_FILES,
                  "RLIMIT_CORE": 0,
                  "RLIMIT_NPROC": max_processes + (0 if root else _count_processes(uid))}
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
                tempfile.TemporaryFile() as report, tempfile.TemporaryFile() as given, \
                tempfile.TemporaryFile() as verdict:
            program_fds = ()
            if private_input is not None:
                given.write(private_input)
                given.flush()
                given.seek(0)
                program_fds = (given.fileno(), verdict.fileno())
            config = {"report_fd": report.fileno(), "root": root, "uid": uid, "gid": gid,
                      "workdir": str(workdir), "program": str(program), "disk_mb": int(disk_mb),
                      "limits": limits, "python": python, "env": ENV,
                      "flags": ["-I"] if site_packages else ["-I", "-S"],
                      "program_args": [str(fd) for fd in program_fds]}
            start = time.monotonic()
            process = subprocess.Popen(
                [python, "-I", "-S", "-c", _LAUNCHER, json.dumps(config)], stdin=subprocess.DEVNULL,
                stdout=out, stderr=err, pass_fds=(report.fileno(), *program_fds),
                start_new_session=True, env=ENV, cwd="/")
            try:
                timed_out = not _wait_without_reaping(process.pid, timeout_s)
            finally:
                _kill_group(process)
                if root:
                    _kill_uid(uid, gid, python)
            seconds = time.monotonic() - start
            _raise_or_warn(_read(report, 1 << 16))
            returncode = process.returncode
            stdout, stderr = _read(out, OUTPUT_LIMIT), _read(err, OUTPUT_LIMIT)
            verdict_text = _read(verdict, OUTPUT_LIMIT) if program_fds else ""
    finally:
        _remove(workdir)
        if run_id is not None:
            with _ids_lock:
                _ids_in_use.discard(run_id)
    if timed_out:
        status = "timeout"
    elif returncode == 0:
        status = "passed"
    else:
        status = "crashed" if returncode < 0 else "failed"
    return Outcome(status, returncode, stdout, stderr, round(seconds, 4), verdict_text)


def _check_arguments(timeout_s, memory_mb, max_processes, max_file_mb, disk_mb, python) -> None:
    for name, value, least in (("timeout_s", timeout_s, 0.01), ("memory_mb", memory_mb, 32),
                               ("max_processes", max_processes, 1),
                               ("max_file_mb", max_file_mb, 1), ("disk_mb", disk_mb, 1)):
        if not isinstance(value, (int, float)) or not value >= least:
            raise UserError(f"sandbox {name}={value!r}: must be a number >= {least}")
    if not (os.path.isfile(python) and os.access(python, os.X_OK)):
        raise UserError(f"sandbox python={python!r} is not an executable file")


def _claim_id() -> int:
    """A uid/gid no process and no account uses, reserved for this run within this process."""
    with _ids_lock:
        while True:
            candidate = _ID_BASE + secrets.randbelow(_ID_SPAN)
            if candidate in _ids_in_use or _processes_of(candidate):
                continue
            try:
                pwd.getpwuid(candidate)
                continue
            except KeyError:
                _ids_in_use.add(candidate)
                return candidate


def _wait_without_reaping(pid: int, timeout_s: float) -> bool:
    """Whether process `pid` exited within `timeout_s`. It stays a zombie (not reaped), so its
    pid, which is also its group id, cannot be reused before the group is killed."""
    deadline = time.monotonic() + timeout_s
    try:
        handle = os.pidfd_open(pid)
    except (AttributeError, OSError):
        handle = None
    try:
        delay = 0.0005
        while True:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            if handle is not None:
                select.select([handle], [], [], remaining)
            else:
                time.sleep(min(delay, remaining))
                delay = min(2 * delay, 0.02)
    finally:
        if handle is not None:
            os.close(handle)


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()


def _processes_of(uid: int) -> list[int]:
    """Live (not zombie) processes with `uid` as their real, effective, saved or file uid."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status", "rb") as status:
                text = status.read().decode(errors="replace")
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        uids = fields.get("Uid", "").split()
        if str(uid) in uids and not fields.get("State", "").strip().startswith(("Z", "X")):
            found.append(int(name))
    return found


def _count_processes(uid: int) -> int:
    return len(_processes_of(uid))


def _kill_uid(uid: int, gid: int, python: str) -> None:
    """Kills every process of the run's uid; returns when none is left (SandboxError if some
    survive 5 rounds)."""
    for _ in range(5):
        if not _processes_of(uid):
            return
        subprocess.run([python, "-I", "-S", "-c", _KILL_ALL_OF_UID, str(uid), str(gid)],
                       stdin=subprocess.DEVNULL, env=ENV, cwd="/", timeout=30, check=False)
        deadline = time.monotonic() + 2.0
        while _processes_of(uid) and time.monotonic() < deadline:
            time.sleep(0.01)
    survivors = _processes_of(uid)
    if survivors:
        raise SandboxError(f"sandbox uid {uid}: processes {survivors} survived SIGKILL")


def _read(file, limit: int) -> str:
    """The first `limit` bytes of a temporary output file, with a note when there was more."""
    size = os.fstat(file.fileno()).st_size
    file.seek(0)
    text = file.read(limit).decode("utf-8", errors="replace")
    return text + (f"\n[... {size - limit} more bytes]" if size > limit else "")


def _raise_or_warn(report: str) -> None:
    for line in report.splitlines():
        kind, _, message = line.partition(": ")
        if kind == "error":
            raise SandboxError(f"sandbox set-up failed, the program did not run: {message}")
        if kind == "warning":  # the warnings filter shows each message once
            warnings.warn(f"sandbox: {message}", SandboxWarning, stacklevel=3)


def _remove(directory: Path) -> None:
    """rmtree that also removes what a program made unreadable (chmod 000) for its own uid."""
    def retry(function, path, _):
        try:
            os.chmod(os.path.dirname(path), 0o700)
            if os.path.isdir(path) and not os.path.islink(path):
                os.chmod(path, 0o700)
                shutil.rmtree(path, ignore_errors=True)
            else:
                function(path)
        except OSError:
            pass

    shutil.rmtree(directory, onerror=retry)
