"""Stage 1: `python -m dasd_jax.rewrite --config=configs/math.py[:variant] [--config.a.b=value]`.

For each (prompt, reference) record the model writes its own response with the reference in its
context (the answer-aware prompt of `rewrite.template`): mode `sdft` decodes from that context
alone, mode `dasd` co-decodes with the plain-prompt base context (sampling.codecode). A rewrite is
kept when it finished, reaches the reference's final answer and leaks no template phrase;
otherwise the record falls back to the reference (`source = "reference"`, `fallback_reason`, and
the decoded text as `rejected_rewrite`, for inspection).

Each output line holds `id, prompt, reference, response, response_ids, source, ref_logprobs,
base_logprobs, base_top1, ref_logprob_base_choice, ref_top1, n_candidates`: per response token,
log πref, log π0, max π0, log πref(v0) (v0 = argmax π0, what the base would have written) and
log max πref (from co-decoding, or from teacher-forced passes), so training reads the file as it
is, and may skip its base forward (`--config.train.base_confidence=cached`). Decoding runs
`rewrite.batch_size` records at a time with continuous batching (a finished record's rows take
the next record at once); finished records are judged and appended a batch at a time, in the
order they finish, and synced; re-running skips ids already written and repairs a line cut
short by a crash. A sidecar `.meta.json` records the settings: a different config refuses to
append. A summary JSON (`.summary.json`) holds the acceptance rate, fallback reasons, mean n_candidates and the
high-PPL ratio of the kept responses.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import jax
import numpy as np

from dasd_jax import atomic, data, fit_check, host_memory, sampling, sharding, stages
from dasd_jax.errors import UserError
from dasd_jax.tasks import answers, registry

MODES = ("sdft", "dasd")


# ----------------------------------------------------------------------------- the output file


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
        return [json.loads(line) for line in keep.decode("utf-8").splitlines() if line.strip()]

    def records(self) -> list[dict]:
        return self._repair_and_read()

    def append(self, records: list[dict]) -> None:
        if not records:
            return
        text = "".join(json.dumps(record) + "\n" for record in records)
        with open(self.path, "a", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        self.done_ids.update(record["id"] for record in records)


# ----------------------------------------------------------------------------- one batch


def template(config: Any) -> str:
    """The answer-aware prompt: rewrite.template, or the rewrite family's (tasks.registry)."""
    text = config.rewrite.template or registry.rewrite_family(config.rewrite.task).template
    if "{prompt}" not in text or "{reference}" not in text:
        raise UserError("--config.rewrite.template must contain {prompt} and {reference}")
    return text


def settings_from(config: Any, cfg, tokenizer) -> sampling.Settings:
    """Decoding settings; decoding stops at any end-of-sequence id of the model's configs or its
    tokenizer."""
    rewrite = config.rewrite
    return sampling.Settings(
        max_new_tokens=rewrite.max_new_tokens, temperature=rewrite.temperature,
        top_k=rewrite.top_k, top_p=rewrite.top_p, min_p=rewrite.min_p,
        eos_ids=sampling.stop_ids(cfg, tokenizer),
        alpha=rewrite.alpha, candidate_top_k=rewrite.candidate_top_k,
        sure_reference=rewrite.sure_reference, prompt_buckets=tuple(rewrite.prompt_buckets),
    )


def _judge(task: str, prompt: str, text: str, reference: str, finished: bool) -> str | None:
    """Why a rewrite falls back to the reference, or None when it is kept: unfinished, empty,
    a template leak, or what the task family's acceptance check says (e.g. wrong_answer)."""
    if not finished:
        return "unfinished"
    if not text.strip():
        return "empty"
    if answers.leaked_phrase(text):
        return "template_leak"
    return registry.rewrite_family(task).accept(prompt, text, reference)


def decoded_stream(config, cfg, params, tokenizer, records: list[dict],
                   rng) -> Iterator[tuple[dict, sampling.Decoded]]:
    """(record, its decoded rewrite) for every record (with its two tokenized prompts), as each
    finishes: `rewrite.batch_size` at a time with continuous batching."""
    settings = settings_from(config, cfg, tokenizer)
    size = config.rewrite.batch_size
    references = [r["reference_prompt"] for r in records]
    if config.rewrite.mode == "dasd":
        stream = sampling.codecode_all(cfg, params, references,
                                       [r["base_prompt"] for r in records], settings, size, rng)
    else:
        stream = sampling.decode_all(cfg, params, [[p] for p in references], settings, size,
                                     "plain", rng)
    for index, result in stream:
        yield records[index], result


