"""Commonsense multiple-choice tasks, scored by log-likelihood the way lm-eval-harness does.

    items = commonsense.load("arc_easy", "data/arc")            # the test split, in AI2's jsonl
    pairs = items[0]["pairs"]          # [("Question: ...\\nAnswer:", " cellular telephone"), ...]
    logliks = [log p(continuation | context) for context, continuation in pairs]   # the model
    predictions = [scoring.prediction(logliks, commonsense.choice_lengths(item)), ...]
    scoring.summarize_choices(items, predictions)   # {"arc_easy": {"acc": ..., "acc_norm": ...}}

An item is one question, with every choice written out as the text the model scores:

    {"id": str, "task": str, "label": int, "pairs": [(context, continuation), ...]}

`pairs` holds one (context, continuation) per choice; the model scores log p(continuation |
context) and `label` indexes the right pair. Most tasks share one context across the choices
and vary the continuation; WinoGrande (lm-eval's "partial evaluation") varies the context (the
sentence up to the blank, filled with each option) and shares the continuation (the rest of the
sentence). One layout serves both, so a scorer never branches on the task.

Prompts follow lm-eval-harness; each continuation starts with its " " delimiter:

    commonsenseqa, arc_*   "Question: {question}\\nAnswer:"            " {choice text}"
    openbookqa             "{question stem}"                           " {choice text}"
    boolq                  "{passage}\\nQuestion: {question}?\\nAnswer:"  " no", " yes"
    piqa                   "Question: {goal}\\nAnswer:"                 " {sol1}", " {sol2}"
    siqa                   "Question: {context} {question}\\nAnswer:"   " {answerA}", ...
    winogrande             "{sentence up to the blank}{option}"        " {rest of the sentence}"

(OpenBookQA stems are unfinished sentences, which lm-eval scores bare; SIQA keeps the harness's
original "Question:/Answer:" wording, where its yaml port writes "Q:/A:".)

Paths are the upstream files as published (see `default_paths` for a local layout), a folder
holding them (the split picks the file), or hf:NAME[:CONFIG] (the Hugging Face layout of the
same dataset, e.g. hf:allenai/ai2_arc:ARC-Easy, hf:allenai/openbookqa:main,
hf:allenai/winogrande:winogrande_xl).
"""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Callable, Iterator, Sequence


from dasd_jax import data
from dasd_jax.errors import UserError
from dasd_jax.tasks import registry

TASKS = registry.COMMONSENSE
DELIMITER = " "  # lm-eval's target_delimiter: it opens every continuation
# task -> (folder in a local data root, {split: candidate file names}); the first split is the
# one lm-eval evaluates, and the default.
LOCAL_FILES = {
    "commonsenseqa": ("commonsenseqa", {"validation": ("dev_rand_split.jsonl",),
                                        "train": ("train_rand_split.jsonl",)}),
    "arc_easy": ("arc", {"test": ("ARC-Easy-Test.jsonl",), "validation": ("ARC-Easy-Dev.jsonl",),
                         "train": ("ARC-Easy-Train.jsonl",)}),
    "arc_challenge": ("arc", {"test": ("ARC-Challenge-Test.jsonl",),
                              "validation": ("ARC-Challenge-Dev.jsonl",),
                              "train": ("ARC-Challenge-Train.jsonl",)}),
    "boolq": ("boolq", {"validation": ("val.jsonl",), "train": ("train.jsonl",)}),
    "openbookqa": ("openbookqa", {"test": ("test.tsv", "test.jsonl"),
                                  "validation": ("dev.tsv", "dev.jsonl"),
                                  "train": ("train.tsv", "train.jsonl")}),
    "piqa": ("piqa", {"validation": ("valid.jsonl",), "train": ("train.jsonl",)}),
    "siqa": ("siqa", {"validation": ("dev.jsonl",), "train": ("train.jsonl",)}),
    "winogrande": ("winogrande", {"validation": ("winogrande.jsonl", "dev.jsonl"),
                                  "train": ("train_xl.jsonl",)}),
}
SPLIT_ALIASES = {"dev": "validation", "val": "validation", "valid": "validation"}


def default_split(task: str) -> str:
    """The split lm-eval-harness evaluates `task` on (its test split where it is labelled)."""
    return next(iter(LOCAL_FILES[_check_task(task)][1]))


