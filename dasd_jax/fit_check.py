"""Whether a run fits its hardware, asked of the hardware's own compiler (`--config.dry_run=True`).

    python -m dasd_jax.train --config=configs/math.py --config.dry_run=True \
        --config.compile_for=v5p:2x2x2

compiles, without running and without the hardware (`targets`), every program of the
pipeline for the target's devices on the configured mesh: the train step of the configured
rule (LoRA, micro-batches and remat as configured), the rewrite's decoding (co-decoding in mode
dasd) and teacher-forced scoring at `rewrite.batch_size`, and evaluation's decoding at
`eval.batch_size`, each at its longest bucket. It prints each program's memory per device
(arguments, temporaries, outputs, peak) against what a device may use, the step's FLOPs and,
where the compiler counts them, a lower bound on step time per chip (an estimate, never a
measurement), then a verdict. A run that does not fit ends with `DoesNotFit`: one line naming
the target, the program, the shortfall and what would make it fit.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterator

from dasd_jax import loading, model, run_config, sampling, sharding, step, targets
from dasd_jax.errors import UserError

GIB = 2.0 ** 30


class DoesNotFit(UserError):
    """A program of the run needs more memory per device than the target has (exit status 3,
    apart from bad input's 2, so that launch scripts can tell them apart). `report`: the
    check's report."""

    exit_status = 3

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


@dataclasses.dataclass(frozen=True)
class ProgramMemory:
    """One compiled program's memory per device (bytes), or the compiler's refusal."""

    stage: str
    name: str
    argument: int = 0
    output: int = 0
    alias: int = 0
    temp: int = 0
    refused: str = ""  # the compiler's out-of-memory message
    needed: int | None = None  # bytes it says the program needs (at least: it may count a part)
    available: int | None = None  # bytes it says a device has

    @property
    def peak(self) -> int:
        """Arguments + outputs + temporaries - donated (aliased) bytes: what the program holds
        at once on one device (for a refused program, what the refusal names)."""
        if self.refused:
            return self.needed or 0
        return self.argument + self.output + self.temp - self.alias

    def as_dict(self) -> dict:
        return {"stage": self.stage, "program": self.name, "argument_gib": self.argument / GIB,
                "output_gib": self.output / GIB, "alias_gib": self.alias / GIB,
                "temp_gib": self.temp / GIB, "peak_gib": self.peak / GIB,
                "refused": self.refused or None}


def _compile(stage: str, name: str, lowered) -> ProgramMemory:
    try:
        compiled = lowered.compile()
    except Exception as error:
        text = " ".join(str(error).split())
        if "RESOURCE_EXHAUSTED" not in text and "out of memory" not in text.lower():
            raise
        sizes = _sizes(text)
        return ProgramMemory(stage, name, refused=text, needed=sizes[0] if sizes else None,
                             available=sizes[1] if len(sizes) > 1 else None)
    memory = compiled.memory_analysis()
    return ProgramMemory(stage, name, memory.argument_size_in_bytes, memory.output_size_in_bytes,
                         memory.alias_size_in_bytes, memory.temp_size_in_bytes)


_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT])(?:i?B)?\b")


def _sizes(message: str) -> list[int]:
    """The sizes a compiler's out-of-memory message names, in order, in bytes: "the total memory
    required for HLO temporaries (35.36G) exceeds available HBM (15.75G)" -> [needed, available]."""
    return [int(float(number) * 1024 ** ("KMGT".index(unit) + 1))
            for number, unit in _SIZE.findall(message)]


# ----------------------------------------------------------------------------- the programs


PIPELINE = ("train", "rewrite", "evaluate")