def finish_lines(config, cfg, params, tokenizer, batch: list[tuple[dict, sampling.Decoded]]
                 ) -> list[dict]:
    """Output lines of decoded records: judged (kept, or fallen back to the reference) and
    completed with the teacher-forced signals decoding did not record."""
    eos = set(settings_from(config, cfg, tokenizer).eos_ids)
    out = []
    for record, result in batch:
        content = result.tokens[:-1] if result.tokens and result.tokens[-1] in eos else result.tokens
        text = tokenizer.decode(content, skip_special_tokens=True)
        reason = _judge(config.rewrite.task, record["prompt"], text, record["reference"],
                        result.finished)
        line = {"id": record["id"], "prompt": record["prompt"], "reference": record["reference"]}
        if reason is None:
            line.update(response=text, response_ids=result.tokens, source="rewrite",
                        **{key: getattr(result, field) for key, field in DECODED_SIGNALS.items()})
        else:
            ids = data.response_tokens(record["prompt"], record["reference"], tokenizer,
                                       config.data)
            line.update(response=record["reference"], response_ids=ids, source="reference",
                        fallback_reason=reason, rejected_rewrite=text,
                        **{key: None for key in DECODED_SIGNALS})
        out.append(line)
    teacher_forced_signals(config, cfg, params, out, [record for record, _ in batch])
    return out


# record key -> sampling.Decoded field, for what decoding records itself
DECODED_SIGNALS = {"ref_logprobs": "logprobs", "base_logprobs": "base_logprobs",
                   "base_top1": "base_top1", "n_candidates": "n_candidates",
                   "ref_logprob_base_choice": "ref_logprob_base_choice", "ref_top1": "ref_top1"}


def teacher_forced_signals(config, cfg, params, lines: list[dict], prompts: list[dict]) -> None:
    """Fills the signals a line lacks (sdft rewrites and fallbacks: what decoding did not
    record) from teacher-forced passes over its response_ids: first in the base context
    (`prompts[i]["base_prompt"]`: log π0, max π0, and v0 = argmax π0, what the base would have
    written), then in the answer-aware one (`reference_prompt`, if any: log πref, log πref(v0),
    log max πref). Passes of rewrite.batch_size rows, fewer where the longest bucket would make
    a pass hold more than sampling.SCORE_TOKENS tokens; one compile per length bucket."""
    buckets = sorted({b + config.data.max_seq_len for b in config.rewrite.prompt_buckets})
    rows = sampling.scoring_rows(config.rewrite.batch_size, max(buckets))
    score = functools.partial(sampling.score_stats, cfg, params, buckets=buckets, batch_size=rows)
    base_rows = [i for i, line in enumerate(lines) if line["base_logprobs"] is None
                 or line["ref_logprob_base_choice"] is None]
    choices = {}
    for i, found in zip(base_rows, score(
            [prompts[i]["base_prompt"] for i in base_rows],
            [lines[i]["response_ids"] for i in base_rows], ("logprob", "top1", "argmax"))):
        choices[i] = found["argmax"]
        if lines[i]["base_logprobs"] is None:
            lines[i]["base_logprobs"] = found["logprob"].tolist()
            lines[i]["base_top1"] = found["top1"].tolist()
    ref_rows = [i for i in base_rows if lines[i]["ref_logprob_base_choice"] is None
                and prompts[i].get("reference_prompt")]
    for i, found in zip(ref_rows, score(
            [prompts[i]["reference_prompt"] for i in ref_rows],
            [lines[i]["response_ids"] for i in ref_rows],
            ("logprob", "top1_logprob", "query_logprob"),
            queries=[choices[i] for i in ref_rows])):
        if lines[i]["ref_logprobs"] is None:
            lines[i]["ref_logprobs"] = found["logprob"].tolist()
        lines[i]["ref_logprob_base_choice"] = found["query_logprob"].tolist()
        lines[i]["ref_top1"] = found["top1_logprob"].tolist()


# ----------------------------------------------------------------------------- the run


