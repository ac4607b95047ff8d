"""HumanEval and MBPP: loading, the chat prompt, the program a completion is judged by, pass@k.

    items = coding.load_humaneval("HumanEval.jsonl.gz")
    # {"id": "HumanEval/0", "prompt", "test", "entry_point", "canonical_solution"}
    items = coding.load_mbpp("sanitized-mbpp.json")     # or mbpp.jsonl
    # {"id": "2", "prompt": "Write a function to ...", "tests": ["assert ..."], "setup",
    #  "reference"}
    coding.prompt_text(item, "humaneval")                # the instruction given to a chat model
    coding.score(item, completion, "humaneval")          # {"passed": True, "status": "passed"}
    coding.pass_at_k(n=10, c=3, k=1)                     # unbiased estimator (Codex paper)

A completion's code is its ```python blocks (else its whole text), as `answers.program` reads
it. For HumanEval that code is either the rest of the prompt's function (a body continuation)
or a whole solution defining `entry_point`; either way the program is the prompt followed by the
code (a whole solution redefines the prompt's docstring-only function and keeps the prompt's
imports and helpers), then the item's `check` and `check(entry_point)`. For MBPP the program is
the code, the set-up code (imports, fixtures) and the asserts. Programs run in
`tasks.sandbox`; passed = exit status 0 within the time limit.
"""

from __future__ import annotations

import gzip
import json
import math
import re
from pathlib import Path
from typing import Iterator

from dasd_jax.errors import UserError
from dasd_jax.tasks import answers, sandbox

FAMILIES = ("humaneval", "mbpp")
HUMANEVAL_FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
_MAIN_GUARD = re.compile(r"^if\s+__name__\s*==.*", flags=re.MULTILINE | re.DOTALL)


def _records(path) -> Iterator[tuple[str, dict]]:
    """(location, record) of a .jsonl / .jsonl.gz file (one object a line) or a .json list."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"no data file at {file}: pass the path of a .jsonl, .jsonl.gz or .json "
                        "file")
    opener = gzip.open if file.suffix == ".gz" else open
    try:
        with opener(file, "rt", encoding="utf-8") as text:
            if file.suffix == ".json":
                try:
                    rows = json.load(text)
                except json.JSONDecodeError as error:
                    raise UserError(f"{file}: not valid JSON ({error.msg}, line {error.lineno}, "
                                    f"column {error.colno})") from None
                if not isinstance(rows, list):
                    raise UserError(f"{file}: expected a JSON list of records, found a "
                                    f"{type(rows).__name__}")
                numbered = ((f"{file}, record {i}", row) for i, row in enumerate(rows, start=1))
            else:
                numbered = _jsonl(file, text)
            for where, row in numbered:
                if not isinstance(row, dict):
                    raise UserError(f"{where}: expected a JSON object, found a "
                                    f"{type(row).__name__}")
                yield where, row
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError) as error:
        raise UserError(f"{file} is not UTF-8 JSON text{' (gzip)' if opener is gzip.open else ''}: "
                        f"{error}") from None


def _jsonl(file: Path, text) -> Iterator[tuple[str, object]]:
    for number, line in enumerate(text, start=1):
        if not line.strip():
            continue
        try:
            yield f"{file}, line {number}", json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{file}, line {number}: not valid JSON ({error.msg}, column "
                            f"{error.colno}); each line must hold one JSON object") from None


def _field(where: str, row: dict, name: str, kind: type, family: str):
    value = row.get(name)
    if not isinstance(value, kind) or (kind is list and not all(isinstance(v, str) for v in value)):
        found = "no field" if name not in row else f"a {type(value).__name__} in field"
        wanted = "a list of strings" if kind is list else f"a {kind.__name__}"
        raise UserError(f"{where}: {family} records need {wanted} in {name!r}; this one has "
                        f"{found} {name!r} (its fields: {', '.join(map(str, row)) or 'none'})")
    return value


def load_humaneval(path) -> list[dict]:
    """HumanEval problems from HumanEval.jsonl(.gz), in file order."""
    items = []
    for where, row in _records(path):
        fields = {name: _field(where, row, name, str, "HumanEval") for name in HUMANEVAL_FIELDS}
        items.append({"id": fields["task_id"], "prompt": fields["prompt"], "test": fields["test"],
                      "entry_point": fields["entry_point"],
                      "canonical_solution": fields["canonical_solution"]})
    if not items:
        raise UserError(f"{path} holds no HumanEval records")
    return items


def load_mbpp(path) -> list[dict]:
    """MBPP problems from mbpp.jsonl (task text in "text") or sanitized-mbpp.json ("prompt")."""
    items = []
    for where, row in _records(path):
        text_field = "text" if "text" in row else "prompt"
        setup = [*_field(where, row, "test_imports", list, "MBPP")] if "test_imports" in row else []
        if row.get("test_setup_code"):
            setup.append(_field(where, row, "test_setup_code", str, "MBPP"))
        task_id = row.get("task_id")
        if not isinstance(task_id, (int, str)):
            raise UserError(f"{where}: MBPP records need a task_id (a number); this one has "
                            f"{task_id!r}")
        items.append({"id": str(task_id), "prompt": _field(where, row, text_field, str, "MBPP"),
                      "tests": _field(where, row, "test_list", list, "MBPP"),
                      "setup": "\n".join(setup),
                      "reference": _field(where, row, "code", str, "MBPP")})
    if not items:
        raise UserError(f"{path} holds no MBPP records")
    return items


def _code(completion: str) -> str:
    """The completion's code, without an `if __name__ == ...:` block (it may wait on input())."""
    return _MAIN_GUARD.sub("", answers.program(completion)).rstrip() + "\n"


