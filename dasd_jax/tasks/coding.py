"""HumanEval and MBPP: loading, the chat prompt, the program a completion is judged by, pass@k.

    items = coding.load_humaneval("HumanEval.jsonl.gz")
    # {"id": "HumanEval/0", "prompt", "test", "entry_point", "canonical_solution"}
    items = coding.load_mbpp("sanitized-mbpp.json")     # or mbpp.jsonl
    # {"id": "2", "prompt": "Write a function to ...", "tests": ["assert ..."], "setup",
    #  "reference"}
    coding.prompt_text(item, "humaneval")                # the instruction given to a chat model
    coding.score(item, completion, "humaneval")          # {"passed": True, "status": "passed",
                                                         #  "reason": ""}

A completion's code is its ```python blocks (else its whole text), as `answers.program` reads
it. For HumanEval that code is either the rest of the prompt's function (a body continuation)
or a whole solution defining `entry_point`; the solution process runs the prompt followed by
the code (a whole solution redefines the prompt's docstring-only function and keeps the prompt's
imports and helpers). For MBPP it runs the code alone. The tests (HumanEval's prompt helpers and
`check`, MBPP's set-up code and asserts) run in another process that holds the verdict
(`tasks.harness`), inside `tasks.sandbox`: passed = that process's verdict, carrying a secret of
this run, that every check ran and passed.
"""

from __future__ import annotations

import ast
import builtins
import gzip
import json
import re
import secrets
from pathlib import Path
from typing import Iterator

from dasd_jax.errors import UserError
from dasd_jax.tasks import answers, harness, registry, sandbox

HARNESS_SOURCE = Path(harness.__file__).read_text(encoding="utf-8")

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


def solution_source(item: dict, completion: str, family: str) -> str:
    """The code the solution process runs: for HumanEval the prompt followed by the completion's
    code (a body continuation, or a whole solution that redefines the prompt's function and
    keeps its imports and helpers); for MBPP the completion's code alone."""
    if family == "humaneval":
        code = answers.program(completion)
        whole = re.search(rf"^(?:async\s+)?def\s+{re.escape(item['entry_point'])}\s*\(", code,
                          flags=re.MULTILINE)
        return f"{item['prompt']}{chr(10) if whole else ''}{_code(completion)}"
    if family == "mbpp":
        return _code(completion)
    raise UserError(f"unknown code task family {family!r}; choose from {', '.join(FAMILIES)}")


def _top_level_bindings(source: str) -> dict[str, str | None]:
    """Names a module binds at its top level: {name: "module" or "module:attribute" for imports,
    None for defs, classes and assignments}."""
    tree = answers.parse_python(source)
    if tree is None:
        return {}
    bound: dict[str, str | None] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound[node.name] = None
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                bound.update({n.id: None for n in ast.walk(target) if isinstance(n, ast.Name)})
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    bound[alias.asname] = alias.name
                else:
                    top = alias.name.split(".")[0]
                    bound[top] = top
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                if alias.name != "*":
                    bound[alias.asname or alias.name] = f"{node.module}:{alias.name}"
    return bound


def _names_used(sources) -> set[str]:
    used = set()
    # a test with a syntax error is skipped here: the harness reports it
    for tree in filter(None, map(answers.parse_python, sources)):
        used |= {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    return used


def harness_job(item: dict, completion: str, family: str, *,
                solution_site_packages: bool = True) -> dict:
    """What tasks.harness needs to judge `completion`: the solution's code, the trusted test
    code, and for MBPP the names the tests take from the solution (those the reference solution
    defines or a non-builtin name the tests use) or import themselves (the reference's imports).
    """
    job = {"family": family, "solution": solution_source(item, completion, family),
           "solution_flags": ["-I"] if solution_site_packages else ["-I", "-S"]}
    if family == "humaneval":
        job.update(prompt=item["prompt"], test=item["test"], entry_point=item["entry_point"])
        return job
    setup_bound = _top_level_bindings(item["setup"])
    reference = _top_level_bindings(item.get("reference", ""))
    used = _names_used([*item["tests"], item["setup"]]) - set(setup_bound)
    imports = {name: reference[name] for name in used if reference.get(name)}
    from_solution = sorted(name for name in used - set(imports)
                           if name in reference or not hasattr(builtins, name))
    job.update(setup=item["setup"], tests=list(item["tests"]), imports=imports,
               solution_names=from_solution)
    return job


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


def score(item: dict, completion: str, family: str, *, solution_site_packages: bool = True,
          **sandbox_kwargs) -> dict:
    """{"passed": bool, "status": "passed" | "failed" | "timeout" | "crashed", "reason": str}
    of judging the completion with tasks.harness in the sandbox (`sandbox.run_python`
    keywords). passed needs the harness's verdict with this run's secret; reason says why a
    run failed (the failing check, the solution's exception, its exit, the time limit)."""
    secret = secrets.token_hex(16)
    private = json.dumps({"secret": secret, "job": harness_job(
        item, completion, family, solution_site_packages=solution_site_packages)})
    sandbox_kwargs.setdefault("site_packages", False)
    outcome = sandbox.run_python(HARNESS_SOURCE, private_input=private.encode(), **sandbox_kwargs)
    lines = outcome.verdict.splitlines()
    if outcome.status != "timeout" and lines == [f"passed {secret}"]:
        return {"passed": True, "status": "passed", "reason": ""}
    if outcome.status in ("timeout", "crashed"):
        reason = (f"no verdict within {sandbox_kwargs.get('timeout_s', 10.0)} s"
                  if outcome.status == "timeout" else
                  f"the harness was killed by signal {-(outcome.returncode or 0)}")
        return {"passed": False, "status": outcome.status, "reason": reason}
    failed = [line[len("failed "):] for line in lines if line.startswith("failed ")]
    reason = failed[0] if failed else (f"no verdict (exit status {outcome.returncode}): "
                                       f"{outcome.stderr.strip()[-300:]}")
    return {"passed": False, "status": "failed", "reason": reason}


def _task(family: str, loader) -> registry.EvalTask:
    def grade(item: dict, completion: str) -> dict:
        result = score(item, completion, family)
        return {"correct": bool(result["passed"]), "status": result["status"],
                "reason": result["reason"]}

    return registry.EvalTask(
        family, load=lambda path, split, limit, seed: loader(path)[:limit or None],
        prompt=lambda item: prompt_text(item, family), grade=grade)


EVAL_TASKS = [_task("humaneval", load_humaneval), _task("mbpp", load_mbpp)]
