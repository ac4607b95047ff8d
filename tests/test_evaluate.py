"""`python -m dasd_jax.evaluate` end to end on tiny models, and scoring completions made
elsewhere."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from dasd_jax import evaluate, hf, perplexity, sharding
from dasd_jax.errors import CheckpointError, UserError
from dasd_jax.tasks import commonsense, registry
from configs import math as math_config

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"{DATA} is not present")


def tiny_config(workdir, **eval_settings):
    config = math_config.get_config("tiny")
    config.workdir = str(workdir)
    config.eval.update({"limit": 3, "max_new_tokens": 8, "batch_size": 4, **eval_settings})
    return config


@pytest.mark.slow
@pytest.mark.subprocess
def test_tiny_evaluate_prints_its_table_with_a_forgetting_column(tmp_path):
    checkpoint = perplexity.embedded_checkpoint(tmp_path / "ckpt")
    result = subprocess.run(
        [sys.executable, "-m", "dasd_jax.evaluate", "--config=configs/math.py:tiny",
         f"--config.workdir={tmp_path}", f"--config.eval.checkpoint={checkpoint}",
         "--config.eval.tasks=synthetic", "--config.eval.limit=4",
         "--config.eval.max_new_tokens=8"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "synthetic" in result.stdout and "(tuned)" in result.stdout
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["tasks"]["synthetic"]["examples"] == 4
    lines = (tmp_path / "eval" / "synthetic.jsonl").read_text().splitlines()
    assert len(lines) == 4
    assert {"id", "completion", "correct", "difficulty"} <= set(json.loads(lines[0]))


@pytest.mark.slow
@needs_data
def test_every_task_family_runs_on_a_few_real_examples(tmp_path):
    paths = commonsense.default_paths(DATA)
    paths.update(gsm8k=str(DATA / "gsm8k" / "test.jsonl"),
                 math500=str(DATA / "math500" / "test.jsonl"),
                 humaneval=str(DATA / "humaneval" / "HumanEval.jsonl.gz"),
                 mbpp=str(DATA / "mbpp" / "mbpp.jsonl"))
    every = registry.eval_tasks()
    config = tiny_config(tmp_path, tasks=",".join(every), checkpoint="base", baseline="",
                         prompt_buckets=(512, 1024, 2048))
    config.eval.paths.update(paths)
    summary = evaluate.evaluate(config)
    assert set(summary["tasks"]) == set(every)
    for task, numbers in summary["tasks"].items():
        examples = numbers["examples"] + numbers.get("skipped_prompt_too_long", 0)
        assert examples == 3 and 0 <= numbers["accuracy"] <= 1, task
    assert "acc_norm" in summary["tasks"]["piqa"]
    assert set(summary["tasks"]["math500"]["by_difficulty"]) <= {f"level={i}" for i in range(1, 6)}


@needs_data
def test_predictions_made_elsewhere_are_scored_without_a_model(tmp_path):
    lines = (DATA / "gsm8k" / "test.jsonl").read_text().splitlines()
    gold = [json.loads(line) for line in lines[:4]]
    predictions = tmp_path / "predictions.jsonl"
    predictions.write_text("".join(
        json.dumps({"task": "gsm8k", "id": str(i), "completion": row["answer"] if i % 2 == 0
                    else "The answer is -1."}) + "\n" for i, row in enumerate(gold)))
    config = tiny_config(tmp_path, tasks="gsm8k", predictions=str(predictions), limit=0)
    config.eval.paths.gsm8k = str(DATA / "gsm8k" / "test.jsonl")
    summary = evaluate.evaluate(config)
    assert summary["tasks"]["gsm8k"] == {**summary["tasks"]["gsm8k"], "examples": 4,
                                         "accuracy": 0.5}


@pytest.mark.slow
def test_an_orbax_workdir_is_evaluated_from_its_latest_checkpoint(tmp_path):
    from dasd_jax import train
    config = tiny_config(tmp_path, tasks="synthetic", checkpoint=str(tmp_path), baseline="")
    config.train.update(steps=3, warmup_steps=1, batch_size=8)
    config.checkpoint.export = False
    train.train(config)
    assert evaluate.evaluate(config)["tasks"]["synthetic"]["examples"] == 3
    with pytest.raises(CheckpointError):
        hf.load(tmp_path / "hf")


@pytest.mark.slow
def test_unknown_tasks_and_missing_paths_are_named(tmp_path):
    with pytest.raises(UserError, match=r"eval.tasks='gsm9k': choose from .*gsm8k"):
        evaluate.evaluate(tiny_config(tmp_path, tasks="gsm9k"))
    config = tiny_config(tmp_path, tasks="humaneval", checkpoint="base", baseline="")
    with pytest.raises(UserError,
                       match=r"no data path for humaneval: set --config.eval.paths.humaneval"):
        evaluate.evaluate(config)


def test_several_completions_of_one_id_are_its_samples_and_the_output_says_so(tmp_path, capsys):
    problems = tmp_path / "toy-humaneval.jsonl"
    problems.write_text("".join(json.dumps({
        "task_id": f"Toy/{i}", "prompt": "def add(a, b):\n    \"\"\"Sum.\"\"\"\n",
        "canonical_solution": "", "test": "def check(f):\n    assert f(2, 3) == 5\n",
        "entry_point": "add"}) + "\n" for i in range(2)))
    right, wrong = "    return a + b\n", "    return a - b\n"
    predictions = tmp_path / "predictions.jsonl"
    line = lambda i, c: json.dumps({"task": "humaneval", "id": i, "completion": c}) + "\n"
    predictions.write_text("".join(line(i, c)
                                   for i, c in [("Toy/0", wrong), ("Toy/0", right),
                                                ("Toy/1", right), ("Toy/1", right),
                                                ("Toy/9", right)]))
    config = tiny_config(tmp_path, tasks="humaneval", predictions=str(predictions), limit=0)
    config.eval.paths.humaneval = str(problems)
    numbers = evaluate.evaluate(config)["tasks"]["humaneval"]
    assert (numbers["examples"], numbers["accuracy"], numbers["pass@1"]) == (2, 0.5, 0.75)
    assert numbers["samples"] == {"min": 2, "max": 2} and numbers["ids_not_in_the_data"] == 1
    printed = capsys.readouterr().out
    assert "2 ids have several completions: each id is one example" in printed
    assert "ids not in the data: 1" in printed


@pytest.mark.slow
def test_evaluating_a_workdir_restores_the_params_alone(tmp_path, monkeypatch):
    from dasd_jax import step, train
    config = tiny_config(tmp_path, tasks="synthetic", checkpoint=str(tmp_path), baseline="")
    config.train.update(steps=3, warmup_steps=1, batch_size=8)
    config.checkpoint.export = False
    train.train(config)
    saved = ocp.StandardCheckpointer().metadata(tmp_path / "checkpoints" / "3" / "state")
    state_meta = jax.tree.leaves(saved.item_metadata.tree)

    def no_training_state(*args, **kwargs):
        raise AssertionError("evaluation built a TrainState")

    monkeypatch.setattr(step.StepSetup, "init_state", no_training_state)
    cfg, params, _ = evaluate.load_checkpoint(config, str(tmp_path), jax.sharding.Mesh(
        np.asarray(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor")))
    restored = sum(x.size for x in jax.tree.leaves(params))
    assert restored == cfg.num_params
    assert sum(np.prod(m.shape) for m in state_meta) > 2.9 * restored  # params + AdamW moments


def test_an_8b_workdir_is_evaluated_from_16_gib_of_bf16_params_without_reading_the_base(
        tmp_path, monkeypatch):
    """The memory plan of evaluating an 8B run (benchmarks/shapes/llama-3.1-8b): what is
    restored is the params in their shardings, nothing else, and the base weights are never
    loaded (the shape directory has none)."""
    from dasd_jax import checkpoint
    (tmp_path / "checkpoints").mkdir()
    config = tiny_config(tmp_path, checkpoint=str(tmp_path), baseline="")
    config.model.update(path=str(REPO / "benchmarks" / "shapes" / "llama-3.1-8b"),
                        param_dtype="bfloat16")
    asked = {}

    def restore_params(self, abstract, step=None):
        asked["bytes"] = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))
        return abstract

    monkeypatch.setattr(checkpoint.Checkpointer, "restore_params", restore_params)
    monkeypatch.setattr(hf, "load_tokenizer", lambda *args: None)
    cfg, _, _ = evaluate.load_checkpoint(config, str(tmp_path), sharding.make_mesh((1, -1, 1)))
    assert cfg.num_params > 8.0e9 and asked["bytes"] == 2 * cfg.num_params  # 16 GB, bf16
