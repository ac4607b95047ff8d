"""The embedded demo over several seeds: which component carries the gain, which the retention,
and a verdict on each of the paper's four claims.

    python benchmarks/demo_claims.py --seeds=0,1,2,3,4                  # CPU, ~20 min per seed
    python benchmarks/demo_claims.py --seeds=0,1,2,3,4 --variant=gpu

Each seed runs the whole `dasd_jax.demo` pipeline with `config.seed` set to it (a base pretrained
from that seed and cached, its own fine-tuning problems, rewrites, fine-tunes and evaluations)
with the demo's nine methods plus `EXTRA` (DASD's fallback modes, and DASD without the
structural-token rule). The seed's table goes to `{workdir}/seed-{seed}/demo_results.json`; this
script prints mean ± std (sample std over seeds) per method as Markdown for
benchmarks/RESULTS.md, then the component comparisons and one line per claim with the criterion
it applied. The criteria, fixed before the five-seed run:

  (a) rewritten data carries many high-PPL tokens, from corrections and from drift: the
      sdft-mode rewrites have a high-PPL ratio (1/b > 10) of at least 5%, and corrections and
      drift (under the default veto test) each make up at least 1% of their tokens;
  (b) DASD reduces them: the high-PPL share of the tokens DASD trains on (`kept_high_ppl /
      kept_ratio` of its run) is below that of SDFT's training tokens;
  (c) DASD beats SFT and SDFT: DASD's mean hard accuracy exceeds both by more than the larger
      of their standard deviations;
  (d) the gain is largest on hard problems with less forgetting: DASD's easy-accuracy loss from
      the base is smaller than SFT's and SDFT's, and its hard gain exceeds its easy change.

Components (a difference counts when it exceeds the larger of the two standard deviations):
co-decoding = "co-decoding" vs SDFT (same rule `all`, other rewrites); selection = DASD vs
"co-decoding" (same rewrites) and "DASD on sdft" vs SDFT (same rewrites); the correction test =
DASD vs "DASD base_unsure" and "DASD ref_confident"; the choice of tokens = DASD vs random (same
count). What causes forgetting: across every method and seed, the correlation of the easy-
accuracy loss with the share of high-PPL tokens among the response tokens a method trains on.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from dasd_jax import demo

REPO = Path(__file__).resolve().parent.parent
EXTRA = {
    "DASD fallback=ppl_filter": ("dasd", demo.DASD_FILE, "response", {"fallback": "ppl_filter"}),
    "DASD fallback=drop": ("dasd", demo.DASD_FILE, "response", {"fallback": "drop"}),
    "DASD fallback=all": ("dasd", demo.DASD_FILE, "response", {"fallback": "all"}),
    "DASD no structural": ("dasd", demo.DASD_FILE, "response", {"keep_structural": False}),
}
METRICS = ("hard", "easy", "kept_ratio", "kept_high_ppl", "hard_unfinished",
           "easy_unfinished")


def run_seed(seed: int, variant: str, workdir: Path) -> dict:
    from configs.demo import get_config  # the repository's config file, not a package module

    config = get_config(variant or None)
    config.seed = seed
    config.workdir = str(workdir / f"seed-{seed}")
    return demo.run(config, extra_methods=EXTRA)


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(tables: list[dict]) -> dict:
    """Per method and metric: (mean, std) over seeds; plus the analysis and acceptance numbers."""
    summary = {"results": {}, "high_ppl_10": {}, "categories": {}, "rewrite_acceptance": {},
               "seconds": {}}
    for method, first in tables[0]["results"].items():
        summary["results"][method] = {
            metric: mean_std([t["results"][method][metric] for t in tables])
            for metric in METRICS if first.get(metric) is not None}
    for source in tables[0]["high_ppl_10"]:
        summary["high_ppl_10"][source] = mean_std([t["high_ppl_10"][source] for t in tables])
        summary["categories"][source] = {
            category: mean_std([t["categories"][source][category] for t in tables])
            for category in tables[0]["categories"][source]}
    for mode in tables[0]["rewrite_acceptance"]:
        summary["rewrite_acceptance"][mode] = mean_std(
            [t["rewrite_acceptance"][mode] for t in tables])
    for stage in tables[0]["seconds"]:
        summary["seconds"][stage] = mean_std([t["seconds"][stage] for t in tables])
    summary["forgetting_correlation"] = forgetting_correlation(tables)
    return summary


def forgetting_correlation(tables: list[dict]) -> dict:
    """Pearson correlation, over every (method, seed), of the easy-accuracy loss from the base
    with the high-PPL share of the trained tokens (kept_high_ppl / kept_ratio), and with the
    kept ratio itself."""
    points = []
    for table in tables:
        base = table["results"]["base"]["easy"]
        for name, r in table["results"].items():
            if name != "base" and r.get("kept_high_ppl") is not None and r.get("kept_ratio"):
                points.append((base - r["easy"], r["kept_high_ppl"] / r["kept_ratio"],
                               r["kept_ratio"]))
    loss, share, kept = zip(*points)
    return {"points": len(points), "with_high_ppl_share": statistics.correlation(loss, share),
            "with_kept_ratio": statistics.correlation(loss, kept)}


def _pm(pair: tuple[float, float]) -> str:
    return f"{pair[0]:.1%} ± {pair[1]:.1%}"


def _ahead(results: dict, a: str, b: str, metric: str) -> tuple[float, bool]:
    """(mean of a − mean of b, whether it exceeds the larger standard deviation)."""
    difference = results[a][metric][0] - results[b][metric][0]
    return difference, abs(difference) > max(results[a][metric][1], results[b][metric][1])


def components(summary: dict) -> list[str]:
    results = summary["results"]
    lines = []
    for label, a, b in (("co-decoding (rewrites, rule all)", "co-decoding", "SDFT"),
                        ("selection on co-decoded rewrites", "DASD", "co-decoding"),
                        ("selection on sdft rewrites", "DASD on sdft", "SDFT"),
                        ("veto vs base_unsure", "DASD", "DASD base_unsure"),
                        ("veto vs reference_confident", "DASD", "DASD ref_confident"),
                        ("choice of tokens (vs random, same count)", "DASD", "random")):
        hard, hard_counts = _ahead(results, a, b, "hard")
        easy, easy_counts = _ahead(results, a, b, "easy")
        noise = lambda counts: "" if counts else " (within noise)"
        lines.append(f"* {label}: {a} − {b}: hard {hard:+.1%}{noise(hard_counts)}"
                     f", easy {easy:+.1%}{noise(easy_counts)}")
    return lines


def verdicts(summary: dict) -> list[tuple[str, bool, str]]:
    """[(claim, supported, the numbers and criterion)] for claims (a)-(d)."""
    results, high_ppl, categories = (summary["results"], summary["high_ppl_10"],
                                     summary["categories"])
    hard = {m: results[m]["hard"] for m in results}
    easy = {m: results[m]["easy"] for m in results}
    out = []

    sdft_ppl = high_ppl["sdft"][0]
    correction, drift = categories["sdft"]["correction"][0], categories["sdft"]["drift"][0]
    out.append(("(a) rewrites carry many high-PPL tokens, from corrections and drift",
                sdft_ppl >= 0.05 and correction >= 0.01 and drift >= 0.01,
                f"sdft rewrites: high-PPL {sdft_ppl:.1%} (need >= 5%), corrections "
                f"{correction:.1%} and drift {drift:.1%} of tokens (need >= 1% each)"))

    share = lambda m: results[m]["kept_high_ppl"][0] / results[m]["kept_ratio"][0]
    out.append(("(b) DASD reduces high-PPL tokens", share("DASD") < share("SDFT"),
                f"high-PPL share of trained tokens: DASD {share('DASD'):.1%} vs SDFT "
                f"{share('SDFT'):.1%}, SFT {share('SFT'):.1%}"))

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


def markdown(summary: dict, seeds: list[int]) -> str:
    rows = [f"Seeds {', '.join(map(str, seeds))}; mean ± std over seeds.", "",
            "| model | hard acc | easy acc | kept ratio | high-PPL share of kept "
            "| unfinished (hard / easy) |",
            "|---|---|---|---|---|---|"]
    for method, m in summary["results"].items():
        kept = ("" if "kept_ratio" not in m
                else f"{m['kept_ratio'][0]:.3f} ± {m['kept_ratio'][1]:.3f}")
        share = ("" if "kept_high_ppl" not in m or not m.get("kept_ratio", (0,))[0] else
                 f"{m['kept_high_ppl'][0] / m['kept_ratio'][0]:.1%}")
        unfinished = (f"{m['hard_unfinished'][0]:.1%} / {m['easy_unfinished'][0]:.1%}"
                      if "hard_unfinished" in m else "")
        rows.append(f"| {method} | {_pm(m['hard'])} | {_pm(m['easy'])} | {kept} | "
                    f"{share} | {unfinished} |")
    categories = next(iter(summary["categories"].values()))
    rows += ["", "| training set | high-PPL (1/b > 10) | " + " | ".join(categories) + " |",
             "|---|---|" + "---|" * len(categories)]
    for source, ratio in summary["high_ppl_10"].items():
        c = summary["categories"][source]
        rows.append(f"| {source} | {_pm(ratio)} | " + " | ".join(_pm(c[k]) for k in categories)
                    + " |")
    correlation = summary["forgetting_correlation"]
    rows += ["", "Rewrites accepted: " + ", ".join(
        f"{mode} {_pm(v)}" for mode, v in summary["rewrite_acceptance"].items()),
        "Wall time per seed: " + ", ".join(
            f"{stage} {v[0]:.0f} ± {v[1]:.0f} s" for stage, v in summary["seconds"].items()),
        "", "Components:", *components(summary), "",
        f"Forgetting: over {correlation['points']} (method, seed) runs, the easy-accuracy loss "
        f"correlates with the high-PPL share of the trained tokens at "
        f"r = {correlation['with_high_ppl_share']:+.2f}, and with the kept ratio at "
        f"r = {correlation['with_kept_ratio']:+.2f}.", ""]
    for claim, supported, evidence in verdicts(summary):
        rows.append(f"* {claim}: **{'supported' if supported else 'not supported'}** "
                    f"({evidence}).")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--variant", default="", help="configs/demo.py variant: '' | small | gpu")
    parser.add_argument("--workdir", default="/tmp/dasd_jax_demo_claims")
    parser.add_argument("--summarize_only", action="store_true",
                        help="read {workdir}/seed-*/demo_results.json of an earlier run")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    if len(seeds) < 2:
        parser.error("--seeds needs at least two seeds for a standard deviation")
    sys.path.insert(0, str(REPO))
    from configs.demo import get_config

    get_config(args.variant)  # fails early on an unknown variant
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