def programs(config: Any, cfg: model.ModelConfig, mesh, run: step.StepSetup,
             parts: tuple[str, ...] = PIPELINE) -> Iterator:
    """The programs of the stages in `parts`, compiled one at a time (ProgramMemory each): the
    train step, then the rewrite's and evaluation's programs on params as `loading.load_model`
    loads them."""
    lowered = run.train_step.lower(*run.abstract_inputs(config.train.batch_size,
                                                        max(config.data.buckets)))
    yield _compile("train", f"train step ({config.selection.rule}, {config.train.batch_size} x "
                   f"{max(config.data.buckets)}{', LoRA' if run.lora else ''})", lowered)
    if parts == ("train",):
        return
    params = sharding.abstract(model.param_shapes(cfg),
                       sharding.param_shardings(cfg, mesh, config.mesh.rules))
    eos = tuple(cfg.eos_token_ids)
    rewrite, evaluate = config.rewrite, config.eval
    kind = "codecode" if rewrite.mode == "dasd" else "plain"
    settings = sampling.Settings(max_new_tokens=rewrite.max_new_tokens, eos_ids=eos,
                                 candidate_top_k=rewrite.candidate_top_k,
                                 prompt_buckets=tuple(rewrite.prompt_buckets))
    label = "co-decoding" if kind == "codecode" else "decoding"
    with sharding.activation_rules(mesh, config.mesh.rules):
        for part, lowered in sampling.lower_decoding(cfg, params, settings, rewrite.batch_size,
                                                     kind, mesh).items():
            yield _compile("rewrite", f"{label} {part} ({rewrite.batch_size} examples)", lowered)
        length = max(rewrite.prompt_buckets) + config.data.max_seq_len
        rows = sampling.scoring_rows(rewrite.batch_size, length)
        yield _compile("rewrite", f"teacher-forced scoring ({rows} x {length})",
                       sampling.lower_scoring(cfg, params, rows, length,
                                              ("logprob", "top1", "argmax"), mesh))
        settings = sampling.Settings(max_new_tokens=evaluate.max_new_tokens, eos_ids=eos,
                                     prompt_buckets=tuple(evaluate.prompt_buckets))
        for part, lowered in sampling.lower_decoding(cfg, params, settings, evaluate.batch_size,
                                                     "plain", mesh).items():
            yield _compile("evaluate", f"decoding {part} ({evaluate.batch_size} examples)",
                           lowered)


# ----------------------------------------------------------------------------- FLOPs


def step_cost(config: Any, cfg: model.ModelConfig, mesh) -> dict | None:
    """The train step's FLOPs and bytes per device as the compiler counts them, with every loop
    counted in full. XLA's cost analysis counts a loop's body once, whatever its trip count, so
    it is taken of variants without loops (one micro-batch, the loss in one chunk, the layers
    unrolled) at 2 and 3 layers; their difference is one layer's cost (the first layer differs:
    its input needs no gradient), extrapolated to the model's layers and micro-batches (the
    optimizer's share counted once per micro-batch). None where the compiler gives no cost
    analysis (GPU compile-only targets) or a variant does not compile."""
    micro = config.train.micro_batches
    variant = run_config.replaced_fields(config, {
        "train.batch_size": config.train.batch_size // micro, "train.micro_batches": 1,
        "train.loss_chunk": max(config.data.buckets)})
    costs = []
    for layers in (2, 3):
        run = step.setup(variant, cfg.replace(num_layers=layers, scan_unroll=layers), mesh)
        try:
            compiled = run.train_step.lower(*run.abstract_inputs(
                variant.train.batch_size, max(config.data.buckets))).compile()
        except Exception:  # noqa: BLE001 - a variant that does not compile has no estimate
            return None
        analysis = compiled.cost_analysis()
        if not analysis or "flops" not in analysis:
            return None
        costs.append((analysis["flops"], analysis.get("bytes accessed", 0.0)))
    (flops2, bytes2), (flops3, bytes3) = costs
    extra = cfg.num_layers - 2
    return {"flops": micro * (flops2 + extra * (flops3 - flops2)),
            "bytes": micro * (bytes2 + extra * (bytes3 - bytes2))}


# ----------------------------------------------------------------------------- the check


