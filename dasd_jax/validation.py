"""Every config rule, checked in this one place before any work starts: one line naming the flag
and the fix.

    validation.validate(config)              # raises UserError("--config.train.learning_rate=...")
    validation.validate(config, "train")     # and what the train stage needs (a workdir, data)

`FIELDS` maps each dotted field name to a rule on its value; `_check_relations` holds the rules
on several fields together and `STAGE_NEEDS` what a stage cannot run without. A field the config
lacks is skipped (task configs may leave sections out). `run_config.resolve` runs this first, so
the stages and the step they build assume a valid config and check nothing again.
"""

from __future__ import annotations

from typing import Any, Callable

from dasd_jax import data, model, selection, targets
from dasd_jax.errors import UserError
from dasd_jax.tasks import registry, scoring

DTYPES = ("float32", "bfloat16", "float16")
REWRITE_MODES = ("sdft", "dasd")
Rule = Callable[[Any], str | None]  # value -> what is wrong with it, or None


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def at_least(low, integer: bool = False) -> Rule:
    def rule(value):
        if not (_integer(value) if integer else _number(value)):
            return f"must be {'an integer' if integer else 'a number'}"
        return None if value >= low else f"must be >= {low}"
    return rule


def above(low) -> Rule:
    def rule(value):
        return None if _number(value) and value > low else f"must be a number > {low}"
    return rule


def within(low, high, *, low_open: bool = False, high_open: bool = False) -> Rule:
    def rule(value):
        inside = _number(value) and (value > low if low_open else value >= low) and (
            value < high if high_open else value <= high)
        return None if inside else (f"must lie in {'(' if low_open else '['}{low}, {high}"
                                    f"{')' if high_open else ']'}")
    return rule


def optional(rule: Rule) -> Rule:
    return lambda value: None if value is None else rule(value)


def one_of(*choices) -> Rule:
    return lambda value: None if value in choices else f"choose from {', '.join(map(str, choices))}"


def boolean(value) -> str | None:
    return None if isinstance(value, bool) else "must be True or False"


def text(value) -> str | None:
    return None if isinstance(value, str) else "must be a string"


def buckets(value) -> str | None:
    lengths = tuple(value) if isinstance(value, (tuple, list)) else ()
    if not lengths or not all(_integer(n) and n > 0 for n in lengths):
        return "must be a non-empty tuple of positive lengths, e.g. (256, 512, 1024)"
    return None


def mesh_shape(value) -> str | None:
    sizes = tuple(value) if isinstance(value, (tuple, list)) else ()
    if (len(sizes) != 3 or not all(_integer(n) and (n >= 1 or n == -1) for n in sizes)
            or sizes.count(-1) > 1):
        return "must be 3 sizes (data, fsdp, tensor), each >= 1 or one of them -1, e.g. (1, -1, 1)"
    return None


