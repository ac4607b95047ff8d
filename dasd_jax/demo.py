"""The embedded demo: `python -m dasd_jax.demo --config=configs/demo.py[:small|:gpu]`.

The whole DASD pipeline, offline, in the generated arithmetic world of `tasks.synthetic`:

1. pretrain a tiny base (its tokenizer: the world's words and numbers whole, characters
   otherwise) on easy problems in its native style plus answer-aware examples (cached in
   `demo.cache_dir`, keyed by every setting that shapes it);
2. rewrite the hard fine-tuning problems, whose references are in a foreign style, in `sdft` and
   `dasd` (co-decoding) modes;
3. fine-tune the base nine ways (`METHODS`, or the subset `demo.methods` names), each the same
   step with one setting changed: SFT (`all` on the references), SDFT (`all` on the sdft
   rewrites), co-decoding alone (`all` on the dasd rewrites), DASD with each correction test
   (veto, base_unsure, reference_confident) on the dasd rewrites, DASD-veto on the sdft rewrites
   (selection without co-decoding), the PPL filter, and random selection at DASD-veto's keep
   rate;
4. evaluate every model on held-out hard problems (the gain) and easy native ones (forgetting),
   analyze the training sets (high-PPL ratios, token categories, plots, token page),
and print one table. Every stage is the package's real code path (`train.train`,
`rewrite.rewrite`, `evaluate.evaluate`, `analyze.analyze`, `hf.save` / `hf.load`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

import jax

from dasd_jax import analyze, atomic, cli, evaluate, loading, rewrite, train, validation
from dasd_jax.errors import UserError
from dasd_jax.pipeline import stage_config, training_means, write_jsonl
from dasd_jax.tasks import synthetic

DASD_FILE, SDFT_FILE = "rewrites_dasd.jsonl", "rewrites_sdft.jsonl"
METHODS = {  # name: (rule, training file, target, selection overrides)
    "SFT": ("all", DASD_FILE, "reference", {}),
    "SDFT": ("all", SDFT_FILE, "response", {}),
    "co-decoding": ("all", DASD_FILE, "response", {}),
    "DASD": ("dasd", DASD_FILE, "response", {}),
    "DASD base_unsure": ("dasd", DASD_FILE, "response", {"correction_test": "base_unsure"}),
    "DASD ref_confident": ("dasd", DASD_FILE, "response",
                           {"correction_test": "reference_confident"}),
    "DASD on sdft": ("dasd", SDFT_FILE, "response", {}),
    "PPL filter": ("ppl_filter", DASD_FILE, "response", {}),
    "random": ("random", DASD_FILE, "response", {}),
}


def chosen_methods(config: Any) -> dict:
    """The METHODS `demo.methods` names (comma-separated; empty: all), in METHODS' order."""
    names = [name.strip() for name in config.demo.methods.split(",") if name.strip()]
    unknown = [name for name in names if name not in METHODS]
    if unknown:
        raise UserError(f"--config.demo.methods: {unknown[0]!r} is not a demo method; choose "
                        f"from {', '.join(METHODS)} (comma-separated; empty runs all of them)")
    return {name: method for name, method in METHODS.items() if not names or name in names}