def check(config: Any, parts: tuple[str, ...] = PIPELINE) -> dict:
    """Compiles every program for `config.compile_for` (or this machine), printing each as it is
    compiled, then the FLOPs and the verdict; returns the report and raises DoesNotFit when a
    program does not fit. parts: ("train",) compiles the train step alone."""
    config = run_config.resolve(config)
    target = targets.resolve(config.compile_for)
    mesh = sharding.make_mesh(config.mesh.shape, devices=target.devices)
    cfg = loading.model_config_only(config)
    run = step.setup(config, cfg, mesh)
    usable = target.usable_bytes
    report = {
        "target": config.compile_for or target.platform, "devices": len(target.devices),
        "device_kind": target.chip.name if target.chip else target.devices[0].device_kind,
        "params": cfg.num_params, "mesh": dict(mesh.shape),
        "batch": [config.train.batch_size, max(config.data.buckets)],
        "usable_gib_per_device": None if usable is None else usable / GIB,
        "weights_gib": run.weight_bytes() / GIB,
    }
    if run.lora:
        report["lora"] = _lora_saving(config, cfg, mesh, run)
    _print_header(report, target, config)
    compiled = []
    for program in programs(config, cfg, mesh, run, parts):
        _print_program(program)
        compiled.append(program)
    report["programs"] = [p.as_dict() for p in compiled]
    train_step = compiled[0]
    report.update(argument_gib=train_step.argument / GIB, output_gib=train_step.output / GIB,
                  temp_gib=train_step.temp / GIB, alias_gib=train_step.alias / GIB,
                  peak_gib_per_device=train_step.peak / GIB)
    # GPU compile-only targets give no cost analysis; a refused step has no cost to estimate.
    cost = (step_cost(config, cfg, mesh) if target.platform != "gpu" and not train_step.refused
            else None)
    report["model_flops_per_device"] = (run.flops(config.train.batch_size,
                                                  max(config.data.buckets)) / mesh.size)
    report["compiler_flops_per_device"] = cost["flops"] if cost else None
    report["compiler_bytes_per_device"] = cost["bytes"] if cost else None
    if target.chip is not None:
        report["step_seconds_lower_bound"] = _time_bound(cost, report["model_flops_per_device"],
                                                         target.chip)
    largest = max(compiled, key=lambda p: p.peak)
    failing = next((p for p in compiled if p.refused), None) or (
        largest if usable is not None and largest.peak > usable else None)
    report["fits"] = failing is None
    _print_verdict(report, largest)
    if failing is not None:
        sharded_over = mesh.shape["fsdp"] * mesh.shape["tensor"]
        raise DoesNotFit(_shortfall(config, target, failing, usable,
                                    run.weight_bytes() / sharded_over), report)
    return report


def _time_bound(cost: dict | None, model_flops: float, chip: targets.Chip) -> dict:
    """Seconds per step per chip at the chip's published peaks: FLOPs / peak FLOP/s and bytes /
    HBM bandwidth; the larger bounds the step. FLOPs: the larger of the model FLOPs and the
    compiler's count (XLA's TPU cost analysis counted half the FLOPs of the model's batched
    projections, benchmarks/RESULTS.md); bytes: the compiler's count, where it gives one."""
    flops = max(model_flops, cost["flops"] if cost else 0.0)
    bound = {"compute_s": flops / chip.peak_flops}
    if cost:
        bound["memory_s"] = cost["bytes"] / chip.hbm_bandwidth
    bound["seconds"] = max(bound["compute_s"], bound.get("memory_s", 0.0))
    return bound


def _lora_saving(config: Any, cfg: model.ModelConfig, mesh, run: step.StepSetup) -> dict:
    """LoRA's trainable params and weight memory against full fine-tuning of the same run."""
    full = run_config.replaced_fields(config, {"lora.rank": 0})
    saving = {"trainable_params": run.trainee.num_lora_params,
              "weights_gib": run.weight_bytes() / GIB,
              "full_finetune_weights_gib": step.setup(full, cfg, mesh).weight_bytes() / GIB}
    saving["saved_gib"] = saving["full_finetune_weights_gib"] - saving["weights_gib"]
    return saving


def _shortfall(config: Any, target: targets.Target, program: ProgramMemory, usable: int,
               weights_per_device: float) -> str:
    where = config.compile_for or f"this machine ({target.platform})"
    if program.refused:
        room = program.available or usable
        needs = (f"the compiler refused it: it needs at least {program.needed / GIB:.2f} GiB per "
                 f"device of {room / GIB:.2f} GiB (short by at least "
                 f"{(program.needed - room) / GIB:.2f} GiB)" if program.needed else
                 f"the compiler refused it ({program.refused[:200]})")
    else:
        needs = (f"it needs {program.peak / GIB:.2f} GiB per device of {usable / GIB:.2f} GiB "
                 f"(short by {(program.peak - usable) / GIB:.2f} GiB)")
    return (f"does not fit {where}: the {program.stage} stage's {program.name}: {needs}; "
            f"try {_remedies(config, target, program.stage, weights_per_device)}")


