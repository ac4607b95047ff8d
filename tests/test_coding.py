"""HumanEval and MBPP: loaders, the programs completions are judged by, and pass@k.

The real benchmark files (../shared/data) check that every reference solution passes in the
sandbox and every empty one fails; those tests skip when the data folder is absent (hostile
programs are in test_code_verdicts.py). Programs run four at a time on what may be two cores, so
they get a generous time limit (MBPP 123 alone takes 3.5 s of CPU).
"""

import gzip
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from dasd_jax.errors import UserError
from dasd_jax.tasks import coding

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
WORKERS = 4
TIMEOUT_S = 30

ADD = {"id": "Toy/0", "entry_point": "add", "canonical_solution": "    return a + b\n",
       "prompt": "import math\n\n\ndef add(a, b):\n    \"\"\"Sum of a and b.\"\"\"\n",
       "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert math.pi > 3\n"}
MBPP_ADD = {"id": "7", "prompt": "Write a function to add two numbers.", "setup": "import math",
            "tests": ["assert add(2, 3) == 5", "assert add(math.floor(1.5), 1) == 2"],
            "reference": "def add(a, b):\n    return a + b\n"}


def data_file(*parts: str) -> Path:
    path = DATA.joinpath(*parts)
    if not path.is_file():
        pytest.skip(f"benchmark data not found at {path}")
    return path


def scores(items, completions, family):
    with ThreadPoolExecutor(WORKERS) as pool:
        results = pool.map(lambda pair: coding.score(*pair, family, timeout_s=TIMEOUT_S),
                           zip(items, completions))
        return {item["id"]: result for item, result in zip(items, results)}


# ----------------------------------------------------------------------------- real data


@pytest.mark.slow
@pytest.mark.subprocess
def test_every_humaneval_canonical_solution_passes():
    items = coding.load_humaneval(data_file("humaneval", "HumanEval.jsonl.gz"))
    assert len(items) == 164
    results = scores(items, [item["canonical_solution"] for item in items], "humaneval")
    assert {i: r["reason"] for i, r in results.items() if not r["passed"]} == {}


@pytest.mark.slow
@pytest.mark.subprocess
def test_every_empty_humaneval_body_fails():
    items = coding.load_humaneval(data_file("humaneval", "HumanEval.jsonl.gz"))
    results = scores(items, ["    pass\n"] * len(items), "humaneval")
    assert [i for i, r in results.items() if r["passed"]] == []
    assert {r["status"] for r in results.values()} == {"failed"}


@pytest.mark.slow
@pytest.mark.subprocess
def test_every_sanitized_mbpp_reference_passes_its_tests():
    items = coding.load_mbpp(data_file("mbpp", "sanitized-mbpp.json"))
    assert len(items) == 427 and all(item["tests"] for item in items)
    results = scores(items, [item["reference"] for item in items], "mbpp")
    assert {i: r["reason"] for i, r in results.items() if not r["passed"]} == {}


@pytest.mark.slow
@pytest.mark.subprocess
def test_the_first_hundred_mbpp_references_pass_their_tests():
    items = coding.load_mbpp(data_file("mbpp", "mbpp.jsonl"))
    assert len(items) == 974 and items[0]["id"] == "1"
    results = scores(items[:100], [item["reference"] for item in items[:100]], "mbpp")
    assert {i: r["reason"] for i, r in results.items() if not r["passed"]} == {}


@pytest.mark.subprocess
def test_mbpp_set_up_code_runs_after_the_solution_it_builds_on():
    items = {item["id"]: item for item in coding.load_mbpp(data_file("mbpp", "mbpp.jsonl"))}
    fixture = items["367"]  # its set-up builds trees of the solution's Node class
    assert "Node(1)" in fixture["setup"]
    assert coding.score(fixture, fixture["reference"], "mbpp")["passed"]


# ----------------------------------------------------------------------------- programs


@pytest.mark.subprocess
def test_a_humaneval_body_continuation_completes_the_prompt():
    source = coding.solution_source(ADD, "    return a + b\n", "humaneval")
    assert source == ADD["prompt"] + "    return a + b\n"
    job = coding.harness_job(ADD, "    return a + b\n", "humaneval")
    assert (job["test"], job["entry_point"]) == (ADD["test"], "add")
    assert coding.score(ADD, "    return a + b\n", "humaneval") == {
        "passed": True, "status": "passed", "reason": ""}


@pytest.mark.subprocess
def test_a_whole_humaneval_solution_in_a_chat_reply_passes():
    reply = ("Here is the function:\n\n```python\ndef add(a, b):\n    return a + b\n\n\n"
             "if __name__ == \"__main__\":\n    print(add(int(input()), 1))\n```\n"
             "It adds the numbers.")
    assert "__main__" not in coding.solution_source(ADD, reply, "humaneval")
    assert coding.score(ADD, reply, "humaneval")["passed"]  # keeps the prompt's `import math`
    wrong = "```python\ndef add(a, b):\n    return a - b\n```"
    assert coding.score(ADD, wrong, "humaneval") == {
        "passed": False, "status": "failed",
        "reason": "AssertionError (at <test> line 2: assert candidate(2, 3) == 5)"}