POSITIVE, COUNT = at_least(1, integer=True), at_least(0, integer=True)
PROBABILITY = within(0.0, 1.0)
FIELDS: dict[str, Rule] = {
    "seed": at_least(0, integer=True), "dry_run": boolean, "workdir": text,
    "distributed.num_processes": COUNT, "distributed.initialization_timeout": POSITIVE,
    "model.path": text, "model.param_dtype": one_of(*DTYPES),
    "model.compute_dtype": one_of(*DTYPES), "model.remat_policy": one_of(*model.REMAT_POLICIES),
    "model.attention_impl": one_of(*model.ATTENTION_IMPLS), "compile_for": text,
    "model.platform": one_of("auto", *targets.PLATFORMS),
    "model.random_tokenizer": one_of("characters", *registry.names("tokenizers")),
    "mesh.shape": mesh_shape,
    "data.split": text, "data.eval_path": text, "data.target": one_of(*data.TARGETS),
    "data.eval_target": one_of(*data.TARGETS), "data.generated_examples": POSITIVE,
    "data.generated_eval_examples": POSITIVE, "data.max_seq_len": POSITIVE,
    "data.buckets": buckets, "data.overlong": one_of(*data.OVERLONG),
    "data.group_by_length": POSITIVE, "data.chat_template": boolean,
    "rewrite.mode": one_of(*REWRITE_MODES),
    "rewrite.task": one_of(*registry.rewrite_families()),
    "rewrite.alpha": within(0.0, 1.0, low_open=True),
    "rewrite.candidate_top_k": COUNT, "rewrite.sure_reference": within(0.0, 1.0, low_open=True),
    "rewrite.temperature": at_least(0.0),
    "rewrite.top_k": COUNT, "rewrite.top_p": within(0.0, 1.0, low_open=True),
    "rewrite.min_p": within(0.0, 1.0, high_open=True), "rewrite.max_new_tokens": POSITIVE,
    "rewrite.batch_size": POSITIVE, "rewrite.prompt_buckets": buckets, "rewrite.limit": COUNT,
    "rewrite.generated_examples": POSITIVE,
    "train.steps": POSITIVE, "train.batch_size": POSITIVE, "train.micro_batches": POSITIVE,
    "train.log_every": POSITIVE, "train.eval_every": COUNT, "train.eval_batches": POSITIVE,
    "train.learning_rate": above(0.0), "train.warmup_steps": COUNT,
    "train.end_lr_ratio": PROBABILITY, "train.weight_decay": at_least(0.0),
    "train.b1": within(0.0, 1.0, high_open=True), "train.b2": within(0.0, 1.0, high_open=True),
    "train.eps": above(0.0), "train.grad_clip": above(0.0),
    "train.loss_normalization": one_of("selected", "response"), "train.loss_chunk": COUNT,
    "train.base_dtype": one_of(*DTYPES), "train.base_confidence": one_of("auto", "model", "cached"),
    "lora.rank": COUNT, "lora.alpha": above(0.0), "lora.dropout": within(0.0, 1.0, high_open=True),
    "lora.export_adapters": boolean,
    "selection.rule": one_of(*selection.RULES), "selection.tau": PROBABILITY,
    "selection.tau_quantile": optional(PROBABILITY),
    "selection.tau_min": PROBABILITY, "selection.tau_max": PROBABILITY,
    "selection.kappa": PROBABILITY, "selection.gamma": PROBABILITY,
    "selection.correction_test": one_of(*selection.CORRECTION_TESTS),
    "selection.rho": optional(within(0.0, 1.0, low_open=True)),
    "selection.fallback": one_of(*selection.FALLBACKS), "selection.keep_structural": boolean,
    "selection.confidence_model": one_of("base", "current"),
    "selection.rho1_keep": within(0.0, 1.0, low_open=True),
    "selection.missing_ref": one_of("drop", "keep"),
    "eval.limit": COUNT, "eval.batch_size": POSITIVE, "eval.max_new_tokens": POSITIVE,
    "eval.temperature": at_least(0.0), "eval.top_p": within(0.0, 1.0, low_open=True),
    "eval.samples": POSITIVE, "eval.prompt_buckets": buckets,
    "eval.bos": one_of(*scoring.BOS_MODES), "eval.shift.tasks": text, "eval.task_modules": text,
    "eval.shift.limit": COUNT, "eval.shift.max_new_tokens": POSITIVE,
    "analyze.limit": COUNT, "analyze.examples": COUNT,
    "demo.pretrain_examples": POSITIVE, "demo.pretrain_steps": POSITIVE,
    "demo.pretrain_batch_size": POSITIVE, "demo.pretrain_learning_rate": above(0.0),
    "demo.finetune_examples": POSITIVE, "demo.finetune_steps": POSITIVE,
    "demo.finetune_learning_rate": above(0.0), "demo.eval_examples": POSITIVE,
    "checkpoint.every": POSITIVE, "checkpoint.max_to_keep": POSITIVE,
    "checkpoint.resume_step": COUNT,
    "checkpoint.async_save": boolean, "checkpoint.export": boolean,
    "checkpoint.export_dtype": one_of(*DTYPES),
    "metrics.tensorboard": boolean, "metrics.progress_bar": boolean,
}


