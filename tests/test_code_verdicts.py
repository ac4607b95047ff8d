"""A code verdict needs positive evidence: tricks that end, fake or subvert a run never pass.

Each wrong solution below also tries one way to look like a pass (exit early with status 0,
exit hooks, signal handlers, patched builtins and modules, always-equal objects, printing or
writing a fake marker, reading the program file or the tests' process, killing it, breaking the
protocol). Under the old verdict (the whole program in one interpreter, passed = exit status 0)
8 of these 21 passed: the four early exits, the exit hook, the excepthook, the signal handler
and the always-equal result. Every run is bounded by the sandbox: 5 s, 256 MiB per process,
8 processes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from dasd_jax.tasks import coding, harness

pytestmark = pytest.mark.subprocess

ROOT = Path(__file__).resolve().parents[1]
LIMITS = {"timeout_s": 5, "memory_mb": 256, "max_processes": 8}

ADD = {"id": "Toy/0", "entry_point": "add", "canonical_solution": "    return a + b\n",
       "prompt": "import math\n\n\ndef add(a, b):\n    \"\"\"Sum of a and b.\"\"\"\n",
       "test": ("def check(candidate):\n    assert candidate(2, 3) == 5\n"
                "    assert math.isclose(candidate(0.5, 0.25), 0.75)\n"
                "    assert abs(candidate(-1, 1)) < 1e-9\n")}
MBPP_ADD = {"id": "7", "prompt": "Write a function to add two numbers.", "setup": "import math",
            "tests": ["assert add(2, 3) == 5", "assert math.isclose(add(0.5, 0.25), 0.75)"],
            "reference": "def add(a, b):\n    return a + b\n"}

WRONG = "def add(a, b):\n    return a - b\n"
# Each trick is a whole module around (or instead of) the wrong `add`.
TRICKS = {
    "plain wrong": WRONG,
    "sys.exit(0) before the function": "import sys\nsys.exit(0)\n" + WRONG,
    "os._exit(0) before the function": "import os\nos._exit(0)\n" + WRONG,
    "sys.exit(0) inside the function": "def add(a, b):\n    import sys\n    sys.exit(0)\n",
    "os._exit(0) inside the function": "def add(a, b):\n    import os\n    os._exit(0)\n",
    "KeyboardInterrupt inside the function": "def add(a, b):\n    raise KeyboardInterrupt\n",
    "an exit hook that exits 0": ("import atexit, os\natexit.register(lambda: os._exit(0))\n"
                                  + WRONG),
    "an excepthook that hides the failure": (
        "import sys, os\nsys.excepthook = lambda *a: os._exit(0)\n" + WRONG),
    "a signal handler that exits 0": (
        "import os, signal\nsignal.signal(signal.SIGALRM, lambda *a: os._exit(0))\n"
        "signal.setitimer(signal.ITIMER_REAL, 0.05)\n"
        "def add(a, b):\n    import time\n    time.sleep(1)\n    return a - b\n"),
    "patched builtins and modules": (
        "import builtins, math\nbuiltins.abs = lambda x: 0\nmath.isclose = lambda *a, **k: True\n"
        "builtins.AssertionError = type('Ignored', (Exception,), {})\n" + WRONG),
    "an always-equal result": (
        "class Anything:\n    def __eq__(self, other):\n        return True\n"
        "    def __sub__(self, other):\n        return 0\n    __rsub__ = __sub__\n"
        "    def __abs__(self):\n        return 0\n    def __float__(self):\n        return 0.75\n"
        "def add(a, b):\n    return Anything()\n"),
    "an always-equal int subclass": (
        "class Int(int):\n    def __eq__(self, other):\n        return True\n"
        "def add(a, b):\n    return Int(0)\n"),
    "printing a marker": "print('passed ' + '0' * 32)\nprint('PASSED')\n" + WRONG,
    "writing a marker to every descriptor": (
        "import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b'passed x\\n')\n"
        "    except OSError:\n        pass\n" + WRONG),
    "reading the program file for the tests and a secret": (
        "text = open('program.py').read()\n"
        "assert 'assert' not in text.split('def check')[0] or True\n"
        "import re\nSECRET = re.findall(r'[0-9a-f]{32}', text)\n"
        "import os\nfor fd in range(3, 64):\n    for s in SECRET:\n        try:\n"
        "            os.write(fd, ('passed ' + s + '\\n').encode())\n        except OSError:\n"
        "            pass\n" + WRONG),
    "reading the tests' process memory and descriptors": (
        "import os\nppid = os.getppid()\nstolen = []\n"
        "for path in (f'/proc/{ppid}/mem', f'/proc/{ppid}/environ', f'/proc/{ppid}/fd/4'):\n"
        "    try:\n        with open(path, 'rb') as f:\n            stolen.append(f.read(64))\n"
        "    except OSError:\n        pass\n"
        "assert not stolen, stolen\n" + WRONG),
    "killing the tests' process": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n"
                                  + WRONG,
    "stopping the tests' process": "import os, signal\nos.kill(os.getppid(), signal.SIGSTOP)\n"
                                   + WRONG,
    "a forged reply on the protocol pipe": (
        "import os, sys, struct, json\nreply = json.dumps({'value': True}).encode()\n"
        "os.write(int(sys.argv[3]), struct.pack('!Q', len(reply)) + reply + b'junk')\n" + WRONG),
    "an unterminated string that would swallow the tests": WRONG + "\nx = '''\n",
    "redefining the tests' check": (
        WRONG + "def check(candidate):\n    pass\nAssertionError = None\n"),
}


def scores(item, family, programs):
    with ThreadPoolExecutor(4) as pool:
        return dict(zip(programs, pool.map(
            lambda source: coding.score(item, source, family, **LIMITS), programs.values())))


@pytest.mark.slow
@pytest.mark.parametrize("family, item", [("humaneval", ADD), ("mbpp", MBPP_ADD)])
def test_a_correct_solution_passes_and_no_wrong_one_passes_with_any_trick(family, item):
    completions = {name: "```python\n" + source + "```" for name, source in TRICKS.items()}
    completions["correct"] = "```python\ndef add(a, b):\n    return a + b\n```"
    results = scores(item, family, completions)
    assert results.pop("correct") == {"passed": True, "status": "passed", "reason": ""}
    assert {name for name, result in results.items() if result["passed"]} == set()
    assert all(result["reason"] for result in results.values())


def test_the_reasons_say_what_happened():
    results = scores(ADD, "humaneval", {name: TRICKS[name] for name in (
        "sys.exit(0) before the function", "os._exit(0) inside the function",
        "killing the tests' process", "stopping the tests' process", "plain wrong",
        "an always-equal result", "a forged reply on the protocol pipe")})
    assert results["sys.exit(0) before the function"]["reason"] == (
        "the solution exited: SystemExit: 0")
    assert results["os._exit(0) inside the function"]["reason"] == (
        "the solution's process ended (exit status 0)")
    assert results["killing the tests' process"]["status"] == "crashed"
    assert results["stopping the tests' process"]["status"] == "timeout"
    assert "assert candidate(2, 3) == 5" in results["plain wrong"]["reason"]
    assert "assert candidate(2, 3) == 5" in results["an always-equal result"]["reason"]
    assert "protocol" in results["a forged reply on the protocol pipe"]["reason"]


def test_results_cross_as_exact_builtin_values_and_other_objects_as_handles():
    item = {"id": "Toy/1", "entry_point": "make", "prompt": "def make(kind):\n    \"\"\"x\"\"\"\n",
            "test": (
                "import collections, math\n"
                "def check(candidate):\n"
                "    assert type(candidate('bool')) is bool and candidate('bool') is True\n"
                "    assert candidate('nan') != candidate('nan') and math.isnan(candidate('nan'))\n"
                "    assert str(candidate('zero')) == '-0.0' and candidate('big') == 10 ** 5000\n"
                "    assert candidate('tuple') == (1, [2, {3: (4,)}], frozenset({5}), b'6', 7j)\n"
                "    counter = candidate('counter')\n"
                "    assert type(counter) is collections.Counter and counter['a'] == 2\n"
                "    groups = candidate('groups')\n"
                "    assert groups['missing'] == [] and groups['x'] == [1]\n"
                "    assert candidate('deque').maxlen == 2 and list(candidate('deque')) == [2, 3]\n"
                "    assert candidate('type') is int and candidate('range') == range(1, 9, 2)\n"
                "    assert type(candidate('named')) is tuple and candidate('named') == (1, 2)\n"
                "    node = candidate('node')\n"
                "    assert node.value == 4 and node.double() == 8 and repr(node) == 'Node(4)'\n"
                "    node.value = 5\n"
                "    assert node.double() == 10 and node != candidate('node')\n"
                "    assert list(candidate('squares')) == [0, 1, 4]\n"
                "    try:\n        candidate('fail')\n        assert False\n"
                "    except KeyError as error:\n        assert error.args == ('missing',)\n")}
    solution = (
        "import collections\n"
        "class Node:\n    def __init__(self, value):\n        self.value = value\n"
        "    def double(self):\n        return 2 * self.value\n"
        "    def __repr__(self):\n        return f'Node({self.value})'\n"
        "Pair = collections.namedtuple('Pair', 'a b')\n"
        "class Missing(KeyError):\n    pass\n"
        "def make(kind):\n"
        "    groups = collections.defaultdict(list)\n    groups['x'].append(1)\n"
        "    return {'bool': True, 'nan': float('nan'), 'zero': -0.0, 'big': 10 ** 5000,\n"
        "            'tuple': (1, [2, {3: (4,)}], frozenset({5}), b'6', 7j),\n"
        "            'counter': collections.Counter('aab'), 'groups': groups,\n"
        "            'deque': collections.deque([1, 2, 3], maxlen=2), 'type': int,\n"
        "            'range': range(1, 9, 2), 'named': Pair(1, 2), 'node': Node(4),\n"
        "            'squares': (i * i for i in range(3))}.get(kind) if kind != 'fail' \\\n"
        "        else (_ for _ in ()).throw(Missing('missing'))\n")
    assert coding.score(item, solution, "humaneval", **LIMITS) == {
        "passed": True, "status": "passed", "reason": ""}


@pytest.mark.parametrize("value", [
    None, True, 0, -7, 10 ** 400, 1.5, float("inf"), -0.0, 2 - 3j, "ü\ud800", b"\x00\xff",
    bytearray(b"ab"), [1, [2]], (1, (2,)), {1, 2}, frozenset({3}), {(1, 2): {"a": None}},
    range(0, 10, 3)])
def test_encode_then_decode_gives_back_an_equal_value_of_the_same_type(value):
    data = json.loads(json.dumps(harness.encode(value, handle=None), allow_nan=True))
    decoded = harness.decode(data, remote=None)
    assert type(decoded) is type(value) and repr(decoded) == repr(value)


def test_the_decoder_refuses_what_is_not_an_encoded_value():
    for data in ({"exec": "print(1)"}, {"type": "print"}, {"ref": "1"}, {"a": 1, "b": 2},
                 {"tuple": None}):
        with pytest.raises((ValueError, TypeError)):
            harness.decode(data, remote=lambda ref: ref)


@pytest.mark.slow
def test_wrong_but_tricky_programs_score_pass_at_1_of_zero_through_the_cli(tmp_path):
    problems = tmp_path / "toy-humaneval.jsonl"
    rows = [{"task_id": f"Toy/{i}", "prompt": ADD["prompt"], "canonical_solution": "",
             "test": ADD["test"], "entry_point": "add"} for i in range(len(TRICKS))]
    problems.write_text("".join(json.dumps(row) + "\n" for row in rows))
    predictions = tmp_path / "predictions.jsonl"
    predictions.write_text("".join(
        json.dumps({"task": "humaneval", "id": f"Toy/{i}", "completion": source}) + "\n"
        for i, source in enumerate(TRICKS.values())))
    run = subprocess.run(
        [sys.executable, "-m", "dasd_jax.evaluate", "--config=configs/code.py",
         f"--config.workdir={tmp_path}", "--config.eval.tasks=humaneval",
         f"--config.eval.paths.humaneval={problems}", f"--config.eval.predictions={predictions}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["tasks"]["humaneval"]["examples"] == len(TRICKS)
    assert summary["tasks"]["humaneval"]["accuracy"] == 0.0