def default_paths(data_root: Path) -> dict[str, str]:
    """task -> its evaluation file under a local copy laid out like the project's shared data
    (commonsenseqa/dev_rand_split.jsonl, arc/ARC-Easy-Test.jsonl, ..., openbookqa/test.tsv)."""
    return {task: str(Path(data_root) / folder / files[default_split(task)][0])
            for task, (folder, files) in LOCAL_FILES.items()}


def load(task: str, path: str, split: str | None = None, limit: int = 0) -> list[dict]:
    """The items of `task` (see the module docstring) from `path`: an upstream file, a folder
    holding the split's file (`split`, default `default_split(task)`; ignored for a file), or
    hf:NAME[:CONFIG]. `limit` > 0 keeps the first `limit` items. UserError names the file and
    line of any record that cannot be read."""
    _check_task(task)
    split = SPLIT_ALIASES.get(split, split) if split else default_split(task)
    path = str(path)
    if path.startswith("hf:"):
        rows = data.hub_rows(path, split)
    elif not path:
        raise UserError(f"no path for {task}: pass its upstream file, a folder holding it, or "
                        "hf:NAME[:CONFIG]")
    else:
        rows = _file_rows(task, _local_file(task, Path(path).expanduser(), split))
    parse = _PARSERS[task]
    items = []
    for index, (where, row) in enumerate(rows):
        if limit > 0 and index >= limit:
            break
        items.append(_item(parse, row, where, task, index))
    if not items:
        raise UserError(f"{path} holds no {task} records")
    return items


def choice_pairs(item: dict) -> list[tuple[str, str]]:
    """(context, continuation) per choice, in choice order: what the model scores."""
    return item["pairs"]


def choice_lengths(item: dict) -> list[int]:
    """Characters of each choice's continuation without its delimiter: what lm-eval's acc_norm
    divides by (len() of the choice strings; the byte length for ASCII text). WinoGrande's
    choices share one continuation, so its acc_norm equals its acc (lm-eval reports acc only)."""
    return [len(continuation[len(DELIMITER):] if continuation.startswith(DELIMITER)
                else continuation) for _, continuation in item["pairs"]]


# ----------------------------------------------------------------------------- reading rows


def _check_task(task: str) -> str:
    if task not in TASKS:
        raise UserError(f"unknown commonsense task {task!r}; choose from {', '.join(TASKS)}")
    return task


def _local_file(task: str, path: Path, split: str) -> Path:
    if path.is_file():
        return path
    if not path.exists():
        raise UserError(f"no {task} data at {path}: pass its upstream file (e.g. "
                        f"{default_paths(Path('<data>'))[task]}), a folder holding it, or "
                        "hf:NAME[:CONFIG]")
    folder, files = LOCAL_FILES[task]
    if (path / folder).is_dir():  # a data root laid out like default_paths
        path = path / folder
    if split not in files:
        raise UserError(f"{task} has no split {split!r} in a local folder; choose one of "
                        f"{', '.join(files)} (or pass the file itself)")
    for name in files[split]:
        if (path / name).is_file():
            return path / name
    raise UserError(f"{path} holds no {' or '.join(files[split])} for the {split} split of "
                    f"{task}; pass the file itself")


def _file_rows(task: str, file: Path) -> Iterator[tuple[str, dict]]:
    rows = _tsv_rows(file) if file.suffix == ".tsv" else data.jsonl_rows(file)
    if task in ("piqa", "siqa"):
        rows = _with_labels_file(rows, file)
    yield from rows


def _tsv_rows(file: Path) -> Iterator[tuple[str, dict]]:
    """OpenBookQA's published tsv (ID, Question Stem, Choices, Complete Question, Answer Key) as
    rows in the layout of its jsonl: {"id", "question": {"stem", "choices"}, "answerKey"}."""
    columns = ("ID", "Question Stem", "Choices", "Answer Key")
    with open(file, encoding="utf-8", newline="") as lines:
        reader = csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header is None or not set(columns) <= set(header):
            raise UserError(f"{file}, line 1: expected a tsv header with the columns "
                            f"{', '.join(columns)}, found {header}")
        where_is = {name: header.index(name) for name in columns}
        for number, fields in enumerate(reader, start=2):
            if not any(field.strip() for field in fields):
                continue
            where = f"{file}, line {number}"
            if len(fields) != len(header):
                raise UserError(f"{where}: expected {len(header)} tab-separated fields, found "
                                f"{len(fields)}")
            row = {name: fields[index] for name, index in where_is.items()}
            yield where, {"id": row["ID"], "answerKey": row["Answer Key"].strip(),
                          "question": {"stem": row["Question Stem"],
                                       "choices": _lettered_choices(row["Choices"], where)}}