def humaneval_program(item: dict, completion: str) -> str:
    """The prompt, the completion's code (a body continuation or a whole solution), the tests."""
    code = answers.program(completion)
    whole = re.search(rf"^(?:async\s+)?def\s+{re.escape(item['entry_point'])}\s*\(", code,
                      flags=re.MULTILINE)
    solution = ("\n" if whole else "") + _code(completion)
    return (f"{item['prompt']}{solution}\n\n{item['test']}\n\n"
            f"check({item['entry_point']})\n")


def mbpp_program(item: dict, completion: str) -> str:
    """The completion's code, then the item's set-up code, then its asserts."""
    return f"{_code(completion)}\n\n{item['setup']}\n\n" + "\n".join(item["tests"]) + "\n"


def program_text(item: dict, completion: str, family: str) -> str:
    if family == "humaneval":
        return humaneval_program(item, completion)
    if family == "mbpp":
        return mbpp_program(item, completion)
    raise UserError(f"unknown code task family {family!r}; choose from {', '.join(FAMILIES)}")


def prompt_text(item: dict, family: str) -> str:
    """The instruction given to a chat model for `item`."""
    if family == "humaneval":
        return ("Complete the following Python function. Reply with the whole function, "
                "including its imports, in a ```python code block.\n\n"
                f"```python\n{item['prompt']}```")
    if family == "mbpp":
        example = item["tests"][0] if item["tests"] else ""
        return (f"Write a Python function for this task: {item['prompt'].strip()}\n"
                f"Your code should pass this test:\n\n{example}\n\n"
                "Reply with the code in a ```python code block.")
    raise UserError(f"unknown code task family {family!r}; choose from {', '.join(FAMILIES)}")


def score(item: dict, completion: str, family: str, **sandbox_kwargs) -> dict:
    """{"passed": bool, "status": "passed" | "failed" | "timeout" | "crashed"} of running the
    completion's program (`program_text`) in the sandbox (`sandbox.run_python` keywords)."""
    outcome = sandbox.run_python(program_text(item, completion, family), **sandbox_kwargs)
    return {"passed": outcome.passed, "status": outcome.status}


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimate from n samples of which c passed: 1 - C(n-c, k) / C(n, k),
    computed as 1 - prod_{i=n-c+1}^{n} (1 - k / i) (Chen et al. 2021), stable for large n."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise UserError(f"pass@k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k} "
                        "(draw at least k samples per problem)")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))
