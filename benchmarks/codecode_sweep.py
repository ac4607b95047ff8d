"""Co-decoding on a real checkpoint: rewrite acceptance and high-PPL ratio against its settings.

    python -m dasd_jax.tools.smollm2
    python benchmarks/codecode_sweep.py --problems=32 \
        --grid="sdft;alpha=0.1;alpha=0.3;alpha=0.5;alpha=0.1,sure_reference=0.5"

Each grid entry ("sdft", or comma-separated rewrite settings of dasd mode: alpha,
candidate_top_k, max_new_tokens, sure_reference) rewrites the first --problems GSM8K training
problems with `python -m dasd_jax.rewrite`'s code (`configs/math.py:smollm2`) into its own file,
and one line per entry reports what was kept, why the rest fell back, the mean candidate count,
the high-PPL ratio (1/b > 10, > 100) of the kept rewrites' tokens under the base, and the wall
time. Record the table in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO))

from configs import math as math_config
from dasd_jax import rewrite
from dasd_jax.pipeline import stage_config

NUMBERS = {"alpha": float, "candidate_top_k": int, "max_new_tokens": int, "sure_reference": float}


def settings_of(entry: str) -> dict:
    if entry == "sdft":
        return {"mode": "sdft"}
    settings = {"mode": "dasd"}
    for part in filter(None, entry.split(",")):
        name, _, value = part.partition("=")
        if name not in NUMBERS:
            raise SystemExit(f"unknown setting {name!r} in {entry!r}; choose from "
                             f"{', '.join(NUMBERS)}")
        settings[name] = NUMBERS[name](value)
    return settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default="~/.cache/dasd_jax/SmolLM2-135M-Instruct")
    parser.add_argument("--problems", type=int, default=32)
    parser.add_argument("--grid", default="sdft;alpha=0.1;alpha=0.3;alpha=0.5")
    parser.add_argument("--workdir", default="/tmp/dasd_jax_codecode_sweep")
    args = parser.parse_args()
    config = math_config.get_config("smollm2")
    config.model.path = str(Path(args.checkpoint).expanduser())
    config.rewrite.update(input=str(DATA / "gsm8k" / "train.jsonl"), limit=args.problems)
    rows = []
    for entry in args.grid.split(";"):
        name = entry.replace("=", "").replace(",", "_")
        started = time.perf_counter()
        summary = rewrite.rewrite(stage_config(config, Path(args.workdir), rewrite=dict(
            settings_of(entry), output=str(Path(args.workdir) / f"{name}.jsonl"))))
        rows.append({"setting": entry, "seconds": time.perf_counter() - started, **{
            k: summary[k] for k in ("records", "kept", "fallback_reasons", "mean_n_candidates",
                                    "kept_high_ppl_10", "kept_high_ppl_100")}})
        print(json.dumps(rows[-1]), flush=True)
    print("| setting | kept | fallbacks | mean candidates | PPL>10 of kept | PPL>100 | time |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        shown = lambda v: "" if v is None else f"{v:.1%}"
        candidates = "" if r["mean_n_candidates"] is None else f"{r['mean_n_candidates']:.2f}"
        print(f"| {r['setting']} | {r['kept']}/{r['records']} | {r['fallback_reasons']} | "
              f"{candidates} | {shown(r['kept_high_ppl_10'])} | {shown(r['kept_high_ppl_100'])} "
              f"| {r['seconds']:.0f} s |")


if __name__ == "__main__":
    main()