def _prepare(config, cfg, tokenizer, records: list[dict], skipped: Counter, skipped_ids: dict):
    """Records with both prompts tokenized; empty or over-long ones are counted and left out."""
    text = template(config)
    longest = max(config.rewrite.prompt_buckets)
    window = cfg.max_position_embeddings - config.rewrite.max_new_tokens
    ready = []
    for record in records:
        if not record["reference"].strip():
            reason = "empty_reference"
        else:
            record["base_prompt"] = data.prompt_tokens(record["prompt"], tokenizer, config.data)
            record["reference_prompt"] = data.prompt_tokens(
                text.format(prompt=record["prompt"], reference=record["reference"]), tokenizer,
                config.data)
            too_long = max(len(record["reference_prompt"]), len(record["base_prompt"]))
            reason = "prompt_too_long" if too_long > min(longest, window) else None
        if reason:
            skipped[reason] += 1
            skipped_ids.setdefault(reason, []).append(record["id"])
        else:
            ready.append(record)
    return ready


def summarize(records: list[dict], skipped: Counter, skipped_ids: dict) -> dict:
    """Acceptance, fallback reasons, mean |C_t| and high-PPL ratios of the kept responses."""
    kept = [r for r in records if r["source"] == "rewrite"]
    base = np.concatenate([np.asarray(r["base_logprobs"], np.float32) for r in kept] or [np.zeros(0)])
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


@host_memory.released
def rewrite(config: Any) -> dict:
    """Rewrites every record not yet in the output; returns the summary."""
    config = stages.finalize(config)
    if config.dry_run:  # the whole pipeline's programs, compiled for compile_for
        return fit_check.check(config)
    if not config.workdir:
        raise UserError("--config.workdir is required (the output path may use {workdir})")
    if config.rewrite.mode not in MODES:
        raise UserError(f"--config.rewrite.mode={config.rewrite.mode!r} is not one of "
                        f"{', '.join(MODES)}")
    if not config.rewrite.input:
        raise UserError("--config.rewrite.input is required: the (prompt, reference) records")
    mesh = sharding.make_mesh(config.mesh.shape)
    output_path = Path(config.rewrite.output)
    primary = jax.process_index() == 0
    check_appendable(output_path, fingerprint(config))  # fail fast, before loading anything
    records = data.load_records(
        config.rewrite.input, config.rewrite.split,
        config.rewrite.fields, target="reference",
        generated_examples=config.rewrite.generated_examples, seed=config.seed,
        fields_flag="--config.rewrite.fields")
    for index, record in enumerate(records):
        record["id"] = str(record.get("id", record.get("task_id", index)))
    if config.rewrite.limit:
        records = records[:config.rewrite.limit]
    cfg, params, tokenizer = stages.load_model(config, mesh)
    # Only now, with the records and the model loaded, does the output file appear.
    if primary:
        output = OutputFile(output_path, fingerprint(config))
    if jax.process_count() > 1:  # the others read what process 0 validated and repaired
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("rewrite output file ready")
    if not primary:
        output = OutputFile(output_path, fingerprint(config), writer=False)
    todo = [r for r in records if r["id"] not in output.done_ids]
    skipped, skipped_ids = Counter(), {}
    todo = _prepare(config, cfg, tokenizer, todo, skipped, skipped_ids)

    from tqdm import tqdm

    progress = tqdm(total=len(todo), unit="example", disable=not primary, desc="rewrite")
    rng = jax.random.PRNGKey(config.seed)
    tokens = kept = done = 0
    started = time.perf_counter()
    finished: list[tuple[dict, sampling.Decoded]] = []

    def flush():
        nonlocal kept, done
        lines = finish_lines(config, cfg, params, tokenizer, finished)
        if primary:
            output.append(lines)  # whole lines, synced: a crash loses only this batch
        kept += sum(line["source"] == "rewrite" for line in lines)
        done += len(lines)
        progress.update(len(lines))
        progress.set_postfix(tok_s=f"{tokens / (time.perf_counter() - started):,.0f}",
                             accepted=f"{kept / done:.2f}")
        finished.clear()

    with sharding.activation_rules(mesh, config.mesh.rules):
        for record, result in decoded_stream(config, cfg, params, tokenizer, todo, rng):
            finished.append((record, result))
            tokens += len(result.tokens)
            if len(finished) == config.rewrite.batch_size:
                flush()
        if finished:
            flush()
    progress.close()
    summary = summarize(output.records(), skipped, skipped_ids)
    if primary:
        atomic.write_text(summary_path(output.path), json.dumps(summary, indent=2) + "\n")
        print(f"rewrote {summary['records']} records into {output.path}: "
              f"{summary['kept']} kept ({summary['acceptance_rate']:.1%}), fallbacks "
              f"{summary['fallback_reasons']}, skipped {dict(skipped)}")
    return summary


if __name__ == "__main__":
    stages.run(rewrite)
