"""The trusted harness that judges model-written code: tests and solution in two processes.

This file is the program `tasks.sandbox` runs for a HumanEval or MBPP verdict (standard library
only, `python -I -S`). It has two roles:

* **tests** (the sandbox's program, `python -I -S harness.py INPUT_FD VERDICT_FD`): first makes
  itself non-dumpable (`prctl(PR_SET_DUMPABLE, 0)`: no other process of the sandbox's uid can
  ptrace it, read its memory or open its files through /proc), then reads the run's private
  input from INPUT_FD (a one-time secret and the job: the tests and the names they need) and
  closes it. It starts the solution process, executes the trusted code itself (HumanEval's prompt
  and `check`, MBPP's set-up code and asserts) with the solution's names bound to proxies, and
  writes `passed <secret>` to VERDICT_FD only after every check ran and passed; any failure
  writes `failed <reason>` instead.
* **solution** (`python -I [-S] -c <this file> solution`, started by the tests' process with two
  pipes): executes the completion's code and answers the tests' requests (call this, get that
  attribute, iterate) with *data*.

Values cross as JSON with type tags (`encode` / `decode`): the builtin scalars and containers
(int, float with nan and inf, complex, bool, None, str, bytes, list, tuple, dict, set,
frozenset, range, and collections' Counter, OrderedDict, defaultdict, deque) arrive as
objects of exactly those types, rebuilt by the tests' process; builtin types travel by name;
every other object of the solution stays in its process and reaches the tests as a `Remote`
handle whose attribute reads, attribute writes, calls, iteration and repr are forwarded.
A handle compares by identity and has no arithmetic, so an object that claims to equal
everything (`__eq__` returning True) equals nothing in the tests.

Why no program can be scored as passed without passing: the verdict needs the secret, which
exists only in the tests' process, which never runs the solution's code. So `sys.exit(0)` or
`os._exit(0)`, exit hooks, signal handlers, patched builtins or modules, printing a marker,
reading the program file (it holds no test and no secret), swallowing exceptions or always-equal
objects change nothing in the tests' process; a solution that ends its own process, kills the
tests' process or never answers fails or times out. Other differences from running everything
in one interpreter, by design: arguments reach the solution as copies (a test cannot watch its
argument being mutated; none of HumanEval's or MBPP's does), and a test that passes one of its
own functions to the solution fails with a message (none does).
"""

from __future__ import annotations

import base64
import builtins
import collections
import json
import os
import struct
import sys

MAX_MESSAGE_BYTES = 64 << 20
_HEADER = struct.Struct("!Q")
_PR_SET_DUMPABLE = 4


# ----------------------------------------------------------------------------- values as data


def _builtin_type_name(value) -> str | None:
    name = getattr(value, "__name__", None)
    return name if isinstance(name, str) and getattr(builtins, name, None) is value else None


def encode(value, handle, _depth: int = 0):
    """A JSON-ready form of `value`: builtin data as is or tagged, everything else `handle(v)`.

    `handle(obj) -> JSON-ready` names an object that does not cross (the solution's side keeps
    it and sends {"ref": n}; the tests' side may only pass back handles it received). Instances
    of subclasses of the builtin data types cross as their base type's value.
    """
    if _depth > 400:
        raise RecursionError("value nested more than 400 levels deep")
    kind, deeper = type(value), _depth + 1
    if value is None or kind in (bool, int, float, str):
        return value
    if kind is complex:
        return {"complex": [value.real, value.imag]}
    if kind is bytes:
        return {"bytes": base64.b64encode(value).decode()}
    if kind is bytearray:
        return {"bytearray": base64.b64encode(value).decode()}
    if kind is list:
        return [encode(v, handle, deeper) for v in value]
    if kind is tuple:
        return {"tuple": [encode(v, handle, deeper) for v in value]}
    if kind in (set, frozenset):
        return {kind.__name__: [encode(v, handle, deeper) for v in value]}
    if kind is range:
        return {"range": [value.start, value.stop, value.step]}
    if kind in (dict, collections.OrderedDict, collections.Counter):
        return {kind.__name__: [[encode(k, handle, deeper), encode(v, handle, deeper)]
                                for k, v in value.items()]}
    if kind is collections.defaultdict:
        factory = value.default_factory
        return {"defaultdict": [None if factory is None else encode(factory, handle, deeper),
                                [[encode(k, handle, deeper), encode(v, handle, deeper)]
                                 for k, v in value.items()]]}
    if kind is collections.deque:
        return {"deque": [[encode(v, handle, deeper) for v in value], value.maxlen]}
    if isinstance(value, type) and _builtin_type_name(value):
        return {"type": value.__name__}
    for base in (bool, int, float, str, bytes, complex, tuple, list, frozenset, set, dict):
        if isinstance(value, base):
            return encode(base(value) if base is not str else str.__str__(value), handle, _depth)
    return handle(value)


