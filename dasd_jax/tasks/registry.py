"""Every task the stages know, collected from the task modules: a new benchmark is one file.

    registry.eval_task("gsm8k")          # EvalTask: load, prompt, grade, difficulty, ...
    registry.rewrite_family("math")      # RewriteFamily: answer-aware template, acceptance
    registry.records("synthetic", n, seed)   # generated training records, for data.path

A module of `dasd_jax/tasks` takes part by defining any of `EVAL_TASKS` (a list of EvalTask),
`REWRITE_FAMILIES` (a list of RewriteFamily) and `RECORD_SOURCES` ({name: (n, seed) -> records});
this module finds them by importing every module of the package.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import pkgutil
from typing import Callable

from dasd_jax.errors import UserError


def _everything(item: dict) -> str:
    return "all"


@dataclasses.dataclass(frozen=True)
class EvalTask:
    """A benchmark of stage 3.

    load(path, split, limit, seed) -> items (dicts with "id"); generative tasks give
    prompt(item) -> the instruction and grade(item, completion) -> {"correct": bool, ...};
    multiple-choice tasks (`choices`) are scored by log-likelihood (tasks.commonsense).
    difficulty(item) names the item's group in the results. `needs_path`: whether
    eval.paths.NAME must name the data (generated tasks need none).
    """

    name: str
    load: Callable[[str, str, int, int], list[dict]]
    prompt: Callable[[dict], str] | None = None
    grade: Callable[[dict, str], dict] | None = None
    difficulty: Callable[[dict], str] = _everything
    choices: bool = False
    needs_path: bool = True


@dataclasses.dataclass(frozen=True)
class RewriteFamily:
    """How stage 1 rewrites a family of tasks: the answer-aware `template` (with {prompt} and
    {reference}) and `accept(prompt, text, reference)`: None when a finished, leak-free rewrite
    is kept, else why it falls back (e.g. "wrong_answer")."""

    name: str
    template: str
    accept: Callable[[str, str, str], str | None]


@functools.cache
def _collected() -> tuple[dict, dict, dict]:
    import dasd_jax.tasks as package

    tasks, families, sources = {}, {}, {}
    for info in pkgutil.iter_modules(package.__path__):
        if info.name == "registry":
            continue
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        tasks.update({t.name: t for t in getattr(module, "EVAL_TASKS", ())})
        families.update({f.name: f for f in getattr(module, "REWRITE_FAMILIES", ())})
        sources.update(getattr(module, "RECORD_SOURCES", {}))
    return tasks, families, sources


def eval_tasks() -> dict[str, EvalTask]:
    return dict(_collected()[0])


def eval_task(name: str) -> EvalTask:
    tasks = _collected()[0]
    if name not in tasks:
        raise UserError(f"unknown task {name!r}; choose from {', '.join(tasks)}")
    return tasks[name]


def rewrite_families() -> dict[str, RewriteFamily]:
    return dict(_collected()[1])


def rewrite_family(name: str) -> RewriteFamily:
    families = _collected()[1]
    if name not in families:
        raise UserError(f"--config.rewrite.task={name!r} is not one of {', '.join(families)}")
    return families[name]


def record_sources() -> tuple[str, ...]:
    """The names data.path / rewrite.input accept for generated records."""
    return tuple(_collected()[2])


def records(name: str, count: int, seed: int) -> list[dict]:
    """`count` generated records of the source `name` (prompt, reference, ...)."""
    return _collected()[2][name](count, seed)
