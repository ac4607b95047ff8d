"""A rewrite file: what stage 1 writes and stages 2 and 3 read.

    output = rewrite_file.OutputFile(path, rewrite_file.fingerprint(config))  # not another's
    output.append(lines)                      # whole lines, synced; a crash loses only these
    rewrite_file.written_by(path, config)     # whether this model wrote it (cached base signals)
    rewrite_file.recorded_alpha(path)         # the co-decoding alpha it was written with

A line (JSON) holds `id, prompt, reference, response, response_ids, source` ("rewrite", or
"reference" for a fallback with its `fallback_reason` and `rejected_rewrite`) and, per response
token, every signal of `dasd_jax/signals.py` (`fill_signals` computes what decoding did not
record). Beside the file: `.meta.json`, the settings it belongs to (`fingerprint`; a different
config refuses to append), and `.summary.json`, `summarize`'s acceptance rate, fallback
reasons, mean candidate count and high-PPL ratios. Files from before the signals' names were
one read with today's names.
"""

from __future__ import annotations

import functools
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from dasd_jax import atomic, sampling, signals
from dasd_jax.errors import UserError
from dasd_jax.tasks import registry


def template(config: Any) -> str:
    """The answer-aware prompt: rewrite.template, or the rewrite family's (tasks.registry)."""
    return config.rewrite.template or registry.rewrite_family(config.rewrite.task).template


def fingerprint(config: Any) -> dict:
    """The settings that decide what a rewrite is; an output file belongs to one fingerprint."""
    rewrite = config.rewrite
    return {
        "model": config.model.path or {"random": config.model.random.to_dict(),
                                       "seed": config.seed},
        "input": rewrite.input, "split": rewrite.split, "fields": rewrite.fields.to_dict(),
        "task": rewrite.task, "template": template(config), "mode": rewrite.mode,
        # sure_reference joins the fingerprint only when set, so older files still match
        "sampling": {k: rewrite[k] for k in ("alpha", "candidate_top_k", "temperature", "top_k",
                                             "top_p", "min_p", "max_new_tokens")}
        | ({"sure_reference": rewrite.sure_reference} if rewrite.sure_reference < 1.0 else {}),
        "prompts": {k: config.data[k] for k in ("chat_template", "system_prompt", "prompt_format")},
    }


def meta_path(path: Path) -> Path:
    return path.with_name(path.name + ".meta.json")


def summary_path(path: Path) -> Path:
    """Where a finished rewrite into `path` writes its summary (`rewrite`'s return value)."""
    return path.with_name(path.name + ".summary.json")


