"""Stage 3: `python -m dasd_jax.evaluate --config=configs/math.py[:variant] [--config.eval.*=...]`.

Scores a checkpoint on the tasks in `eval.tasks` (comma-separated):

    gsm8k, math500                    generation; accuracy, by difficulty (solution steps, level)
    humaneval, mbpp                   generation; programs judged by tasks.harness in
                                      tasks.sandbox; pass@1 (greedy) or pass@k (unbiased) with
                                      eval.samples > 1
    commonsenseqa, arc_easy, arc_challenge, boolq, openbookqa, piqa, siqa, winogrande
                                      multiple choice by log-likelihood; acc and acc_norm
    synthetic, synthetic_easy, synthetic_hard
                                      the generated arithmetic worlds (offline runs, the demo)

Each task is an `EvalTask` of its module in dasd_jax/tasks, found by `tasks.registry`.

The checkpoint (`eval.checkpoint`) is an HF directory or hub id, a workdir whose Orbax
`checkpoints/` hold a training run of `model.path`, or "base" (model.path itself). With
`eval.predictions=FILE` (JSONL of task, id, completion; e.g. from vLLM) it scores those
completions without loading a model. With `eval.baseline` (usually the base model) it evaluates
that checkpoint too and adds a forgetting table: the change on the tasks not in `eval.tuned_tasks`.
Writes `{output}/{task}.jsonl` (one line per example) and `{output}/summary.json`.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import jax
import numpy as np

from dasd_jax import (atomic, checkpoint, cli, data, hf, loading, sampling, sharding, shift, stages,
                      step)
from dasd_jax.errors import UserError
from dasd_jax.tasks import registry, scoring


def task_list(config: Any) -> list[str]:
    """The tasks of eval.tasks, after registering eval.task_modules' own."""
    for module in filter(None, (m.strip() for m in config.eval.task_modules.split(","))):
        registry.add_module(module)
    names = [t.strip() for t in config.eval.tasks.split(",") if t.strip()]
    known = registry.eval_tasks()
    unknown = [t for t in names if t not in known]
    if unknown or not (names or shift.enabled(config)):
        raise UserError(f"--config.eval.tasks={config.eval.tasks!r}: choose from "
                        f"{', '.join(known)}")
    return names


def load_items(config: Any, task: str) -> list[dict]:
    spec = registry.eval_task(task)
    path = config.eval.paths.get(task, "") or ""
    if not path and spec.needs_path:
        raise UserError(f"no data path for {task}: set --config.eval.paths.{task}=PATH")
    return spec.load(path, config.eval.split, config.eval.limit, config.seed)


# ----------------------------------------------------------------------------- models


def load_checkpoint(config: Any, path: str, mesh):
    """(cfg, params, tokenizer) of an HF checkpoint, of the latest Orbax step in a workdir (LoRA
    adapters merged into the base), or ("" or "base") of the model the run starts from
    (model.path, or its random init)."""
    if path in ("", "base"):
        return loading.load_model(config, mesh)
    directory = Path(path).expanduser()
    if (directory / "checkpoints").is_dir():
        return trained_from_workdir(config, directory, mesh)
    cfg, params = hf.load(path, mesh=mesh, rules=config.mesh.rules)
    return cfg.replace(platform=config.model.platform), params, hf.load_tokenizer(path, cfg)


def trained_from_workdir(config: Any, directory: Path, mesh):
    """(cfg, params, tokenizer) of the latest checkpoint of a training workdir, restoring the
    trained params alone (never the optimizer state). Full fine-tuning: the trainee's params,
    straight into their shardings, without loading `model.path`'s weights. LoRA: the adapters,
    merged into `model.path`'s frozen weights."""
    restorer = checkpoint.Checkpointer(directory, every=1, max_to_keep=1)
    try:
        if step.uses_lora(config):
            cfg, params, tokenizer = loading.load_model(config, mesh)
            run = step.setup(config, cfg, mesh)
            base_params = run.base_params(params)
            del params
        else:  # the trainee's params come whole from the checkpoint
            cfg, tokenizer = loading.model_config_and_tokenizer(config)
            run, base_params = step.setup(config, cfg, mesh), None
        trained = restorer.restore_params(sharding.abstract(run.trainable_shapes(),
                                                            run.state_shardings.params))
        return (*run.trained_model(trained, base_params), tokenizer)
    finally:
        restorer.close()


