"""GSM8K: grade-school word problems with worked solutions that end in "#### N".

    items = gsm8k.load("/path/to/gsm8k/test.jsonl")     # or "hf:openai/gsm8k:main"
    item = items[0]     # {"id": "0", "question", "answer", "gold": 18.0, "steps": 4}
    prompt = gsm8k.prompt_text(item)                     # question + "... The answer is N."
    gsm8k.is_correct(completion, item)                   # final number == gold
    gsm8k.difficulty(item)                               # "steps=4" ("steps>=8" for 8 and more)

`answer` is the full reference solution; `gold` is its "#### N" as a float (commas, "$" removed);
`steps` counts the solution's non-empty lines before "####", GSM8K's measure of difficulty. A
completion's answer is the number after its last "The answer is" (else after "####", else its
last number), as `answers.final_number` reads it for the rewrite acceptance check.
"""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path
from typing import Iterator

from dasd_jax import data
from dasd_jax.errors import UserError
from dasd_jax.tasks import answers, registry

FIELDS = ("question", "answer")
MAX_STEPS_GROUP = 8  # difficulty groups: steps=1, steps=2, ..., steps>=8
PROMPT_INSTRUCTION = ("Please reason step by step, and end your response with "
                      "\"The answer is N.\", where N is the final number.")
_GOLD_NUMBER = re.compile(r"-?\d+(?:\.\d+)?|-?\.\d+")


def rows(path: str, split: str, limit: int = 0) -> Iterator[tuple[str, dict]]:
    """(location, row) of a task's records from a JSONL file, a directory holding `{split}.jsonl`,
    a save_to_disk dataset directory or hf:NAME[:CONFIG] (`split` picks the split of the last
    three). `limit` > 0 stops after that many rows. Shared by the task modules."""
    if int(limit) < 0:
        raise UserError(f"limit={limit}: must be 0 (all records) or a positive count")
    path = str(path)
    if not path:
        raise UserError(f"no data path: pass {data.PATH_FORMS}")
    if path.startswith("hf:"):
        found = data.hub_rows(path, split)
    else:
        local = Path(path).expanduser()
        saved = any((local / name).exists() for name in ("dataset_dict.json", "state.json"))
        if local.is_dir() and not saved:
            if not (local / f"{split}.jsonl").is_file():
                present = ", ".join(sorted(file.name for file in local.glob("*.jsonl")))
                raise UserError(f"{local} has no {split}.jsonl (it has {present or 'no *.jsonl'}); "
                                "pass the split's JSONL file itself, or choose another split")
            local = local / f"{split}.jsonl"
        found = data.local_rows(local, split)
    return itertools.islice(found, int(limit) or None)


def required_fields(where: str, row: dict, fields: tuple[str, ...], task: str) -> None:
    """UserError unless `row` has each of `fields` as a string."""
    for field in fields:
        if not isinstance(row.get(field), str):
            found = "no field" if field not in row else f"a {type(row[field]).__name__} in field"
            raise UserError(f"{where}: {task} records need string fields {', '.join(fields)}; "
                            f"this one has {found} {field!r} (its fields: "
                            f"{', '.join(map(str, row)) or 'none'})")


def load(path: str, split: str = "test", limit: int = 0) -> list[dict]:
    """GSM8K items from `path` (see `rows`), in file order; `limit` > 0 keeps the first ones."""
    items = []
    for index, (where, row) in enumerate(rows(path, split, limit)):
        required_fields(where, row, FIELDS, "GSM8K")
        try:
            gold = gold_answer(row["answer"])
        except UserError as error:
            raise UserError(f"{where}: {error}") from None
        items.append({"id": str(index), "question": row["question"], "answer": row["answer"],
                      "gold": gold, "steps": solution_steps(row["answer"])})
    if not items:
        raise UserError(f"{path} (split {split!r}) holds no GSM8K records")
    return items


def gold_answer(solution: str) -> float:
    """The number after the solution's last "####", e.g. "#### $1,234.50" -> 1234.5."""
    _, marker, tail = solution.rpartition("####")
    text = tail.strip().splitlines()[0] if tail.strip() else ""
    cleaned = text.replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    if not marker or not _GOLD_NUMBER.fullmatch(cleaned):
        raise UserError(f"the solution must end with a line \"#### N\" (N a number); found "
                        f"{('#### ' + text) if marker else 'no ####'!r}")
    return float(cleaned)


def solution_steps(solution: str) -> int:
    """The number of non-empty solution lines before "####"."""
    return sum(1 for line in solution.partition("####")[0].splitlines() if line.strip())


def extract_answer(completion: str) -> float | None:
    """The number after the last "The answer is" (else "####", else the last number), with
    commas, "$" and a trailing period removed; None when `completion` has no number."""
    return answers.final_number(completion)


def is_correct(completion: str, item: dict) -> bool:
    """Whether the completion's answer equals the item's gold number."""
    predicted = extract_answer(completion)
    return predicted is not None and math.isclose(predicted, item["gold"], rel_tol=1e-9,
                                                  abs_tol=1e-9)


def prompt_text(item: dict) -> str:
    return f"{item['question']}\n\n{PROMPT_INSTRUCTION}"


def difficulty(item: dict) -> str:
    """"steps=N" for the item's number of solution steps, one group for 8 and more."""
    steps = item["steps"]
    return f"steps>={MAX_STEPS_GROUP}" if steps >= MAX_STEPS_GROUP else f"steps={steps}"


def _grade(item: dict, completion: str) -> dict:
    return {"correct": is_correct(completion, item), "prediction": extract_answer(completion)}


EVAL_TASKS = [registry.EvalTask(
    "gsm8k", load=lambda path, split, limit, seed: load(path, split, limit), prompt=prompt_text,
    grade=_grade, difficulty=difficulty)]