def written_by(path: str | os.PathLike, config: Any) -> bool:
    """Whether the rewrite file at `path` was written by the model `config` loads (its
    .meta.json), so that the base signals it recorded are this model's."""
    meta = meta_path(Path(path).expanduser())
    try:
        recorded = json.loads(meta.read_text())["model"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return recorded == fingerprint(config)["model"]


def recorded_alpha(path: str | os.PathLike) -> float | None:
    """The co-decoding alpha a rewrite file was written with (its .meta.json), or None."""
    meta = meta_path(Path(path).expanduser())
    try:
        return float(json.loads(meta.read_text())["sampling"]["alpha"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_appendable(path: Path, settings: dict) -> bool:
    """Whether `path` already belongs to `settings` (True) or is new (False); UserError if it was
    written with other settings or its settings are unknown. Writes nothing."""
    meta = meta_path(path)
    if meta.exists():
        recorded = json.loads(meta.read_text())
        if recorded != settings:
            changed = sorted(k for k in settings.keys() | recorded.keys()
                             if settings.get(k) != recorded.get(k))
            raise UserError(
                f"{path} was written with other settings ({', '.join(changed)} differ); "
                "refusing to append. Choose another --config.rewrite.output, or delete the "
                "file and its .meta.json to start over")
        return True
    if path.exists() and path.stat().st_size:
        raise UserError(f"{path} exists without {meta.name}, so its settings are unknown; "
                        "refusing to append. Move it away or choose another "
                        "--config.rewrite.output")
    return False


class OutputFile:
    """Append-only JSONL of rewrites: whole lines only, synced per batch, one fingerprint.

    writer=False (processes other than 0 of a multi-host run): reads the ids done, never writes.
    """

    def __init__(self, path: Path, settings: dict, writer: bool = True):
        self.path, self.writer = path, writer
        self.meta_path = meta_path(path)
        if not check_appendable(path, settings):
            if not writer:
                raise UserError(f"{self.meta_path} is missing: process 0 did not create it")
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic.write_text(self.meta_path, json.dumps(settings, indent=2) + "\n")
        self.done_ids = set(record["id"] for record in self._repair_and_read())

    def _repair_and_read(self) -> list[dict]:
        if not self.path.exists():
            return []
        raw = self.path.read_bytes()
        keep = raw[:raw.rfind(b"\n") + 1]  # a crash can only cut the last line short
        if len(keep) != len(raw) and self.writer:
            with open(self.path, "r+b") as file:
                file.truncate(len(keep))
        return [{signals.canonical_key(key): value for key, value in json.loads(line).items()}
                for line in keep.decode("utf-8").splitlines() if line.strip()]

    def records(self) -> list[dict]:
        return self._repair_and_read()

    def append(self, records: list[dict]) -> None:
        if not records:
            return
        text = "".join(json.dumps(record) + "\n" for record in records)
        before = self.path.stat().st_size if self.path.exists() else 0
        try:
            with open(self.path, "a", encoding="utf-8") as file:
                file.write(text)
                file.flush()
                os.fsync(file.fileno())
        except OSError:
            with open(self.path, "r+b") as file:  # whole lines only: drop what part got written
                file.truncate(before)
            raise
        self.done_ids.update(record["id"] for record in records)


def fill_signals(config, cfg, params, lines: list[dict], prompts: list[dict]) -> None:
    """Fills the trained signals a line lacks (None: sdft rewrites and fallbacks, what decoding
    did not record) from teacher-forced passes over its response_ids: first in the base context
    (`prompts[i]["base_prompt"]`: log π0, max π0, and v0 = argmax π0, what the base would have
    written), then in the answer-aware one (`reference_prompt`, if any: log πref, log πref(v0),
    log max πref). Passes of rewrite.batch_size rows, fewer where the longest bucket would make
    a pass hold more than sampling.SCORE_TOKENS tokens; one compile per length bucket."""
    buckets = sorted({b + config.data.max_seq_len for b in config.rewrite.prompt_buckets})
    rows = sampling.scoring_rows(config.rewrite.batch_size, max(buckets))
    score = functools.partial(sampling.score_stats, cfg, params, buckets=buckets, batch_size=rows)
    base_rows = [i for i, line in enumerate(lines) if line["base_logprob"] is None
                 or line["ref_logprob_base_choice"] is None]
    choices = {}
    for i, found in zip(base_rows, score(
            [prompts[i]["base_prompt"] for i in base_rows],
            [lines[i]["response_ids"] for i in base_rows], ("logprob", "top1", "argmax"))):
        choices[i] = found["argmax"]
        if lines[i]["base_logprob"] is None:
            lines[i]["base_logprob"] = found["logprob"].tolist()
            lines[i]["base_top1"] = found["top1"].tolist()
    ref_rows = [i for i in base_rows if lines[i]["ref_logprob_base_choice"] is None
                and prompts[i].get("reference_prompt")]
    for i, found in zip(ref_rows, score(
            [prompts[i]["reference_prompt"] for i in ref_rows],
            [lines[i]["response_ids"] for i in ref_rows],
            ("logprob", "top1_logprob", "query_logprob"),
            queries=[choices[i] for i in ref_rows])):
        if lines[i]["ref_logprob"] is None:
            lines[i]["ref_logprob"] = found["logprob"].tolist()
        lines[i]["ref_logprob_base_choice"] = found["query_logprob"].tolist()
        lines[i]["ref_top1"] = found["top1_logprob"].tolist()


def summarize(records: list[dict], skipped: Counter, skipped_ids: dict) -> dict:
    """Acceptance, fallback reasons, mean |C_t| and high-PPL ratios of the kept responses."""
    kept = [r for r in records if r["source"] == "rewrite"]
    base = np.concatenate([np.asarray(r["base_logprob"], np.float32) for r in kept]
                          or [np.zeros(0)])
    candidates = [n for r in kept for n in (r.get("n_candidates") or [])]
    return {
        "records": len(records),
        "kept": len(kept),
        "acceptance_rate": len(kept) / max(len(records), 1),
        "fallback_reasons": dict(Counter(r["fallback_reason"] for r in records
                                         if r["source"] == "reference")),
        "mean_n_candidates": float(np.mean(candidates)) if candidates else None,
        "kept_tokens": int(base.size),
        "kept_high_ppl_10": float(np.mean(base < np.log(0.1))) if base.size else None,
        "kept_high_ppl_100": float(np.mean(base < np.log(0.01))) if base.size else None,
        "skipped_this_run": dict(skipped),
        "skipped_ids": {reason: ids[:50] for reason, ids in skipped_ids.items()},
    }