def _settings(config, cfg, tokenizer) -> sampling.Settings:
    return sampling.Settings(
        max_new_tokens=config.eval.max_new_tokens, temperature=config.eval.temperature,
        top_p=config.eval.top_p, eos_ids=sampling.stop_ids(cfg, tokenizer),
        prompt_buckets=tuple(config.eval.prompt_buckets))


def generate_completions(config, cfg, params, tokenizer,
                         prompts: list[str]) -> tuple[list[str], list[bool]]:
    """(completion texts, whether each ended with a stop token within eval.max_new_tokens)."""
    settings = _settings(config, cfg, tokenizer)
    ids = [data.prompt_tokens(text, tokenizer, config.data) for text in prompts]
    results = sampling.generate_all(cfg, params, ids, settings, config.eval.batch_size,
                                    jax.random.PRNGKey(config.seed))
    completions = [tokenizer.decode([t for t in r.tokens if t not in settings.eos_ids],
                                    skip_special_tokens=True) for r in results]
    return completions, [r.finished for r in results]


def choice_logliks(config, cfg, params, tokenizer, spec: registry.EvalTask,
                   items: list[dict]) -> list[list[tuple[float, int]]]:
    """Per item, per choice of the multiple-choice task `spec`: (sum log p(continuation |
    context), the choice's length for acc_norm). Pairs are tokenized as lm-eval's `hf` model
    does (`scoring.encode_pair`)."""
    pairs = [(i, c, scoring.encode_pair(tokenizer, context, continuation, config.eval.bos))
             for i, item in enumerate(items)
             for c, (context, continuation) in enumerate(spec.choices(item))]
    # Longest first, as lm-eval orders its requests: each pass pads to the bucket of its
    # longest pair, so passes of similar lengths pad least.
    pairs.sort(key=lambda pair: -sum(map(len, pair[2])))
    scored = sampling.score_stats(
        cfg, params, [encoded[0] for _, _, encoded in pairs],
        [encoded[1] for _, _, encoded in pairs], ("logprob",), tuple(config.eval.prompt_buckets),
        batch_size=config.eval.batch_size)
    out = [[None] * len(spec.choices(item)) for item in items]
    for (i, c, _), found in zip(pairs, scored):
        out[i][c] = float(np.sum(found["logprob"]))
    return [list(zip(scores, spec.choice_lengths(item))) for scores, item in zip(out, items)]


# ----------------------------------------------------------------------------- scoring


def score_generative(task: str, items: list[dict],
                     completions: list[list[str]]) -> tuple[list, dict]:
    """Per-example lines and the task summary; completions: per item, one or more samples.

    `accuracy` counts each item's first sample; with several samples per item, `pass@k`
    (unbiased, Chen et al. 2021) is reported for every k in (1, 5, 10) that no item has fewer
    samples than, and `samples` says how many each item had.
    """
    spec = registry.eval_task(task)
    lines, by_difficulty = [], defaultdict(list)
    counts = [len(samples) for samples in completions]
    for item, samples in zip(items, completions):
        graded = [spec.grade(item, text) for text in samples]
        correct = [g["correct"] for g in graded]
        difficulty = spec.difficulty(item)
        by_difficulty[difficulty].append(correct[0])
        lines.append({"task": task, "id": item["id"], "difficulty": difficulty,
                      "completion": samples[0], "correct": correct[0], **graded[0],
                      "samples_correct": sum(correct), "samples": len(samples)})
    summary = {"examples": len(items),
               "accuracy": float(np.mean([line["correct"] for line in lines])) if lines else 0.0,
               "by_difficulty": {d: {"examples": len(v), "accuracy": float(np.mean(v))}
                                 for d, v in sorted(by_difficulty.items())}}
    if counts and max(counts) > 1:
        summary["samples"] = {"min": min(counts), "max": max(counts)}
        summary.update({f"pass@{k}": float(np.mean([
            scoring.pass_at_k(line["samples"], line["samples_correct"], k) for line in lines]))
            for k in (1, 5, 10) if k <= min(counts)})
    return lines, summary