def decode(data, remote, _depth: int = 0):
    """The value `encode` described, built from builtin types only; {"ref": n} -> remote(n)."""
    if _depth > 400:
        raise ValueError("value nested more than 400 levels deep")
    if data is None or isinstance(data, (bool, int, float, str)):
        return data
    deeper = _depth + 1
    if isinstance(data, list):
        return [decode(v, remote, deeper) for v in data]
    if not isinstance(data, dict) or len(data) != 1:
        raise ValueError(f"not an encoded value: {str(data)[:80]}")
    (tag, body), = data.items()

    def values(rows):
        return [decode(v, remote, deeper) for v in rows]

    def pairs(rows):
        return [(decode(k, remote, deeper), decode(v, remote, deeper)) for k, v in rows]

    if tag == "complex":
        return complex(*body)
    if tag in ("bytes", "bytearray"):
        raw = base64.b64decode(body, validate=True)
        return raw if tag == "bytes" else bytearray(raw)
    if tag == "tuple":
        return tuple(values(body))
    if tag == "set":
        return set(values(body))
    if tag == "frozenset":
        return frozenset(values(body))
    if tag == "range":
        return range(*body)
    if tag == "dict":
        return dict(pairs(body))
    if tag == "OrderedDict":
        return collections.OrderedDict(pairs(body))
    if tag == "Counter":
        return collections.Counter(dict(pairs(body)))
    if tag == "defaultdict":
        factory = None if body[0] is None else decode(body[0], remote, deeper)
        return collections.defaultdict(factory, pairs(body[1]))
    if tag == "deque":
        return collections.deque(values(body[0]), body[1])
    if tag == "type":
        value = getattr(builtins, body, None) if type(body) is str else None
        if not isinstance(value, type):
            raise ValueError(f"{body!r} is not a builtin type")
        return value
    if tag == "ref":
        if type(body) is not int:
            raise ValueError("a ref must be an int")
        return remote(body)
    raise ValueError(f"unknown value tag {tag!r}")


# ----------------------------------------------------------------------------- framing


def send(fd: int, message: dict) -> None:
    payload = json.dumps(message, allow_nan=True).encode()
    data = _HEADER.pack(len(payload)) + payload
    while data:
        data = data[os.write(fd, data):]


def receive(fd: int) -> dict | None:
    """The next message, or None at end of file."""
    header = _read_exactly(fd, _HEADER.size)
    if header is None:
        return None
    (size,) = _HEADER.unpack(header)
    if size > MAX_MESSAGE_BYTES:
        raise ValueError(f"a message of {size} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit")
    payload = _read_exactly(fd, size)
    if payload is None:
        return None
    message = json.loads(payload)
    if not isinstance(message, dict):
        raise ValueError("a message must be a JSON object")
    return message


def _read_exactly(fd: int, size: int) -> bytes | None:
    chunks, left = [], size
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


# ----------------------------------------------------------------------------- solution role


def _exception_reply(error: BaseException, encode_value) -> dict:
    """{"raise": [name, args, text]}: the nearest builtin exception class, args and str()."""
    name = next((c.__name__ for c in type(error).__mro__ if _builtin_type_name(c)), "Exception")
    try:
        args = encode_value(error.args)
    except BaseException:  # noqa: BLE001 - an exception's args are the solution's objects
        args = None
    try:
        text = str(error)
    except BaseException:  # noqa: BLE001 - str() runs the solution's own __str__
        text = "<unprintable>"
    return {"raise": [name, args, text if type(text) is str else "<unprintable>"]}


def serve(requests: int, replies: int) -> None:
    """The solution role: executes `load` code, then answers requests until end of file."""
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    objects: dict[int, object] = {}
    refs: dict[int, int] = {}

    def handle(obj):
        ref = refs.get(id(obj))
        if ref is None:
            ref = refs[id(obj)] = len(objects) + 1
            objects[ref] = obj
        return {"ref": ref}

    def resolve(ref):
        if ref not in objects:
            raise ValueError(f"no object {ref}")
        return objects[ref]

    def value(data):
        return decode(data, resolve)

    def encode_value(v):
        return encode(v, handle)

    operations = {
        "load": lambda m: exec(compile(m["code"], "<solution>", "exec"), namespace),
        "name": lambda m: _lookup(namespace, m["name"]),
        "call": lambda m: value(m["target"])(*value(m["args"]), **dict(value(m["kwargs"]))),
        "getattr": lambda m: getattr(value(m["target"]), m["name"]),
        "setattr": lambda m: setattr(value(m["target"]), m["name"], value(m["value"])),
        "iter": lambda m: iter(value(m["target"])),
        "next": lambda m: next(value(m["target"])),
        "repr": lambda m: repr(value(m["target"])),
        "str": lambda m: str(value(m["target"])),
    }
    while True:
        message = receive(requests)
        if message is None:
            return
        try:
            reply = {"value": encode_value(operations[message["op"]](message))}
        except Exception as error:  # noqa: BLE001 - the solution's errors go to the tests
            reply = _exception_reply(error, encode_value)
        except BaseException as error:  # noqa: BLE001 - SystemExit and the like: the solution ends
            send(replies, {"exit": f"{type(error).__name__}: {error}"})
            os._exit(0)
        send(replies, reply)


