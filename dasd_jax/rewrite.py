"""Stage 1: `python -m dasd_jax.rewrite --config=configs/math.py[:variant] [--config.a.b=value]`.

For each (prompt, reference) record the model writes its own response with the reference in its
context (the answer-aware prompt of `rewrite.template`): mode `sdft` decodes from that context
alone, mode `dasd` co-decodes with the plain-prompt base context (sampling.codecode). A rewrite is
kept when it finished, reaches the reference's final answer and leaks no template phrase;
otherwise the record falls back to the reference (`source = "reference"`, `fallback_reason`, and
the decoded text as `rejected_rewrite`, for inspection).

Each output line (`dasd_jax/rewrite_file.py`) holds the record, the response and its token ids
and, per response token, every signal of `dasd_jax/signals.py` (from co-decoding, or from
teacher-forced passes), so training reads the file as it is, and may skip its base forward
(`--config.train.base_confidence=cached`). Decoding runs `rewrite.batch_size` records at a time
with continuous batching (a finished record's rows take the next record at once); finished
records are judged and appended a batch at a time, in the order they finish, and synced;
re-running skips ids already written and repairs a line cut short by a crash.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import jax

from dasd_jax import (atomic, cli, data, loading, rewrite_file, sampling, sharding, signals, stages)
from dasd_jax.tasks import answers, registry

# ----------------------------------------------------------------------------- one batch


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
        ends = bool(result.tokens) and result.tokens[-1] in eos
        content = result.tokens[:-1] if ends else result.tokens
        text = tokenizer.decode(content, skip_special_tokens=True)
        reason = _judge(config.rewrite.task, record["prompt"], text, record["reference"],
                        result.finished)
        line = {"id": record["id"], "prompt": record["prompt"], "reference": record["reference"]}
        recorded = dict.fromkeys(signals.BY_NAME)  # None: for rewrite_file.fill_signals
        if reason is None:  # the decoding context is the reference's
            recorded.update(result.signals, ref_logprob=result.logprobs)
            line.update(response=text, response_ids=result.tokens, source="rewrite", **recorded)
        else:
            ids = data.response_tokens(record["prompt"], record["reference"], tokenizer,
                                       config.data)
            line.update(response=record["reference"], response_ids=ids, source="reference",
                        fallback_reason=reason, rejected_rewrite=text, **recorded)
        out.append(line)
    rewrite_file.fill_signals(config, cfg, params, out, [record for record, _ in batch])
    return out


# ----------------------------------------------------------------------------- the run


def _prepare(config, cfg, tokenizer, records: list[dict], skipped: Counter, skipped_ids: dict):
    """Records with both prompts tokenized; empty or over-long ones are counted and left out."""
    text = rewrite_file.template(config)
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


@stages.stage("rewrite")
def rewrite(config: Any) -> dict:
    """Rewrites every record not yet in the output; returns the summary."""
    mesh = sharding.make_mesh(config.mesh.shape)
    output_path = Path(config.rewrite.output)
    primary = jax.process_index() == 0
    rewrite_file.check_appendable(output_path, rewrite_file.fingerprint(config))  # fail fast
    records = data.load_records(
        config.rewrite.input, config.rewrite.split,
        config.rewrite.fields, target="reference",
        generated_examples=config.rewrite.generated_examples, seed=config.seed,
        fields_flag="--config.rewrite.fields")
    for index, record in enumerate(records):
        record["id"] = str(record.get("id", record.get("task_id", index)))
    if config.rewrite.limit:
        records = records[:config.rewrite.limit]
    cfg, params, tokenizer = loading.load_model(config, mesh)
    # Only now, with the records and the model loaded, does the output file appear.
    if primary:
        output = rewrite_file.OutputFile(output_path, rewrite_file.fingerprint(config))
    if jax.process_count() > 1:  # the others read what process 0 validated and repaired
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("rewrite output file ready")
    if not primary:
        output = rewrite_file.OutputFile(output_path, rewrite_file.fingerprint(config),
                                         writer=False)
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
    summary = rewrite_file.summarize(output.records(), skipped, skipped_ids)
    if primary:
        atomic.write_text(rewrite_file.summary_path(output.path),
                          json.dumps(summary, indent=2) + "\n")
        print(f"rewrote {summary['records']} records into {output.path}: "
              f"{summary['kept']} kept ({summary['acceptance_rate']:.1%}), fallbacks "
              f"{summary['fallback_reasons']}, skipped {dict(skipped)}")
    return summary


if __name__ == "__main__":
    cli.run(rewrite)