def score_multiple_choice(task: str, items: list[dict], logliks) -> tuple[list, dict]:
    predictions = [scoring.prediction([s for s, _ in item_scores], [n for _, n in item_scores])
                   for item_scores in logliks]
    lines = [{"task": task, "id": item["id"], "label": item["label"], "prediction": pred,
              "prediction_norm": pred_norm, "correct": pred == item["label"]}
             for item, (pred, pred_norm) in zip(items, predictions)]
    summary = scoring.choice_accuracy([item["label"] for item in items], predictions)
    summary.update(examples=summary.pop("count"), accuracy=summary["acc"])
    return lines, summary


def evaluate_model(config, cfg, params, tokenizer, tasks: list[str], mesh) -> tuple[dict, dict]:
    """(per-task lines, per-task summaries) for one model."""
    lines, summaries = {}, {}
    with sharding.activation_rules(mesh, config.mesh.rules):
        for task in tasks:
            items = load_items(config, task)
            spec = registry.eval_task(task)
            if spec.choices:
                lines[task], summaries[task] = score_multiple_choice(
                    task, items, choice_logliks(config, cfg, params, tokenizer, spec, items))
                continue
            limit = max(config.eval.prompt_buckets)
            fits = [len(data.prompt_tokens(spec.prompt(item), tokenizer, config.data)) <= limit
                    for item in items]
            skipped = len(items) - sum(fits)
            items = [item for item, fit in zip(items, fits) if fit]
            prompts = [spec.prompt(item) for item in items]
            samples = max(config.eval.samples, 1)
            texts, finished = generate_completions(config, cfg, params, tokenizer,
                                                   [p for p in prompts for _ in range(samples)])
            grouped = [texts[i * samples:(i + 1) * samples] for i in range(len(items))]
            lines[task], summaries[task] = score_generative(task, items, grouped)
            for line, done in zip(lines[task], finished[::samples]):
                line["finished"] = done
            summaries[task]["unfinished"] = (1.0 - float(np.mean(finished[::samples]))
                                             if items else 0.0)
            summaries[task]["skipped_prompt_too_long"] = skipped
    return lines, summaries


def score_predictions(config, tasks: list[str]) -> tuple[dict, dict]:
    """Scores completions produced elsewhere: JSONL lines {task, id, completion}."""
    path = Path(config.eval.predictions)
    if not path.exists():
        raise UserError(f"--config.eval.predictions={path}: no such file")
    by_task = defaultdict(lambda: defaultdict(list))
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            by_task[row["task"]][str(row["id"])].append(row["completion"])
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise UserError(f"{path}, line {number}: expected a JSON object with task, id and "
                            f"completion ({type(error).__name__}: {error})") from None
    lines, summaries = {}, {}
    for task in tasks:
        if registry.eval_task(task).choices:
            raise UserError(f"{task} is scored by log-likelihood, which needs the model; "
                            "predictions files hold generative tasks only")
        items = [item for item in load_items(config, task) if item["id"] in by_task[task]]
        if not items:
            raise UserError(f"{path} has no completions for task {task} with known ids")
        lines[task], summaries[task] = score_generative(
            task, items, [by_task[task][item["id"]] for item in items])
        repeated = sum(len(by_task[task][item["id"]]) > 1 for item in items)
        unknown = len(set(by_task[task]) - {item["id"] for item in items})
        if repeated:
            summaries[task]["note"] = (
                f"{repeated} ids have several completions: each id is one example and its "
                "completions are its samples (accuracy counts the first, in file order; pass@k "
                "uses all of them)")
        if unknown:
            summaries[task]["ids_not_in_the_data"] = unknown
    return lines, summaries