def _lookup(namespace: dict, name: str):
    if name not in namespace:
        raise NameError(f"name {name!r} is not defined")
    return namespace[name]


# ----------------------------------------------------------------------------- tests role


class SolutionExit(BaseException):
    """The solution's process exited or broke the protocol; no test may catch this."""


class Solution:
    """The solution process seen from the tests: requests in, decoded values or exceptions out."""

    def __init__(self, flags: list[str], source: str):
        import subprocess

        to_solution_r, self._requests = os.pipe()
        self._replies, from_solution_w = os.pipe()
        self.process = subprocess.Popen(
            [sys.executable, *flags, "-c", source, "solution", str(to_solution_r),
             str(from_solution_w)], pass_fds=(to_solution_r, from_solution_w),
            stdin=subprocess.DEVNULL)
        os.close(to_solution_r)
        os.close(from_solution_w)
        self._remotes: dict[int, Remote] = {}
        self.failure = ""  # set once the process exited or broke the protocol: the run failed

    def remote(self, ref: int) -> Remote:
        if ref not in self._remotes:
            self._remotes[ref] = Remote(self, ref)
        return self._remotes[ref]

    def encode(self, value):
        return encode(value, self._handle)

    def _handle(self, obj):
        if isinstance(obj, Remote) and object.__getattribute__(obj, "_solution") is self:
            return {"ref": object.__getattribute__(obj, "_ref")}
        raise TypeError(f"the tests passed a {type(obj).__name__} to the solution; only data, "
                        "builtin types and the solution's own objects can cross")

    def request(self, op: str, **fields):
        """Sends one request and returns its decoded value, or raises the solution's exception
        (as its nearest builtin class) or SolutionExit."""
        if self.failure:
            raise SolutionExit(self.failure)
        try:
            send(self._requests, {"op": op, **fields})
            reply = receive(self._replies)
        except (OSError, ValueError) as error:
            self._fail(f"the solution's process broke the protocol ({error})")
        if reply is None:
            self._fail(f"the solution's process ended (exit status {self.process.wait()})")
        if "exit" in reply:
            self._fail(f"the solution exited: {str(reply['exit'])[:200]}")
        try:
            if "value" in reply:
                return decode(reply["value"], self.remote)
            name, args, text = reply["raise"]
            cls = getattr(builtins, name, None) if type(name) is str else None
            if not (isinstance(cls, type) and issubclass(cls, Exception)):
                raise ValueError(f"unknown exception class {name!r}")
            arguments = tuple(decode(args, self.remote)) if args is not None else (text,)
        except Exception as error:  # noqa: BLE001 - anything malformed the process sent
            self._fail(f"the solution's process sent a malformed reply ({error})")
        try:
            error = cls(*arguments)
        except Exception:  # noqa: BLE001 - args the builtin class does not accept
            error = cls(str(text)[:1000])
        raise error

    def _fail(self, reason: str):
        """Records why the solution can no longer be trusted to answer, and raises."""
        self.failure = reason
        raise SolutionExit(reason)

    def get(self, name: str):
        return self.request("name", name=name)

    def close(self) -> None:
        for fd in (self._requests, self._replies):
            try:
                os.close(fd)
            except OSError:
                pass
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


class Remote:
    """An object that lives in the solution's process; operations on it are forwarded there."""

    __slots__ = ("_solution", "_ref")

    def __init__(self, solution: Solution, ref: int):
        object.__setattr__(self, "_solution", solution)
        object.__setattr__(self, "_ref", ref)

    def _ask(self, op: str, **fields):
        solution = object.__getattribute__(self, "_solution")
        return solution.request(op, target={"ref": object.__getattribute__(self, "_ref")}, **fields)

    def __getattr__(self, name: str):
        return self._ask("getattr", name=name)

    def __setattr__(self, name: str, value) -> None:
        solution = object.__getattribute__(self, "_solution")
        self._ask("setattr", name=name, value=solution.encode(value))

    def __call__(self, *args, **kwargs):
        solution = object.__getattribute__(self, "_solution")
        return self._ask("call", args=solution.encode(list(args)),
                         kwargs=solution.encode(list(kwargs.items())))

    def __iter__(self):
        return self._ask("iter")

    def __next__(self):
        return self._ask("next")

    def __repr__(self) -> str:
        text = self._ask("repr")
        return text if type(text) is str else "<solution object>"

    def __str__(self) -> str:
        text = self._ask("str")
        return text if type(text) is str else "<solution object>"


