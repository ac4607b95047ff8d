"""Tasks reach the stages through the registry alone: a new benchmark is one file and its
registration, and a stage imports only the task modules it runs."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dasd_jax.errors import UserError
from dasd_jax.tasks import registry
from tests import processes

REPO = Path(__file__).resolve().parents[1]

BENCHMARK = '''
"""A benchmark outside the package: one generative task and one multiple-choice task."""
from dasd_jax.tasks import registry


def numbers(path, split, limit, seed):
    return [{"id": str(i), "prompt": f"Say {i}.", "answer": str(i)} for i in range(limit or 3)]


def choices(path, split, limit, seed):
    return [{"id": str(i), "label": i % 2,
             "pairs": [(f"Is {i} even?", " yes"), (f"Is {i} even?", " no")]}
            for i in range(limit or 4)]


EVAL_TASKS = [
    registry.EvalTask("say_number", load=numbers, prompt=lambda item: item["prompt"],
                      grade=lambda item, text: {"correct": item["answer"] in text},
                      needs_path=False),
    registry.EvalTask("even_or_odd", load=choices, choices=lambda item: item["pairs"],
                      choice_lengths=lambda item: [3, 2], prompt=lambda item: item["pairs"][0][0],
                      needs_path=False),
]
'''


@pytest.mark.slow
@pytest.mark.subprocess
def test_a_benchmark_of_ones_own_is_one_file_and_a_registration_evaluated_by_the_cli(tmp_path):
    (tmp_path / "my_benchmark.py").write_text(BENCHMARK)
    env = processes.environment(devices=1)
    env["PYTHONPATH"] = f"{tmp_path}:{env.get('PYTHONPATH', '')}"
    result = subprocess.run(
        [sys.executable, "-m", "dasd_jax.evaluate", "--config=configs/math.py:tiny",
         f"--config.workdir={tmp_path / 'run'}", "--config.eval.task_modules=my_benchmark",
         "--config.eval.tasks=say_number,even_or_odd", "--config.eval.checkpoint=base",
         "--config.eval.baseline=", "--config.eval.limit=4", "--config.eval.max_new_tokens=4"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "eval" / "summary.json").read_text())
    assert summary["tasks"]["say_number"]["examples"] == 4
    assert summary["tasks"]["even_or_odd"]["examples"] == 4
    assert {"acc", "acc_norm"} <= set(summary["tasks"]["even_or_odd"])


def test_a_registered_name_imports_its_module_only_when_asked_for():
    assert {"gsm8k", "humaneval", "arc_easy", "synthetic"} <= set(registry.eval_tasks())
    assert registry.eval_task("gsm8k").name == "gsm8k"
    with pytest.raises(UserError, match=r"unknown task 'gsm9k'; choose from gsm8k, math500"):
        registry.eval_task("gsm9k")
    with pytest.raises(UserError, match=r"task module 'no_such_module' does not import"):
        registry.add_module("no_such_module")


@pytest.mark.subprocess
def test_importing_the_trainer_imports_neither_the_sandbox_nor_the_demo_world():
    code = textwrap.dedent("""
        import sys
        import dasd_jax.train, dasd_jax.rewrite, dasd_jax.evaluate, dasd_jax.analyze
        print(sorted(m for m in sys.modules if m in (
            "dasd_jax.demo", "dasd_jax.tasks.synthetic", "dasd_jax.tasks.sandbox",
            "dasd_jax.tasks.harness", "dasd_jax.tasks.coding")))
    """)
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, timeout=120, env=processes.environment(devices=1))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