def format_table(summaries: dict, baseline: dict | None, tuned: set[str]) -> str:
    header = f"{'task':<16}{'examples':>9}{'accuracy':>10}"
    rows = [header + (f"{'base':>9}{'Δ':>8}" if baseline else "")]
    for task, s in summaries.items():
        row = f"{task:<16}{s['examples']:>9}{s['accuracy']:>10.1%}"
        if baseline and task in baseline:
            delta = s["accuracy"] - baseline[task]["accuracy"]
            row += f"{baseline[task]['accuracy']:>9.1%}{delta:>+8.1%}"
            row += "  (tuned)" if task in tuned else "  (forgetting)"
        rows.append(row)
        for difficulty, d in s.get("by_difficulty", {}).items():
            if len(s["by_difficulty"]) > 1:
                rows.append(f"  {difficulty:<14}{d['examples']:>9}{d['accuracy']:>10.1%}")
    return "\n".join(rows)


def distribution_shift(config, tuned: tuple, base: tuple, output: Path) -> dict:
    """`shift.measure` of the tuned model (cfg, params, tokenizer) against the base: per-prompt
    lines to {output}/shift.jsonl, the per-task summary returned."""
    if len(tuned[2]) != len(base[2]):
        raise UserError(f"--config.eval.shift: the checkpoint's tokenizer ({len(tuned[2])} "
                        f"tokens) is not the base's ({len(base[2])}); the shift compares the "
                        "same text under both models")
    answered = shift.base_answers(config, base[0], base[1], base[2])
    lines, summary = shift.measure(config, base[:2], tuned[:2], answered)
    if jax.process_index() == 0:
        atomic.write_text(output / "shift.jsonl", "".join(json.dumps(line) + "\n"
                                                           for line in lines))
    return summary


@stages.stage("evaluate")
def evaluate(config: Any) -> dict:
    """Runs the evaluation; returns the summary written to summary.json."""
    tasks = task_list(config)
    output = Path(config.eval.output)
    baseline = shifted = None
    if config.eval.predictions:
        lines, summaries = score_predictions(config, tasks)
    else:
        mesh = sharding.make_mesh(config.mesh.shape)
        tuned = load_checkpoint(config, config.eval.checkpoint, mesh)
        lines, summaries = evaluate_model(config, *tuned, tasks, mesh)
        base = None
        if shift.enabled(config):
            base = load_checkpoint(config, "base", mesh)
            with sharding.activation_rules(mesh, config.mesh.rules):
                shifted = distribution_shift(config, tuned, base, output)
        del tuned
        if config.eval.baseline and tasks:
            if base is None or config.eval.baseline != "base":
                base = None  # one model in memory at a time
                base = load_checkpoint(config, config.eval.baseline, mesh)
            _, baseline = evaluate_model(config, *base, tasks, mesh)
    tuned_tasks = {t.strip() for t in config.eval.tuned_tasks.split(",") if t.strip()}
    summary = {"tasks": summaries}
    if baseline is not None:
        summary["baseline"] = baseline
        summary["forgetting"] = {task: summaries[task]["accuracy"] - baseline[task]["accuracy"]
                                 for task in tasks if task not in tuned_tasks}
    if shifted is not None:
        summary["shift"] = shifted
    if jax.process_index() == 0:
        for task, task_lines in lines.items():
            atomic.write_text(output / f"{task}.jsonl",
                              "".join(json.dumps(line, default=str) + "\n" for line in task_lines))
        atomic.write_text(output / "summary.json",
                          json.dumps(summary, indent=2, default=str) + "\n")
        print(format_table(summaries, baseline, tuned_tasks))
        if shifted is not None:
            print(format_shift(shifted))
        for task, task_summary in summaries.items():
            for key in ("note", "ids_not_in_the_data"):
                if key in task_summary:
                    print(f"{task}: {key.replace('_', ' ')}: {task_summary[key]}")
        print(f"wrote {output / 'summary.json'}")
    return summary


def format_shift(shifted: dict) -> str:
    rows = [f"{'shift from the base':<20}{'prompts':>8}{'KL':>16}{'ΔNLL':>18}{'top-1 changed':>20}"]
    for task, s in shifted.items():
        cells = [f"{s[name]:.4f} ± {s[name + '_se'] or 0:.4f}" for name in shift.MEASURES]
        rows.append(f"{task:<20}{s['prompts']:>8}{cells[0]:>16}{cells[1]:>18}{cells[2]:>20}")
    return "\n".join(rows)


if __name__ == "__main__":
    cli.run(evaluate)
