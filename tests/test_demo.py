"""The embedded demo pipeline end to end at a test's size: pretrain, rewrite, a fine-tune of each
rule, evaluation, analysis, one table."""

import json

import pytest

from dasd_jax import demo, loading
from dasd_jax.errors import UserError
from configs import demo as demo_config


@pytest.mark.slow
def test_the_demo_pipeline_runs_every_stage_and_prints_its_table(tmp_path, capsys):
    config = demo_config.get_config("small")
    config.workdir = str(tmp_path / "run")
    config.demo.cache_dir = str(tmp_path / "cache")
    # Every training rule and target once (each method of METHODS is one setting of these).
    config.demo.methods = "SFT, DASD,PPL filter,random"
    ablation = {"DASD gamma=1": ("dasd", "rewrites_dasd.jsonl", "response", {"gamma": 1.0})}
    table = demo.run(config, extra_methods=ablation)

    assert list(table["results"]) == ["base", "SFT", "DASD", "PPL filter", "random",
                                      "DASD gamma=1"]
    for name, scores in table["results"].items():
        assert 0 <= scores["hard"] <= 1 and 0 <= scores["easy"] <= 1, name
    results = table["results"]
    assert results["SFT"]["kept_ratio"] == 1.0
    assert results["SFT"]["kept_high_ppl"] == table["high_ppl_10"]["references"]
    # The same batches: random keeps as many tokens as DASD; the PPL filter a subset of them.
    assert results["random"]["kept_ratio"] == pytest.approx(results["DASD"]["kept_ratio"])
    assert results["PPL filter"]["kept_ratio"] <= results["DASD"]["kept_ratio"]
    assert results["PPL filter"]["kept_high_ppl"] == 0.0
    assert 0 <= results["DASD"]["hard_unfinished"] <= 1
    assert set(table["high_ppl_10"]) == {"references", "sdft", "dasd"}
    assert set(table["categories"]["dasd"]) == {"aligned", "correction", "drift", "structural"}
    assert set(table["seconds"]) == {"pretrain", "rewrite", "evaluate", "finetune", "analyze"}
    printed = capsys.readouterr().out
    assert "hard acc" in printed and "PPL filter" in printed
    saved = json.loads((tmp_path / "run" / "demo_results.json").read_text())
    assert saved["results"].keys() == table["results"].keys()
    assert (tmp_path / "run" / "analysis" / "tokens.html").exists()

    # A second run finds the pretrained base in the cache.
    config.workdir = str(tmp_path / "again")
    assert demo.pretrained_base(config, print) == next((tmp_path / "cache").iterdir())
    assert "cached at" in capsys.readouterr().out


def test_demo_methods_name_a_subset_and_a_typo_is_refused_with_the_choices():
    config = demo_config.get_config("small")
    assert list(demo.chosen_methods(config)) == list(demo.METHODS)
    config.demo.methods = "random,SFT"
    assert list(demo.chosen_methods(config)) == ["SFT", "random"]
    config.demo.methods = "SFT,DASDD"
    with pytest.raises(UserError, match=r"^--config.demo.methods: 'DASDD' is not a demo method; "
                                        r"choose from SFT, SDFT, co-decoding, DASD, "):
        demo.chosen_methods(config)


def test_the_gpu_variant_runs_the_same_pipeline_on_a_larger_base():
    config = demo_config.get_config("gpu")
    cfg = loading.model_config_only(config)
    assert config.model.random_tokenizer == "synthetic"
    assert cfg.num_layers == 8 and cfg.num_params > 20 * loading.model_config_only(
        demo_config.get_config()).num_params


def test_the_demo_is_its_own_command_and_no_task_config_carries_it(capsys):
    from configs import math as math_config
    assert "demo" not in math_config.get_config() and "demo" in demo_config.get_config()
    with pytest.raises(UserError, match=r"python -m dasd_jax.demo --config=configs/demo.py"):
        math_config.get_config("demo")
