"""The real-model experiment's verdicts (benchmarks/real_claims.py), on tables of made-up runs:
a method's spread is the standard deviation over its seeds, or with one seed the run's own
standard error (the shift's over the prompts, an accuracy's binomial)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "real_claims.py"


@pytest.fixture(scope="module")
def real_claims():
    spec = importlib.util.spec_from_file_location("real_claims", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(method: str, seed: int, kl: float, kl_se: float, gsm8k: float, commonsense: float,
        high_ppl_share: float) -> dict:
    shift = {"humaneval": dict(prompts=16, kl=kl, kl_se=kl_se),
             "math500": dict(prompts=48, kl=kl, kl_se=kl_se)}
    return dict(method=method, seed=seed, kl=kl, shift=shift, gsm8k=gsm8k, gsm8k_examples=100,
                commonsense=commonsense, high_ppl_share=high_ppl_share)


def table(results: list[dict]) -> dict:
    return {"results": {"base": {"gsm8k": 0.02, "commonsense": 0.40},
                        **{f"{r['method']} seed {r['seed']}": r for r in results}}}


def test_one_seed_is_judged_by_its_own_standard_errors(real_claims):
    runs = [run("DASD", 0, 0.010, 0.001, 0.10, 0.40, 0.05),
            run("SFT", 0, 0.050, 0.004, 0.09, 0.37, 0.20),
            run("SDFT", 0, 0.030, 0.002, 0.08, 0.39, 0.15),
            run("random", 0, 0.020, 0.002, 0.10, 0.395, 0.10),
            run("DASD on sdft", 0, 0.015, 0.001, 0.10, 0.398, 0.08)]
    spread = real_claims.by_method(table(runs), "kl")
    # two domains, 16 and 48 prompts, each with standard error 0.004: sqrt((1/4)^2 + (3/4)^2) x
    assert spread["SFT"] == pytest.approx((0.050, 0.004 * math.sqrt(1 / 16 + 9 / 16)))
    assert real_claims.by_method(table(runs), "gsm8k")["DASD"] == pytest.approx(
        (0.10, math.sqrt(0.10 * 0.90 / 100)))
    verdicts = {claim[:3]: supported for claim, supported, _ in real_claims.verdicts(table(runs))}
    assert verdicts == {"(d)": True, "(c)": True, "(e)": True, "(f)": True}


def test_a_difference_inside_the_seeds_spread_is_not_supported(real_claims):
    runs = [run("DASD", seed, kl, 0.0001, 0.10, 0.40, 0.05)
            for seed, kl in enumerate((0.010, 0.030))]
    runs += [run(method, seed, kl, 0.0001, 0.10, 0.40, 0.2)
             for method in ("SFT", "SDFT", "random") for seed, kl in enumerate((0.025, 0.035))]
    kl = real_claims.by_method(table(runs), "kl")
    assert kl["DASD"] == pytest.approx((0.020, math.sqrt(2) * 0.010))
    (claim, supported, evidence), _, shift_predicts, _ = real_claims.verdicts(table(runs))
    assert claim.startswith("(d)") and not supported and "DASD 0.0200 ± 0.0141" in evidence
    # no run changed the commonsense score: no correlation to speak of, and no warning
    assert not shift_predicts[1] and "r = +nan" in shift_predicts[2]


def test_the_paired_shift_differences_each_prompt_against_dasds_on_the_same_answer(real_claims,
                                                                                   tmp_path):
    kl = {"DASD": (0.01, 0.03, 0.02), "SFT": (0.02, 0.05, 0.02)}
    for method, values in kl.items():
        shift = real_claims.run_dir(tmp_path, method, 0) / "eval" / "shift"
        shift.mkdir(parents=True)
        (shift / "shift.jsonl").write_text("".join(
            f'{{"task": "mbpp", "id": {i}, "kl": {value}}}\n' for i, value in enumerate(values)))
    runs = [run(method, 0, 0.0, 0.0, 0.0, 0.4, 0.0) for method in kl]
    (mean, se, prompts), = real_claims.paired_shift(tmp_path, table(runs)).values()
    assert (mean, prompts) == (pytest.approx(0.01), 3)  # differences 0.01, 0.02, 0.0
    assert se == pytest.approx(0.01 / math.sqrt(3))