def cache_key(config: Any, records: list[dict]) -> str:
    """A hash of what shapes the pretrained base: its records, tokenizer, model and training."""
    demo = config.demo
    settings = {"model": config.model.random.to_dict(), "steps": demo.pretrain_steps,
                "lr": demo.pretrain_learning_rate, "batch": demo.pretrain_batch_size,
                "seed": config.seed, "buckets": list(config.data.buckets),
                "group_by_length": config.data.group_by_length,
                "tokenizer": loading.random_tokenizer(config).backend_tokenizer.to_str(),
                "records": records}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def pretrained_base(config: Any, log) -> Path:
    """The base checkpoint directory: pretrained now, or found in the cache (`cache_key`); an
    interrupted run leaves no cache entry behind."""
    demo = config.demo
    records = synthetic.pretraining_records(demo.pretrain_examples, config.seed)
    cached = Path(demo.cache_dir).expanduser() / f"base-{cache_key(config, records)}"
    if (cached / "config.json").exists():
        log(f"base model: cached at {cached}")
        return cached
    workdir = Path(config.workdir) / "pretrain"
    shutil.rmtree(workdir, ignore_errors=True)
    data = write_jsonl(workdir / "pretraining.jsonl", records)
    stage = stage_config(config, workdir,
                         data=dict(path=str(data), target="reference", eval_path=""),
                         train=dict(steps=demo.pretrain_steps,
                                    batch_size=demo.pretrain_batch_size,
                                    learning_rate=demo.pretrain_learning_rate,
                                    warmup_steps=max(1, demo.pretrain_steps // 20),
                                    log_every=max(1, demo.pretrain_steps // 10)),
                         selection=dict(rule="all"),
                         checkpoint=dict(every=demo.pretrain_steps, export=True))
    train.train(stage)
    if jax.process_index() == 0:
        partial = cached.with_name(cached.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(workdir / "hf", partial)
        shutil.rmtree(cached, ignore_errors=True)  # an incomplete entry of an older version
        partial.rename(cached)
    log(f"base model: pretrained and cached at {cached}")
    return cached


def run(config: Any, extra_methods: dict | None = None) -> dict:
    """Runs the demo; returns the results table as a dict and prints it. `extra_methods`
    ({name: (rule, training file, target, selection overrides)}) adds fine-tunes, e.g. ablations.
    Each method's kept ratio and token composition are the means over its training run."""
    validation.validate(config)  # each stage below resolves its own copy (its own {workdir})
    methods = {**chosen_methods(config), **(extra_methods or {})}
    demo = config.demo
    workdir = Path(config.workdir).expanduser()
    timings: dict[str, float] = {}
    log = lambda text: print(f"[demo] {text}", flush=True)

    started = time.perf_counter()
    base = pretrained_base(config, log)
    timings["pretrain"] = time.perf_counter() - started
    on_base = dict(path=str(base))

    started = time.perf_counter()
    finetune = write_jsonl(workdir / "finetune.jsonl",
                           synthetic.finetune_records(demo.finetune_examples, config.seed))
    rewrite_summaries = {}
    for mode in ("sdft", "dasd"):
        stage = stage_config(config, workdir, model=on_base,
                             rewrite=dict(input=str(finetune), task="synthetic", mode=mode,
                                          output=str(workdir / f"rewrites_{mode}.jsonl")))
        stage.rewrite.fields.update(prompt="prompt", reference="reference")
        rewrite_summaries[mode] = rewrite.rewrite(stage)
    timings["rewrite"] = time.perf_counter() - started

    evaluation = dict(tasks="synthetic_hard,synthetic_easy", tuned_tasks="synthetic_hard",
                      limit=demo.eval_examples, baseline="",
                      max_new_tokens=config.eval.max_new_tokens)
    results = {}
    started = time.perf_counter()
    base_eval = evaluate.evaluate(stage_config(config, workdir / "base", model=on_base,
                                               eval=dict(evaluation, checkpoint="base")))
    results["base"] = _scores(base_eval)
    timings["evaluate"] = time.perf_counter() - started
    timings["finetune"] = 0.0
    for name, (rule, training_file, target, selection) in methods.items():
        run_dir = workdir / name.lower().replace(" ", "_").replace("=", "")
        shutil.rmtree(run_dir, ignore_errors=True)
        stage = stage_config(
            config, run_dir, model=on_base,
            data=dict(path=str(workdir / training_file), target=target, eval_path=""),
            train=dict(steps=demo.finetune_steps, learning_rate=demo.finetune_learning_rate,
                       warmup_steps=max(1, demo.finetune_steps // 10),
                       log_every=max(1, demo.finetune_steps // 4)),
            selection=dict(selection, rule=rule), eval=dict(evaluation, checkpoint="{workdir}/hf"))
        started = time.perf_counter()
        train.train(stage)
        timings["finetune"] += time.perf_counter() - started
        started = time.perf_counter()
        results[name] = {**_scores(evaluate.evaluate(stage)), **training_means(run_dir)}
        timings["evaluate"] += time.perf_counter() - started

    started = time.perf_counter()
    sources = (f"references={workdir}/{DASD_FILE}@reference,"
               f"sdft={workdir}/{SDFT_FILE},dasd={workdir}/{DASD_FILE}")
    analysis = analyze.analyze(stage_config(
        config, workdir, model=on_base,
        analyze=dict(sources=sources, output=str(workdir / "analysis"))))
    timings["analyze"] = time.perf_counter() - started
    source_of = {DASD_FILE: "dasd", SDFT_FILE: "sdft"}
    for name, (rule, training_file, target, _) in methods.items():
        if rule == "all":  # every token is kept: the set's own high-PPL share, from the analysis
            source = "references" if target == "reference" else source_of[training_file]
            results[name]["kept_high_ppl"] = analysis[source]["high_ppl_10"]
    table = {"results": results, "high_ppl_10": {k: v["high_ppl_10"] for k, v in analysis.items()},
             "categories": {k: {c: v[c] / max(v["tokens"], 1) for c in analyze.CATEGORIES}
                            for k, v in analysis.items()},
             "rewrite_acceptance": {m: s["acceptance_rate"] for m, s in rewrite_summaries.items()},
             "seconds": timings}
    if jax.process_index() == 0:
        atomic.write_text(workdir / "demo_results.json", json.dumps(table, indent=2) + "\n")
        print(format_table(table))
    return table


def main(config: Any) -> None:
    started = time.time()
    run(config)
    if jax.process_index() == 0:
        print(f"done in {time.time() - started:.0f} s; workdir {config.workdir}")


def _scores(summary: dict) -> dict[str, float]:
    """Accuracy on the held-out "hard" and "easy" problems, and the share of their completions
    that did not finish ("hard_unfinished", "easy_unfinished")."""
    scores = {}
    for task, numbers in summary["tasks"].items():
        level = task.removeprefix("synthetic_")
        scores[level], scores[f"{level}_unfinished"] = numbers["accuracy"], numbers["unfinished"]
    return scores


def format_table(table: dict) -> str:
    header = (f"{'model':<20}{'hard acc':>10}{'easy acc':>10}{'kept':>7}{'kept PPL>τ':>12}"
              f"{'unfinished':>12}")
    rows = [header, "-" * len(header)]
    for name, r in table["results"].items():
        kept = "" if r.get("kept_ratio") is None else f"{r['kept_ratio']:.2f}"
        high = "" if r.get("kept_high_ppl") is None else f"{r['kept_high_ppl']:.2f}"
        unfinished = (r["hard_unfinished"] + r["easy_unfinished"]) / 2
        rows.append(f"{name:<20}{r['hard']:>10.1%}{r['easy']:>10.1%}{kept:>7}"
                    f"{high:>12}{unfinished:>12.1%}")
    rows.append("")
    rows.append("high-PPL ratio (1/b > 10) of each training set under the base: " + ", ".join(
        f"{k} {v:.1%}" for k, v in table["high_ppl_10"].items()))
    rows.append("rewrites kept (finished, right answer and steps, no template leak): " + ", ".join(
        f"{k} {v:.1%}" for k, v in table["rewrite_acceptance"].items()))
    rows.append("wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in table["seconds"].items()))
    return "\n".join(rows)


if __name__ == "__main__":
    cli.run(main)  # each stage of the demo resolves its own config