def _lettered_choices(text: str, where: str) -> list[dict]:
    """"(A) first (B) second ..." -> [{"label": "A", "text": "first"}, ...]. Markers count only
    in order (A, B, C, ...), so a stray "(D)" inside the last choice stays part of its text."""
    markers, expected = [], "A"
    for marker in re.finditer(r"(?:^|(?<=\s))\(([A-Z])\)\s*", text):
        if marker.group(1) == expected:
            markers.append(marker)
            expected = chr(ord(expected) + 1)
    if len(markers) < 2 or text[:markers[0].start()].strip():
        raise UserError(f"{where}: choices must read \"(A) ... (B) ...\", found {text!r}")
    ends = [marker.start() for marker in markers[1:]] + [len(text)]
    return [{"label": marker.group(1), "text": text[marker.end():end].strip()}
            for marker, end in zip(markers, ends)]


def _with_labels_file(rows: Iterator[tuple[str, dict]],
                      file: Path) -> Iterator[tuple[str, dict]]:
    """PIQA and SIQA publish labels apart: line i of {stem}-labels.lst labels record i."""
    labels_file = file.with_name(f"{file.stem}-labels.lst")
    labels: list[tuple[str, str]] | None = None
    count = 0
    for where, row in rows:
        if "label" not in row:
            if labels is None:
                if not labels_file.is_file():
                    raise UserError(f"{where}: the record has no label and there is no labels "
                                    f"file {labels_file} beside it")
                with open(labels_file, encoding="utf-8") as lines:
                    labels = [(f"{labels_file}, line {number}", line.strip())
                              for number, line in enumerate(lines, start=1) if line.strip()]
            if count >= len(labels):
                raise UserError(f"{labels_file} has {len(labels)} labels, fewer than the records "
                                f"of {file} ({where} has none)")
            label_where, label = labels[count]
            row = {**row, "label": label}
            where = f"{where} (label: {label_where})"
        count += 1
        yield where, row
    if labels is not None and len(labels) != count:
        raise UserError(f"{labels_file} has {len(labels)} labels but {file} has {count} records; "
                        "they must match line for line")


# ----------------------------------------------------------------------------- rows -> items


class _BadRecord(ValueError):
    """A record that reads but says something impossible; `_item` adds where it is."""


def _item(parse: Callable, row: dict, where: str, task: str, index: int) -> dict:
    """The item `parse` makes of `row`, checked; UserError naming `where` when it cannot."""
    try:
        identifier, pairs, label = parse(row)
    except _BadRecord as error:
        raise UserError(f"{where}: {error}") from None
    except KeyError as error:
        raise UserError(f"{where}: the {task} record has no field {error} (its fields: "
                        f"{', '.join(map(str, row)) or 'none'})") from None
    except (TypeError, ValueError, AttributeError) as error:
        raise UserError(f"{where}: cannot read the {task} record ({error})") from None
    if len(pairs) < 2:
        raise UserError(f"{where}: {len(pairs)} choice(s); a question needs at least two")
    if not 0 <= label < len(pairs):
        raise UserError(f"{where}: label {label} is out of range for {len(pairs)} choices")
    if any(not context.strip() or not continuation.strip() for context, continuation in pairs):
        raise UserError(f"{where}: an empty question or choice in {pairs}")
    return {"id": str(identifier if identifier is not None else f"{task}-{index}"),
            "task": task, "label": label, "pairs": pairs}


def _text(value) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected text, found {type(value).__name__} {value!r}")
    return value


def _label(value, allowed: Sequence[int]) -> int:
    """A label given as an int or its digits, checked against `allowed`."""
    text = str(value).strip()
    if isinstance(value, bool) or not re.fullmatch(r"-?\d+", text):
        raise _BadRecord(f"label {value!r} is not a whole number")
    if int(text) not in allowed:
        raise _BadRecord(f"label {value!r} is out of range: expected one of "
                         f"{', '.join(map(str, allowed))}")
    return int(text)