def _remedies(config: Any, target: targets.Target, stage: str, weights_per_device: float) -> str:
    """What would lower the failing stage's memory per device, as flags: for a train step whose
    weights alone overflow a device, fewer or smaller weights; otherwise fewer activations."""
    train, options = config.train, []
    if stage == "train" and weights_per_device > (target.usable_bytes or float("inf")):
        if config.lora.rank == 0:
            options.append("--config.lora.rank=16")
        if config.model.param_dtype == "float32":
            options.append("--config.model.param_dtype=bfloat16")
    elif stage == "train":
        doubled, shards = train.micro_batches * 2, config.mesh.shape[0] * config.mesh.shape[1]
        if train.batch_size % doubled == 0 and (train.batch_size // doubled) % shards == 0:
            options.append(f"--config.train.micro_batches={doubled}")
        if config.model.remat_policy != "full":
            options.append("--config.model.remat_policy=full")
    else:
        field = "rewrite" if stage == "rewrite" else "eval"
        options.append(f"--config.{field}.batch_size={max(config[field].batch_size // 2, 1)}")
    larger = _larger_target(config.compile_for)
    if larger:
        options.append(f"a larger target (--config.compile_for={larger})")
    if not options:
        return "a target with more memory per device"
    return ", ".join(options[:-1]) + (" or " if len(options) > 1 else "") + options[-1]


def _larger_target(name: str) -> str | None:
    """The same hardware with twice the devices, e.g. v5e:2x4 -> v5e:4x4, h100x8 -> h100x16."""
    tpu = re.fullmatch(r"(v\w+):(\d+(?:x\d+)+)", name)
    if tpu:
        sizes = [int(n) for n in tpu.group(2).split("x")]
        smallest = sizes.index(min(sizes))
        sizes[smallest] *= 2
        return f"{tpu.group(1)}:{'x'.join(map(str, sizes))}"
    gpu = re.fullmatch(r"(\w+)x(\d+)", name)
    if gpu:
        return f"{gpu.group(1)}x{int(gpu.group(2)) * 2}"
    return None


def _print_header(report: dict, target: targets.Target, config: Any) -> None:
    usable = report["usable_gib_per_device"]
    print(f"target       {target.describe()}"
          + ("" if usable is None else f"; {usable:.2f} GiB usable per device"))
    print(f"model        {report['params']:,} parameters; mesh {report['mesh']}")
    print(f"weights      params + optimizer + frozen base {report['weights_gib']:.3f} GiB "
          "(all devices together)")
    if "lora" in report:
        saving = report["lora"]
        print(f"LoRA         rank {config.lora.rank} on {config.lora.targets}: "
              f"{saving['trainable_params']:,} trainable parameters "
              f"({100 * saving['trainable_params'] / report['params']:.2f}%); weights "
              f"{saving['weights_gib']:.3f} GiB vs {saving['full_finetune_weights_gib']:.3f} GiB "
              f"fully fine-tuned: saves {saving['saved_gib']:.3f} GiB")
    print(f"{'memory/device':<15}{'program':<48}{'arguments':>11}{'temporaries':>13}"
          f"{'outputs':>11}{'peak':>11}  (GiB)", flush=True)


def _print_program(program: ProgramMemory) -> None:
    label = f"{program.stage}: {program.name}"
    if program.refused:
        print(f"{'':<15}{label:<48}  refused by the compiler: {program.refused[:160]}",
              flush=True)
        return
    print(f"{'':<15}{label:<48}{program.argument / GIB:>11.3f}{program.temp / GIB:>13.3f}"
          f"{program.output / GIB:>11.3f}{program.peak / GIB:>11.3f}", flush=True)


def _print_verdict(report: dict, largest: ProgramMemory) -> None:
    flops = report["compiler_flops_per_device"]
    print(f"step FLOPs   {report['model_flops_per_device']:.3e} per device (model FLOPs)"
          + ("" if flops is None else
             f"; {flops:.3e} counted by the compiler, every layer and micro-batch"))
    bound = report.get("step_seconds_lower_bound")
    if bound:
        memory = (f", bytes / HBM bandwidth {_duration(bound['memory_s'])}" if "memory_s" in bound
                  else "")
        print(f"estimate     >= {_duration(bound['seconds'])} per step per chip (FLOPs / peak "
              f"{_duration(bound['compute_s'])}{memory}; the chip's published figures: an "
              "estimate, not a measurement)")
    usable = report["usable_gib_per_device"]
    verdict = "fits" if report["fits"] else "does NOT fit"
    room = "" if usable is None else f" of {usable:.2f} GiB"
    print(f"verdict      {verdict}: largest peak {largest.peak / GIB:.3f} GiB{room} per device "
          f"({largest.stage}: {largest.name})", flush=True)


def _duration(seconds: float) -> str:
    return f"{seconds:.3f} s" if seconds >= 1 else f"{seconds * 1e3:.2f} ms"