_MISSING = object()


def _lookup(config: Any, dotted: str):
    node = config
    for part in dotted.split("."):
        if not hasattr(node, "keys") or part not in node:
            return _MISSING
        node = node[part]
    return node


def validate(config: Any, stage: str | None = None) -> None:
    """Raises UserError for the first field whose value makes no sense, naming flag and fix;
    with a `stage` (train, rewrite, evaluate, analyze), also for what it needs and lacks."""
    for dotted, rule in FIELDS.items():
        value = _lookup(config, dotted)
        if value is _MISSING:
            continue
        problem = rule(value)
        if problem:
            raise UserError(f"--config.{dotted}={value!r}: {problem}")
    _check_relations(config)
    require(config, stage)


def require(config: Any, stage: str | None) -> None:
    """UserError for the first field `stage` needs and lacks (none for a dry run)."""
    if stage is not None and _lookup(config, "dry_run") is not True:
        for dotted, message in STAGE_NEEDS[stage]:
            if not _lookup(config, dotted):
                raise UserError(f"--config.{dotted} is required: {message}")


STAGE_NEEDS = {  # stage -> the fields it cannot run without (unless a dry run), and what they are
    "train": (("workdir", "where checkpoints, metrics.jsonl and the HF export go"),
              ("data.path", f"the training records: {data.PATH_FORMS}")),
    "rewrite": (("workdir", "the output path may use {workdir}"),
                ("rewrite.input", "the (prompt, reference) records")),
    "evaluate": (("workdir", "paths may use {workdir}"),),
    "analyze": (("workdir", "paths may use {workdir}"),),
}


def _check_relations(config: Any) -> None:
    """Fields that make sense only together."""
    train, selection = _lookup(config, "train"), _lookup(config, "selection")
    if train is not _MISSING and train.warmup_steps >= train.steps:
        raise UserError(f"--config.train.warmup_steps={train.warmup_steps} must be below "
                        f"--config.train.steps={train.steps}")
    if train is not _MISSING and train.batch_size % train.micro_batches:
        raise UserError(f"--config.train.batch_size={train.batch_size} is not divisible by "
                        f"--config.train.micro_batches={train.micro_batches}")
    if selection is not _MISSING and selection.tau_min > selection.tau_max:
        raise UserError(f"--config.selection.tau_min={selection.tau_min} must not exceed "
                        f"--config.selection.tau_max={selection.tau_max}")
    data = _lookup(config, "data")
    if data is not _MISSING and max(data.buckets) < data.max_seq_len:
        raise UserError(f"--config.data.buckets {tuple(data.buckets)} must include a length "
                        f">= --config.data.max_seq_len={data.max_seq_len}")
    if data is not _MISSING:
        try:
            data.prompt_format.format(prompt="")
        except (KeyError, IndexError, ValueError) as error:
            raise UserError(f"--config.data.prompt_format={data.prompt_format!r}: "
                            f"{type(error).__name__}: {error}; it must contain {{prompt}} and "
                            "write other braces as {{ and }}") from None
    rewrite = _lookup(config, "rewrite")
    if rewrite is not _MISSING and rewrite.template and not (
            "{prompt}" in rewrite.template and "{reference}" in rewrite.template):
        raise UserError("--config.rewrite.template must contain {prompt} and {reference}")
    lora = _lookup(config, "lora")
    if lora is not _MISSING:
        _check_lora(lora)


def _check_lora(lora: Any) -> None:
    targets_named = model.parse_lora_targets(lora.targets)
    unknown = [t for t in targets_named if t not in model.LORA_TARGETS]
    if unknown:
        raise UserError(f"--config.lora.targets: {', '.join(map(repr, unknown))} "
                        f"{'is not a projection' if len(unknown) == 1 else 'are not projections'}"
                        f" LoRA can adapt; choose from {','.join(model.LORA_TARGETS)}")
    if lora.rank and not targets_named:
        raise UserError("--config.lora.targets is empty: name the projections to adapt, e.g. "
                        + ",".join(model.LORA_TARGETS))

