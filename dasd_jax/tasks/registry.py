"""Every task the stages know, by name: a new benchmark is one file and one line of registration.

    registry.eval_task("gsm8k")              # EvalTask: load, prompt, grade, ... (imports gsm8k.py)
    registry.rewrite_family("math")          # RewriteFamily: answer-aware template, acceptance
    registry.records("synthetic", n, seed)   # generated training records, for data.path
    registry.tokenizer("synthetic")          # a random model's tokenizer (model.random_tokenizer)

Registration: the tables below name the module that defines each task, rewrite family, record
source and tokenizer (a module of dasd_jax.tasks, or any importable module). A module is imported
when one of its names is first asked for, so a stage never imports a task it does not run (the
code tasks' sandbox, the demo world). It defines them as `EVAL_TASKS` (a list of EvalTask),
`REWRITE_FAMILIES` (a list of RewriteFamily), `RECORD_SOURCES` ({name: (count, seed) ->
records}) and `TOKENIZERS` ({name: () -> tokenizer}). A module outside the package registers at
run time with `add_module("my_benchmark")` (`--config.eval.task_modules=my_benchmark`).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Callable

from dasd_jax.errors import UserError

COMMONSENSE = ("commonsenseqa", "arc_easy", "arc_challenge", "boolq", "openbookqa", "piqa", "siqa",
               "winogrande")
# name -> its module (relative names are under dasd_jax.tasks)
EVAL_TASK_MODULES = {
    "gsm8k": "gsm8k", "math500": "math500", "humaneval": "coding", "mbpp": "coding",
    **{name: "commonsense" for name in COMMONSENSE},
    "synthetic": "synthetic", "synthetic_easy": "synthetic", "synthetic_hard": "synthetic",
}
REWRITE_FAMILY_MODULES = {"math": "answers", "code": "answers", "commonsense": "answers",
                          "synthetic": "synthetic"}
RECORD_SOURCE_MODULES = {"synthetic": "synthetic"}
TOKENIZER_MODULES = {"synthetic": "synthetic"}


def _everything(item: dict) -> str:
    return "all"


@dataclasses.dataclass(frozen=True)
class EvalTask:
    """A benchmark of stage 3.

    load(path, split, limit, seed) -> items (dicts with "id"). A generative task gives
    prompt(item) -> the instruction and grade(item, completion) -> {"correct": bool, ...}; a
    multiple-choice task gives choices(item) -> [(context, continuation)] per choice, scored by
    log-likelihood, with `label` the right one, and choice_lengths(item) -> the characters
    acc_norm divides by (tasks.scoring). prompt(item) of a multiple-choice task is its question
    (the distribution-shift measure asks it). difficulty(item) names the item's group in the
    results. `needs_path`: whether eval.paths.NAME must name the data.
    """

    name: str
    load: Callable[[str, str, int, int], list[dict]]
    prompt: Callable[[dict], str] | None = None
    grade: Callable[[dict, str], dict] | None = None
    difficulty: Callable[[dict], str] = _everything
    choices: Callable[[dict], list[tuple[str, str]]] | None = None
    choice_lengths: Callable[[dict], list[int]] | None = None
    needs_path: bool = True


@dataclasses.dataclass(frozen=True)
class RewriteFamily:
    """How stage 1 rewrites a family of tasks: the answer-aware `template` (with {prompt} and
    {reference}) and `accept(prompt, text, reference)`: None when a finished, leak-free rewrite
    is kept, else why it falls back (e.g. "wrong_answer")."""

    name: str
    template: str
    accept: Callable[[str, str, str], str | None]


_LOADED: dict[str, dict] = {"tasks": {}, "families": {}, "sources": {}, "tokenizers": {}}
_TABLES = {"tasks": EVAL_TASK_MODULES, "families": REWRITE_FAMILY_MODULES,
           "sources": RECORD_SOURCE_MODULES, "tokenizers": TOKENIZER_MODULES}


def add_module(name: str) -> None:
    """Imports `name` (a module path; relative names under dasd_jax.tasks) and registers what it
    defines, under its own names."""
    try:
        module = importlib.import_module(name if "." in name or name not in _known_modules()
                                         else f"dasd_jax.tasks.{name}")
    except ImportError as error:
        raise UserError(f"task module {name!r} does not import ({error}); give an importable "
                        "module path, e.g. --config.eval.task_modules=my_package.my_benchmark"
                        ) from None
    _LOADED["tasks"].update({t.name: t for t in getattr(module, "EVAL_TASKS", ())})
    _LOADED["families"].update({f.name: f for f in getattr(module, "REWRITE_FAMILIES", ())})
    _LOADED["sources"].update(getattr(module, "RECORD_SOURCES", {}))
    _LOADED["tokenizers"].update(getattr(module, "TOKENIZERS", {}))


def _known_modules() -> set[str]:
    return {module for table in _TABLES.values() for module in table.values()}


def _lookup(kind: str, name: str, what: str):
    if name not in _LOADED[kind] and name in _TABLES[kind]:
        add_module(_TABLES[kind][name])
    if name not in _LOADED[kind]:
        raise UserError(f"unknown {what} {name!r}; choose from {', '.join(names(kind))}")
    return _LOADED[kind][name]


def names(kind: str) -> tuple[str, ...]:
    """The registered names of a kind ("tasks", "families", "sources", "tokenizers"), without
    importing their modules."""
    return tuple(dict.fromkeys([*_TABLES[kind], *_LOADED[kind]]))


def eval_tasks() -> tuple[str, ...]:
    return names("tasks")


def eval_task(name: str) -> EvalTask:
    return _lookup("tasks", name, "task")


def rewrite_families() -> tuple[str, ...]:
    return names("families")


def rewrite_family(name: str) -> RewriteFamily:
    return _lookup("families", name, "rewrite family (--config.rewrite.task)")


def record_sources() -> tuple[str, ...]:
    """The names data.path / rewrite.input accept for generated records."""
    return names("sources")


def records(name: str, count: int, seed: int) -> list[dict]:
    """`count` generated records of the source `name` (prompt, reference, ...)."""
    return _lookup("sources", name, "record source")(count, seed)


def tokenizer(name: str):
    """The tokenizer a task module provides for random models (`model.random_tokenizer`)."""
    return _lookup("tokenizers", name, "tokenizer (--config.model.random_tokenizer)")()