def _failure_reason(error: BaseException, sources: dict[str, str]) -> str:
    """`Type: message` and, for an error raised in the tests' own code, the failing line."""
    import traceback

    message = str(error)
    text = f"{type(error).__name__}: {message}"[:300] if message else type(error).__name__
    for frame in reversed(traceback.extract_tb(error.__traceback__)):
        if frame.filename in sources:
            lines = sources[frame.filename].splitlines()
            line = lines[frame.lineno - 1].strip() if 0 < frame.lineno <= len(lines) else ""
            return f"{text} (at {frame.filename} line {frame.lineno}: {line[:200]})"
    return text


def _run_humaneval(job: dict, solution: Solution, sources: dict[str, str]) -> None:
    """The prompt (its imports and helpers), then `check(entry_point)` on the solution's."""
    namespace = {"__name__": "__tests__"}
    exec(compile(job["prompt"], "<prompt>", "exec"), namespace)
    entry_point = job["entry_point"]
    namespace[entry_point] = solution.get(entry_point)
    exec(compile(job["test"], "<test>", "exec"), namespace)
    exec(compile(f"check({entry_point})", "<check>", "exec"), namespace)


def _run_mbpp(job: dict, solution: Solution, sources: dict[str, str]) -> None:
    """The names the tests need (modules imported here, the rest from the solution), the set-up
    code, then every assert in order."""
    import importlib

    namespace = {"__name__": "__tests__"}
    for name, target in job["imports"].items():
        module, _, attribute = target.partition(":")
        try:
            imported = importlib.import_module(module)
            namespace[name] = getattr(imported, attribute) if attribute else imported
        except (ImportError, AttributeError):
            pass  # a test that uses it fails with NameError
    for name in job["solution_names"]:
        try:
            namespace[name] = solution.get(name)
        except NameError:
            pass
    exec(compile(job["setup"], "<setup>", "exec"), namespace)
    for index, test in enumerate(job["tests"]):
        exec(compile(test, f"<test {index + 1}>", "exec"), namespace)


FAMILIES = {"humaneval": _run_humaneval, "mbpp": _run_mbpp}


def _make_undumpable() -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0) failed")


def run_tests(input_fd: int, verdict_fd: int) -> int:
    """The tests role; returns the exit status (0 only with the passed verdict written)."""
    def verdict(text: str) -> None:
        os.write(verdict_fd, (text.replace("\n", " ") + "\n").encode())

    _make_undumpable()
    with os.fdopen(input_fd, "rb") as private:
        run = json.loads(private.read())
    secret, job = run["secret"], run["job"]
    sources = {"<prompt>": job.get("prompt", ""), "<test>": job.get("test", ""),
               "<setup>": job.get("setup", ""),
               "<check>": f"check({job.get('entry_point', '')})"}
    sources.update({f"<test {i + 1}>": test for i, test in enumerate(job.get("tests", []))})
    with open(__file__, encoding="utf-8") as file:
        harness_source = file.read()
    solution = Solution(job["solution_flags"], harness_source)
    try:
        try:
            solution.request("load", code=job["solution"])
        except Exception as error:  # noqa: BLE001 - the solution's own top-level code failed
            raise SolutionExit(f"the solution's code raised {type(error).__name__}: "
                               f"{error}"[:300]) from None
        FAMILIES[job["family"]](job, solution, sources)
        if solution.failure:  # a test caught SolutionExit with a bare except
            raise SolutionExit(solution.failure)
    except SolutionExit as error:
        verdict(f"failed {error}"[:1000])
        return 1
    except BaseException as error:  # noqa: BLE001 - any failure of the tests is a verdict
        verdict(f"failed {_failure_reason(error, sources)}"[:1000])
        return 1
    finally:
        solution.close()
    verdict(f"passed {secret}")
    return 0


def main(argv: list[str]) -> int:
    sys.set_int_max_str_digits(0)
    if len(argv) == 4 and argv[1] == "solution":
        serve(int(argv[2]), int(argv[3]))
        return 0
    if len(argv) == 3:
        return run_tests(int(argv[1]), int(argv[2]))
    print("usage: harness.py INPUT_FD VERDICT_FD  |  harness.py solution REQUESTS REPLIES",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