def _question_choices(row: dict) -> tuple[str, list[str], int]:
    """(question, choice texts, label) of the lettered-choice layouts: AI2's jsonl for
    CommonsenseQA, ARC and OpenBookQA ({"question": {"stem", "choices": [{"label", "text"}]},
    "answerKey"}) and their hub layouts ({"question" or "question_stem", "choices": {"label":
    [...], "text": [...]}, "answerKey"}). Labels may be letters or digits ("1".."4")."""
    question = row["question"] if "question_stem" not in row else row["question_stem"]
    choices = question["choices"] if isinstance(question, dict) else row["choices"]
    if isinstance(question, dict):
        question = question["stem"]
    if isinstance(choices, dict):
        labels, texts = list(choices["label"]), list(choices["text"])
    else:
        labels = [choice["label"] for choice in choices]
        texts = [choice["text"] for choice in choices]
    labels = [str(label).strip() for label in labels]
    answer = str(row["answerKey"]).strip()
    if answer not in labels:
        raise _BadRecord(f"answerKey {answer!r} is not among the choice labels "
                                 f"{', '.join(labels)}")
    return _text(question), [_text(text) for text in texts], labels.index(answer)


def _continuations(texts: Sequence[str]) -> list[str]:
    return [DELIMITER + text for text in texts]


def _question_answer(row: dict) -> tuple:
    question, texts, label = _question_choices(row)
    context = f"Question: {question}\nAnswer:"
    return row.get("id"), [(context, choice) for choice in _continuations(texts)], label


def _openbookqa(row: dict) -> tuple:
    stem, texts, label = _question_choices(row)  # lm-eval scores the bare stem
    return row.get("id"), [(stem, choice) for choice in _continuations(texts)], label


def _boolq(row: dict) -> tuple:
    """SuperGLUE's label ("true"/"false", or 0/1 on the hub) or google/boolq's bool `answer`."""
    answer = row["label"] if "label" in row else row["answer"]
    truth = {"true": 1, "false": 0, "1": 1, "0": 0}.get(str(answer).strip().lower())
    if truth is None:
        raise _BadRecord(f"label {answer!r} is neither true nor false")
    context = f"{_text(row['passage'])}\nQuestion: {_text(row['question'])}?\nAnswer:"
    return row.get("idx"), [(context, " no"), (context, " yes")], truth


def _piqa(row: dict) -> tuple:
    context = f"Question: {_text(row['goal'])}\nAnswer:"
    texts = _continuations([_text(row["sol1"]), _text(row["sol2"])])
    return row.get("id"), [(context, choice) for choice in texts], _label(row["label"], (0, 1))


def _siqa(row: dict) -> tuple:
    context = f"Question: {_text(row['context'])} {_text(row['question'])}\nAnswer:"
    texts = _continuations([_text(row[key]) for key in ("answerA", "answerB", "answerC")])
    label = _label(row["label"], (1, 2, 3)) - 1  # published 1-based
    return row.get("id"), [(context, choice) for choice in texts], label


def _winogrande(row: dict) -> tuple:
    """The converted layout (context_options, continuation, gold: 0-based), or the original one
    (sentence with a "_" blank, option1, option2, answer: "1" / "2")."""
    if "context_options" in row:
        contexts = [_text(context) for context in row["context_options"]]
        rest, label = _text(row["continuation"]), _label(row["gold"], range(len(contexts)))
    else:
        sentence = _text(row["sentence"])
        if "_" not in sentence:
            raise _BadRecord(f"the sentence has no \"_\" blank: {sentence!r}")
        blank = sentence.index("_")
        contexts = [sentence[:blank] + _text(row[key]) for key in ("option1", "option2")]
        rest, label = sentence[blank + 1:], _label(row["answer"], (1, 2)) - 1
    continuation = DELIMITER + rest.strip()
    return row.get("id"), [(context, continuation) for context in contexts], label


_PARSERS = {"commonsenseqa": _question_answer, "arc_easy": _question_answer,
            "arc_challenge": _question_answer, "openbookqa": _openbookqa, "boolq": _boolq,
            "piqa": _piqa, "siqa": _siqa, "winogrande": _winogrande}


def _task(name: str) -> registry.EvalTask:
    return registry.EvalTask(
        name, load=lambda path, split, limit, seed: load(name, path, default_split(name), limit),
        choices=choice_pairs, choice_lengths=choice_lengths,
        prompt=lambda item: item["pairs"][0][0])


EVAL_TASKS = [_task(name) for name in TASKS]
