"""Stages run as library calls, one workdir each: what the demo and the claims benchmarks share.

    stage = pipeline.stage_config(config, workdir / "sft", selection=dict(rule="all"))
    train.train(stage)
    pipeline.training_means(workdir / "sft")     # kept ratio etc., means over the whole run
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dasd_jax import atomic, run_config

LOGGED = ("kept_ratio", "kept_high_ppl", "aligned", "correction", "drift", "structural")


def stage_config(config: Any, workdir: Path, **sections: dict) -> Any:
    """A copy of `config` (frozen or not) for one stage, not yet resolved: its own workdir, no
    progress bar, and the given section overrides ({"train": {"steps": 10}, ...})."""
    stage = run_config.mutable(config)
    stage.workdir = str(workdir)
    stage.metrics.progress_bar = False
    for section, values in sections.items():
        stage[section].update(values)
    return stage


def write_jsonl(path: Path, records: list[dict]) -> Path:
    return atomic.write_text(path, "".join(json.dumps(record) + "\n" for record in records))


def training_means(run_dir: Path, names=LOGGED) -> dict[str, float]:
    """Means over a training run's logged windows (each the mean of its steps) of `names`."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if line.strip()]
    return {name: sum(line[name] for line in lines) / len(lines) for name in names
            if lines and all(name in line for line in lines)}