@pytest.mark.subprocess
def test_a_humaneval_solution_that_loops_forever_times_out():
    looping = "    while True:\n        pass\n"
    result = coding.score(ADD, looping, "humaneval", timeout_s=1)
    assert (result["passed"], result["status"]) == (False, "timeout")
    assert "no verdict within 1 s" in result["reason"]


@pytest.mark.subprocess
def test_an_mbpp_solution_is_the_code_and_the_tests_take_its_names():
    reply = "```python\ndef add(x, y):\n    return x + y\n```"
    assert coding.solution_source(MBPP_ADD, reply, "mbpp") == "def add(x, y):\n    return x + y\n"
    job = coding.harness_job(MBPP_ADD, reply, "mbpp")
    assert job["solution_names"] == ["add"] and job["imports"] == {}  # math: the set-up's
    assert coding.score(MBPP_ADD, reply, "mbpp")["passed"]
    wrong = coding.score(MBPP_ADD, "def add(x, y):\n    return x * y\n", "mbpp")
    assert not wrong["passed"] and "<test 1> line 1: assert add(2, 3) == 5" in wrong["reason"]


@pytest.mark.subprocess
def test_mbpp_tests_import_what_the_reference_imports_and_take_builtin_names_it_defines():
    item = {"id": "126", "prompt": "Sum of common divisors.", "setup": "",
            "tests": ["assert sum(10, 15) == 6", "assert math.isclose(sum(4, 6), 3)"],
            "reference": "import math\ndef sum(a, b):\n    return math.gcd(a, b) + 1\n"}
    job = coding.harness_job(item, item["reference"], "mbpp")
    assert job["imports"] == {"math": "math"} and job["solution_names"] == ["sum"]
    assert coding.score(item, "def sum(a, b):\n    import math\n    return math.gcd(a, b) + 1",
                        "mbpp")["passed"]  # the tests' math is imported by the tests' process


def test_prompts_ask_for_code_and_show_the_task():
    humaneval = coding.prompt_text(ADD, "humaneval")
    assert ADD["prompt"] in humaneval and "```python" in humaneval
    mbpp = coding.prompt_text(MBPP_ADD, "mbpp")
    assert "Write a Python function" in mbpp and MBPP_ADD["prompt"] in mbpp
    assert MBPP_ADD["tests"][0] in mbpp and MBPP_ADD["tests"][1] not in mbpp
    with pytest.raises(UserError, match="family"):
        coding.prompt_text(ADD, "apps")


# ----------------------------------------------------------------------------- loaders


def test_humaneval_loads_from_jsonl_and_gzip_alike(tmp_path):
    row = {"task_id": "Toy/0", "prompt": ADD["prompt"], "canonical_solution": "    return a + b\n",
           "test": ADD["test"], "entry_point": "add"}
    plain, packed = tmp_path / "he.jsonl", tmp_path / "he.jsonl.gz"
    plain.write_text(json.dumps(row) + "\n\n")
    with gzip.open(packed, "wt") as file:
        file.write(json.dumps(row) + "\n")
    assert coding.load_humaneval(plain) == coding.load_humaneval(packed)
    assert coding.load_humaneval(plain)[0]["id"] == "Toy/0"


def test_mbpp_loads_both_formats_into_the_same_fields(tmp_path):
    original = tmp_path / "mbpp.jsonl"
    original.write_text(json.dumps({
        "task_id": 7, "text": "Add.", "code": "def add(a, b): return a + b",
        "test_list": ["assert add(1, 1) == 2"], "test_setup_code": "", "challenge_test_list": []}))
    sanitized = tmp_path / "sanitized.json"
    sanitized.write_text(json.dumps([{
        "task_id": 7, "prompt": "Add.", "code": "def add(a, b): return a + b",
        "test_list": ["assert add(1, 1) == 2"], "test_imports": ["import math"],
        "source_file": "x"}]))
    first, second = coding.load_mbpp(original)[0], coding.load_mbpp(sanitized)[0]
    assert first == {"id": "7", "prompt": "Add.", "tests": ["assert add(1, 1) == 2"],
                     "setup": "", "reference": "def add(a, b): return a + b"}
    assert second == {**first, "setup": "import math"}


def test_missing_files_and_bad_lines_are_user_errors_naming_file_and_line(tmp_path):
    with pytest.raises(UserError, match="no data file"):
        coding.load_humaneval(tmp_path / "absent.jsonl")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"task_id": "a"}\n{not json\n')
    with pytest.raises(UserError, match=r"broken.jsonl, line 1: .*'prompt'"):
        coding.load_humaneval(broken)
    broken.write_text(json.dumps({"task_id": 1, "text": "t", "code": "c", "test_list": []})
                      + "\n{not json\n")
    with pytest.raises(UserError, match=r"broken.jsonl, line 2: not valid JSON"):
        coding.load_mbpp(broken)
    with pytest.raises(UserError, match="test_list"):
        broken.write_text(json.dumps({"task_id": 1, "text": "t", "code": "c", "test_list": "x"}))
        coding.load_mbpp(broken)


# ----------------------------------------------------------------------------- pass@k
