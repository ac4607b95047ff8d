"""MATH and MATH-500: competition problems whose solutions box the final answer.

    items = math500.load("/path/to/math500/test.jsonl")      # or "hf:HuggingFaceH4/MATH-500"
    item = items[0]   # {"id": "0", "problem", "solution", "answer", "subject", "level": 2}
    prompt = math500.prompt_text(item)          # problem + "... within \\boxed{}."
    math500.is_correct(completion, item)        # math-verify equivalence with item["answer"]
    math500.difficulty(item), math500.subject(item)            # "level=2", "Precalculus"

Grading uses the `math_verify` library (no LaTeX normalizer of our own): the gold is
`parse("\\boxed{answer}")`; the prediction is the completion's last `\\boxed{...}` (or
`\\fbox{...}`) parsed the same way, or, with no box, math-verify's own extraction from the whole
completion. `verify` decides equivalence (numbers, fractions, sets, intervals, matrices, ...).
Records without an `answer` field (the full MATH dataset) take it from the solution's last box.

Timeouts: math-verify interrupts slow parsing and comparison (sympy can hang on odd inputs)
with `signal.alarm`, which only the main thread may set; with a timeout it raises ValueError in
any other thread. `is_correct` therefore passes `TIMEOUT_SECONDS` in the main thread and None
(no timeout; math-verify logs a warning once) in worker threads. Grading is safe in threads, but
there a pathological input can run long (`\\boxed{10^{10^{10}}}` against 1 ran over a minute
in a thread; 5 s in the main thread): to bound untrusted completions, grade in worker
processes, whose main threads get the alarm. In the main thread the alarm replaces any SIGALRM
handler of the caller for the duration of the call. Errors and timeouts grade as incorrect.
"""

from __future__ import annotations

import re
import threading

from math_verify import parse, verify
from math_verify.errors import TimeoutException

from dasd_jax.errors import UserError
from dasd_jax.tasks import registry
from dasd_jax.tasks.gsm8k import required_fields, rows

FIELDS = ("problem", "solution")
TIMEOUT_SECONDS = 5  # per parse and per comparison; whole seconds (signal.alarm)
PROMPT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")


def load(path: str, split: str = "test", limit: int = 0) -> list[dict]:
    """MATH items from `path` (a JSONL file, a directory holding `{split}.jsonl`, a save_to_disk
    directory or hf:NAME[:CONFIG]), in file order; `limit` > 0 keeps the first ones. The subject
    is read from `subject` (MATH-500) or `type` (MATH); a level "Level 3" becomes the int 3."""
    items = []
    for index, (where, row) in enumerate(rows(path, split, limit)):
        required_fields(where, row, FIELDS, "MATH")
        answer = row.get("answer")
        if answer is None:
            answer = last_boxed(row["solution"])
        if not isinstance(answer, str) or not answer.strip():
            raise UserError(f"{where}: the record has no answer field and its solution has no "
                            "\\boxed{...} answer; MATH records need one of the two")
        items.append({"id": str(index), "problem": row["problem"], "solution": row["solution"],
                      "answer": answer, "subject": str(row.get("subject", row.get("type", ""))),
                      "level": _level(row.get("level", ""))})
    if not items:
        raise UserError(f"{path} (split {split!r}) holds no MATH records")
    return items


def _level(value) -> int | str:
    """3, "3" and "Level 3" -> 3; anything else (e.g. "Level ?") as text."""
    found = re.fullmatch(r"\s*(?:level\s*)?(\d+)\s*", str(value), flags=re.IGNORECASE)
    return int(found.group(1)) if found else str(value)


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` or `\\fbox{...}` in `text`, braces balanced
    (escaped `\\{`, `\\}` are content); None if there is none or it never closes."""
    starts = [match.end() for match in _BOX.finditer(text)]
    if not starts:
        return None
    depth, position = 1, starts[-1]
    while position < len(text):
        char = text[position]
        if char == "\\":
            position += 2
            continue
        depth += {"{": 1, "}": -1}.get(char, 0)
        if depth == 0:
            return text[starts[-1]:position]
        position += 1
    return None


def _timeout() -> int | None:
    """TIMEOUT_SECONDS in the main thread; None where math-verify's signal.alarm cannot run."""
    return TIMEOUT_SECONDS if threading.current_thread() is threading.main_thread() else None


def is_correct(completion: str, item: dict) -> bool:
    """Whether the completion's final answer is equivalent to item["answer"] (see the module
    docstring); parse errors, comparison errors and timeouts count as incorrect."""
    timeout = _timeout()
    boxed = last_boxed(completion)
    try:
        gold = parse(f"\\boxed{{{item['answer']}}}", parsing_timeout=timeout)
        predicted = parse(completion if boxed is None else f"\\boxed{{{boxed}}}",
                          parsing_timeout=timeout)
        return bool(gold and predicted) and bool(verify(gold, predicted,
                                                        timeout_seconds=timeout))
    except (Exception, TimeoutException):  # noqa: BLE001 - math-verify failing = not verified
        return False


def prompt_text(item: dict) -> str:
    return f"{item['problem']}\n\n{PROMPT_INSTRUCTION}"


def difficulty(item: dict) -> str:
    return f"level={item['level']}"


def subject(item: dict) -> str:
    return item["subject"]


def _grade(item: dict, completion: str) -> dict:
    return {"correct": is_correct(completion, item), "prediction": last_boxed(completion)}


EVAL_TASKS = [registry.EvalTask(
    "math500", load=lambda path, split, limit, seed: load(path, split, limit), prompt=prompt_text,
    grade=_grade, difficulty=difficulty)]
