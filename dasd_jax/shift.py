"""How far a fine-tuned model has moved from its base: the base's own distribution, on text the
base writes itself, away from the task it was tuned on (`eval.shift`).

    answers = shift.base_answers(config, base_cfg, base_params, tokenizer)  # cached per base
    report = shift.measure(config, (base_cfg, base_params), (tuned_cfg, tuned_params), answers)
    # {"humaneval": {"kl": 0.021, "kl_se": 0.003, "delta_nll": ..., "top1_changed": ...}, ...}

1. Held-out prompts: the first `eval.shift.limit` items of each task in `eval.shift.tasks` (any
   registered task: its prompt; a multiple-choice task's question), in the run's prompt format.
2. The base's own greedy answers (`eval.shift.max_new_tokens` at most), generated once and kept
   in `eval.shift.cache` under the base's fingerprint: its weights, tokenizer, the prompts and
   the settings. Another base, or other prompts, never reads them.
3. Teacher-forced on prompt + answer, per answer token: KL(π_base || π_tuned), the change in the
   answer token's NLL (tuned − base) and whether the base's top-1 token is still the tuned
   model's. Each prompt's means over its tokens; per task the mean over prompts and its standard
   error (std / sqrt(n)).
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dasd_jax import atomic, data, losses, model, sampling, sharding
from dasd_jax.errors import UserError
from dasd_jax.tasks import registry

MEASURES = ("kl", "delta_nll", "top1_changed")


# ----------------------------------------------------------------------------- the prompts


def prompts(config: Any) -> list[dict]:
    """[{"task", "id", "prompt"}] of every task in eval.shift.tasks, eval.shift.limit each."""
    out = []
    for task in [t.strip() for t in config.eval.shift.tasks.split(",") if t.strip()]:
        spec = registry.eval_task(task)
        path = config.eval.paths.get(task, "") or ""
        if not path and spec.needs_path:
            raise UserError(f"--config.eval.shift.tasks names {task}, which has no data: set "
                            f"--config.eval.paths.{task}=PATH")
        items = spec.load(path, config.eval.split, config.eval.shift.limit, config.seed)
        for item in items:
            text = spec.prompt(item) if spec.prompt else item["pairs"][0][0]
            out.append({"task": task, "id": str(item["id"]), "prompt": text})
    return out


# ----------------------------------------------------------------------------- the base's answers


def fingerprint(config: Any, params, tokenizer, items: list[dict]) -> str:
    """A hash of what decides the base's answers: its weights (the checkpoint's files, or the
    params of a random model), its tokenizer, the prompts and the decoding settings."""
    digest = hashlib.sha256()
    directory = Path(config.model.path).expanduser() if config.model.path else None
    if directory is not None and directory.is_dir():
        for file in sorted(directory.iterdir()):
            if file.is_file():
                digest.update(file.name.encode())
                with open(file, "rb") as handle:
                    for block in iter(lambda: handle.read(1 << 24), b""):
                        digest.update(block)
    else:
        for leaf in jax.tree.leaves(sharding.to_host(params)):
            digest.update(np.ascontiguousarray(leaf).tobytes())
        digest.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    settings = {"prompts": items, "max_new_tokens": config.eval.shift.max_new_tokens,
                "format": {k: config.data[k] for k in ("chat_template", "system_prompt",
                                                       "prompt_format")}}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()[:24]


def base_answers(config: Any, cfg: model.ModelConfig, params, tokenizer) -> list[dict]:
    """The held-out prompts with the base's greedy answer ids ("prompt_ids", "answer_ids"), from
    the cache when this base answered them before, else generated and cached."""
    items = prompts(config)
    cache = (Path(config.eval.shift.cache).expanduser()
             / f"base_answers_{fingerprint(config, params, tokenizer, items)}.jsonl")
    if cache.is_file():
        return [json.loads(line) for line in cache.read_text().splitlines() if line.strip()]
    settings = sampling.Settings(max_new_tokens=config.eval.shift.max_new_tokens,
                                 eos_ids=sampling.stop_ids(cfg, tokenizer),
                                 prompt_buckets=tuple(config.eval.prompt_buckets))
    ids = [data.prompt_tokens(item["prompt"], tokenizer, config.data) for item in items]
    decoded = sampling.generate_all(cfg, params, ids, settings, config.eval.batch_size)
    answered = [dict(item, prompt_ids=prompt, answer_ids=result.tokens)
                for item, prompt, result in zip(items, ids, decoded) if result.tokens]
    if jax.process_index() == 0:
        atomic.write_text(cache, "".join(json.dumps(line) + "\n" for line in answered))
    return answered


# ----------------------------------------------------------------------------- the measure


@functools.partial(jax.jit, static_argnums=(0, 2, 5))
def _token_shift(base_cfg, base_params, tuned_cfg, tuned_params, tokens, chunk):
    """The per-position `losses.distribution_shift` of both models on tokens int32[B, T]: the
    distribution before each next token."""
    targets = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
    return losses.distribution_shift(
        model.hidden_states(base_cfg, base_params, tokens),
        model.output_embedding(base_cfg, base_params),
        model.hidden_states(tuned_cfg, tuned_params, tokens),
        model.output_embedding(tuned_cfg, tuned_params), targets, chunk=chunk)


def per_prompt(config: Any, base: tuple, tuned: tuple, answered: list[dict]) -> list[dict]:
    """Per prompt, the means over its answer tokens of every measure (and its token count).
    base, tuned: (ModelConfig, params) of the two models, on one tokenizer."""
    size = config.eval.batch_size
    buckets = sorted({b + config.eval.shift.max_new_tokens for b in config.eval.prompt_buckets})
    out = []
    for start in range(0, len(answered), size):
        rows = answered[start:start + size]
        sequences = [row["prompt_ids"] + row["answer_ids"] for row in rows]
        length = sampling.prompt_bucket(max(map(len, sequences)), buckets)
        tokens, _ = sampling.right_pad(sequences + [sequences[0]] * (size - len(rows)), length)
        found = sharding.to_host(_token_shift(base[0], base[1], tuned[0], tuned[1], tokens,
                                              sampling.SCORE_CHUNK))
        for index, row in enumerate(rows):
            span = slice(len(row["prompt_ids"]) - 1,
                         len(row["prompt_ids"]) - 1 + len(row["answer_ids"]))
            values = {name: found[name][index, span] for name in losses.SHIFT_STATS}
            out.append({"task": row["task"], "id": row["id"], "tokens": len(row["answer_ids"]),
                        "kl": float(np.mean(values["kl"])),
                        "delta_nll": float(np.mean(values["logprob_base"]
                                                   - values["logprob_tuned"])),
                        "top1_changed": float(1.0 - np.mean(values["top1_kept"]))})
    return out


def summarize(lines: list[dict]) -> dict:
    """Per task: each measure's mean over prompts and its standard error, prompts and tokens."""
    out = {}
    for task in dict.fromkeys(line["task"] for line in lines):
        rows = [line for line in lines if line["task"] == task]
        summary = {"prompts": len(rows), "tokens": sum(row["tokens"] for row in rows)}
        for name in MEASURES:
            values = np.asarray([row[name] for row in rows])
            summary[name] = float(values.mean())
            summary[f"{name}_se"] = (float(values.std(ddof=1) / np.sqrt(len(values)))
                                     if len(values) > 1 else None)
        out[task] = summary
    return out


def measure(config: Any, base: tuple, tuned: tuple, answered: list[dict]) -> tuple[list, dict]:
    """(per-prompt lines, per-task summary) of how far `tuned` lies from `base`."""
    lines = per_prompt(config, base, tuned, answered)
    return lines, summarize(lines)


def enabled(config: Any) -> bool:
    return bool(config.eval.shift.tasks.strip())
