"""The embedded demo over several seeds, and a verdict on each of the paper's four claims.

    python benchmarks/demo_claims.py --seeds=0,1,2                      # CPU, ~10 min per seed
    python benchmarks/demo_claims.py --seeds=0,1,2 --variant=demo_gpu   # the larger world

Each seed runs the whole `dasd_jax.demo` pipeline with `config.seed` set to it: a base pretrained
from that seed (cached per seed), its own fine-tuning problems, rewrites, five fine-tunes and
evaluations. The seed's table goes to `{workdir}/seed-{seed}/demo_results.json`; this script
prints mean ± std (sample std over seeds) per method as a Markdown table for
benchmarks/RESULTS.md, followed by one line per claim with the criterion it applied:

  (a) rewritten data carries many high-PPL tokens, from corrections and from drift:
      the sdft-mode rewrites have a high-PPL ratio (1/b > 10) of at least 5% and both
      correction and drift tokens make up at least 1% of their tokens;
  (b) DASD reduces them: the high-PPL share of the tokens DASD trains on (its kept tokens:
      corrections / (aligned + corrections) of the dasd-mode set, as 1/b > 10 is b < tau = 0.1)
      is below the share in what SDFT trains on (every token of the sdft-mode set);
  (c) DASD beats SFT and SDFT: mean hard accuracy of DASD exceeds both by more than the larger
      of the two standard deviations;
  (d) the gain is largest on hard problems with less forgetting: DASD's easy-accuracy loss from
      the base is smaller than SFT's and SDFT's, and DASD's hard-accuracy gain over the base
      exceeds its easy-accuracy change.

A claim the numbers do not meet is reported as "not supported", with the numbers.

One ablation runs beside the demo's five methods: "DASD gamma=1", the DASD rule without its
competing-preference test (a low-confidence token with q >= kappa counts as a correction however
confident the base is in another token), to show how much of DASD's result that test decides.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from dasd_jax import demo
from dasd_jax.config_defaults import apply_variants, base_config

REPO = Path(__file__).resolve().parent.parent
ABLATIONS = {"DASD gamma=1": ("dasd", "rewrites_dasd.jsonl", "response", {"gamma": 1.0})}


def run_seed(seed: int, variant: str, workdir: Path) -> dict:
    sys.path.insert(0, str(REPO))
    from configs.math import get_config  # the repository's config file, not a package module

    config = get_config(variant)
    config.seed = seed
    config.workdir = str(workdir / f"seed-{seed}")
    return demo.run(config, extra_methods=ABLATIONS)


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(tables: list[dict]) -> dict:
    """Per method and metric: (mean, std) over seeds; plus the analysis and acceptance numbers."""
    methods = tables[0]["results"]
    summary = {"results": {}, "high_ppl_10": {}, "categories": {}, "rewrite_acceptance": {},
               "seconds": {}}
    for method in methods:
        summary["results"][method] = {
            metric: mean_std([t["results"][method][metric] for t in tables])
            for metric in ("demo_hard", "demo_easy", "kept_ratio")
            if tables[0]["results"][method].get(metric) is not None}
    for source in tables[0]["high_ppl_10"]:
        summary["high_ppl_10"][source] = mean_std([t["high_ppl_10"][source] for t in tables])
        summary["categories"][source] = {
            category: mean_std([t["categories"][source][category] for t in tables])
            for category in ("aligned", "correction", "drift")}
    for mode in tables[0]["rewrite_acceptance"]:
        summary["rewrite_acceptance"][mode] = mean_std(
            [t["rewrite_acceptance"][mode] for t in tables])
    for stage in tables[0]["seconds"]:
        summary["seconds"][stage] = mean_std([t["seconds"][stage] for t in tables])
    return summary


def verdicts(summary: dict) -> list[tuple[str, bool, str]]:
    """[(claim, supported, the numbers and criterion)] for claims (a)-(d)."""
    results, high_ppl, categories = (summary["results"], summary["high_ppl_10"],
                                     summary["categories"])
    hard = {m: results[m]["demo_hard"] for m in results}
    easy = {m: results[m]["demo_easy"] for m in results}
    out = []

    sdft_ppl = high_ppl["sdft"][0]
    correction, drift = categories["sdft"]["correction"][0], categories["sdft"]["drift"][0]
    out.append(("(a) rewrites carry many high-PPL tokens, from corrections and drift",
                sdft_ppl >= 0.05 and correction >= 0.01 and drift >= 0.01,
                f"sdft rewrites: high-PPL {sdft_ppl:.1%} (need >= 5%), corrections "
                f"{correction:.1%} and drift {drift:.1%} of tokens (need >= 1% each)"))

    dasd = categories["dasd"]
    kept_ppl = dasd["correction"][0] / max(dasd["aligned"][0] + dasd["correction"][0], 1e-9)
    out.append(("(b) DASD reduces high-PPL tokens", kept_ppl < sdft_ppl,
                f"high-PPL share of trained tokens: DASD {kept_ppl:.1%} (kept tokens of the "
                f"dasd-mode set, whose tokens overall are {high_ppl['dasd'][0]:.1%} high-PPL) vs "
                f"SDFT {sdft_ppl:.1%}, SFT {high_ppl['references'][0]:.1%}"))

    margin = max(hard["SFT"][1], hard["SDFT"][1])
    beats = all(hard["DASD"][0] - hard[m][0] > margin for m in ("SFT", "SDFT"))
    out.append(("(c) DASD beats SFT and SDFT (hard accuracy)", beats,
                f"DASD {_pm(hard['DASD'])}, SFT {_pm(hard['SFT'])}, SDFT {_pm(hard['SDFT'])}; "
                f"need DASD ahead of each by more than {margin:.1%}"))

    base_hard, base_easy = hard["base"][0], easy["base"][0]
    loss = {m: base_easy - easy[m][0] for m in ("SFT", "SDFT", "DASD")}
    hard_gain, easy_change = hard["DASD"][0] - base_hard, easy["DASD"][0] - base_easy
    less_forgetting = loss["DASD"] < min(loss["SFT"], loss["SDFT"])
    out.append(("(d) gain largest on hard, less forgetting",
                less_forgetting and hard_gain > easy_change,
                f"easy accuracy lost vs base: DASD {loss['DASD']:+.1%}, SFT {loss['SFT']:+.1%}, "
                f"SDFT {loss['SDFT']:+.1%}; DASD hard gain {hard_gain:+.1%} vs easy change "
                f"{easy_change:+.1%}"))
    return out


def _pm(pair: tuple[float, float]) -> str:
    return f"{pair[0]:.1%} ± {pair[1]:.1%}"


def markdown(summary: dict, seeds: list[int]) -> str:
    rows = [f"Seeds {', '.join(map(str, seeds))}; mean ± std over seeds.", "",
            "| model | hard acc | easy acc | kept ratio |", "|---|---|---|---|"]
    for method, metrics in summary["results"].items():
        kept = metrics.get("kept_ratio")
        kept_text = "" if kept is None else f"{kept[0]:.3f} ± {kept[1]:.3f}"
        rows.append(f"| {method} | {_pm(metrics['demo_hard'])} | {_pm(metrics['demo_easy'])} | "
                    f"{kept_text} |")
    rows += ["", "| training set | high-PPL (1/b > 10) | aligned | correction | drift |",
             "|---|---|---|---|---|"]
    for source, ratio in summary["high_ppl_10"].items():
        c = summary["categories"][source]
        rows.append(f"| {source} | {_pm(ratio)} | {_pm(c['aligned'])} | {_pm(c['correction'])} "
                    f"| {_pm(c['drift'])} |")
    rows += ["", "Rewrites accepted: " + ", ".join(
        f"{mode} {_pm(v)}" for mode, v in summary["rewrite_acceptance"].items()),
        "Wall time per seed: " + ", ".join(
            f"{stage} {v[0]:.0f} ± {v[1]:.0f} s" for stage, v in summary["seconds"].items()), ""]
    for claim, supported, evidence in verdicts(summary):
        rows.append(f"* {claim}: **{'supported' if supported else 'not supported'}** "
                    f"({evidence}).")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--variant", default="demo", help="configs/math.py variant")
    parser.add_argument("--workdir", default="/tmp/dasd_jax_demo_claims")
    parser.add_argument("--summarize_only", action="store_true",
                        help="read {workdir}/seed-*/demo_results.json of an earlier run")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    if len(seeds) < 2:
        parser.error("--seeds needs at least two seeds for a standard deviation")
    apply_variants(base_config(), args.variant)  # fails early on an unknown variant
    workdir = Path(args.workdir)
    if args.summarize_only:
        tables = [json.loads((workdir / f"seed-{seed}" / "demo_results.json").read_text())
                  for seed in seeds]
    else:
        tables = [run_seed(seed, args.variant, workdir) for seed in seeds]
    summary = summarize(tables)
    (workdir / "claims.json").write_text(json.dumps(
        {"seeds": seeds, "summary": summary,
         "verdicts": [{"claim": c, "supported": s, "evidence": e}
                      for c, s, e in verdicts(summary)]}, indent=2) + "\n")
    print(markdown(summary, seeds))


if __name__ == "__main__":
    main()
