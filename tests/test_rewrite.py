"""`python -m dasd_jax.rewrite`: offline on the tiny variant, resumable, and its output trains."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from dasd_jax import data, loading, model, rewrite, run_config, sampling, sharding, train
from dasd_jax.errors import UserError
from dasd_jax.tasks import answers
from configs import math as math_config

REPO = Path(__file__).resolve().parents[1]


def tiny_config(workdir, **rewrite_settings):
    config = math_config.get_config("tiny")
    config.workdir = str(workdir)
    config.rewrite.update(generated_examples=12, batch_size=4, max_new_tokens=24,
                          **rewrite_settings)
    return config


def read_lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.subprocess
def test_tiny_rewrite_runs_offline_and_its_output_trains_unchanged(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "dasd_jax.rewrite", "--config=configs/math.py:tiny",
         f"--config.workdir={tmp_path}", "--config.rewrite.generated_examples=8",
         "--config.rewrite.batch_size=4", "--config.rewrite.max_new_tokens=16"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = read_lines(tmp_path / "rewrites.jsonl")
    assert len(lines) == 8 and len({line["id"] for line in lines}) == 8
    for line in lines:  # a random model never finishes: every record falls back, fully scored
        assert line["source"] == "reference" and line["fallback_reason"] == "unfinished"
        assert line["response"] == line["reference"] and isinstance(line["rejected_rewrite"], str)
        assert len(line["ref_logprob"]) == len(line["base_logprob"]) == len(line["response_ids"])
        assert len(line["ref_logprob_base_choice"]) == len(line["ref_top1"]) == len(
            line["response_ids"])
    summary = json.loads((tmp_path / "rewrites.jsonl.summary.json").read_text())
    assert summary["records"] == 8 and summary["fallback_reasons"] == {"unfinished": 8}

    config = math_config.get_config("tiny")
    config.workdir = str(tmp_path)
    config.data.update(path="{workdir}/rewrites.jsonl", target="response")
    config.train.update(steps=6, warmup_steps=1, batch_size=8, base_confidence="cached")
    config.checkpoint.export = False
    last = train.train(config)
    assert np.isfinite(last["loss"]) and last["kept_ratio"] > 0


@pytest.mark.slow
def test_kept_rewrites_carry_the_decoder_signals_aligned_to_their_tokens(tmp_path, monkeypatch):
    # The judge is the task's answer check; a random model never passes it, so accept all here
    # to follow a kept rewrite through the bookkeeping.
    monkeypatch.setattr(rewrite, "_judge", lambda *args: None)
    config = tiny_config(tmp_path, mode="dasd", alpha=0.5, candidate_top_k=4)
    summary = rewrite.rewrite(config)
    assert summary["kept"] == summary["records"] == 12 and summary["acceptance_rate"] == 1.0
    assert 1 <= summary["mean_n_candidates"] <= 4 and summary["kept_high_ppl_10"] is not None

    one_device = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    cfg, params, tokenizer = loading.load_model(config, one_device)
    for line in read_lines(tmp_path / "rewrites.jsonl")[:3]:
        assert line["source"] == "rewrite"
        assert len(line["n_candidates"]) == len(line["response_ids"])
        assert line["response"] == tokenizer.decode(
            [t for t in line["response_ids"] if t not in cfg.eos_token_ids],
            skip_special_tokens=True)
        base_prompt = data.prompt_tokens(line["prompt"], tokenizer, config.data)
        reference_prompt = data.prompt_tokens(answers.REWRITE_TEMPLATES["synthetic"].format(
            prompt=line["prompt"], reference=line["reference"]), tokenizer, config.data)
        (ref, _), (base, top1) = sampling.score(cfg, params, [reference_prompt, base_prompt],
                                                [line["response_ids"]] * 2)
        np.testing.assert_allclose(line["ref_logprob"], ref, atol=1e-4)
        np.testing.assert_allclose(line["base_logprob"], base, atol=1e-4)
        np.testing.assert_allclose(line["base_top1"], top1, atol=1e-4)
        assert len(line["ref_logprob_base_choice"]) == len(line["response_ids"])


@pytest.mark.slow
def test_sdft_rewrites_get_the_veto_signals_from_teacher_forced_passes(tmp_path, monkeypatch):
    monkeypatch.setattr(rewrite, "_judge", lambda *args: None)
    config = tiny_config(tmp_path, mode="sdft", limit=4)
    rewrite.rewrite(config)
    one_device = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    cfg, params, tokenizer = loading.load_model(config, one_device)
    for line in read_lines(tmp_path / "rewrites.jsonl"):
        assert line["source"] == "rewrite" and line["n_candidates"] is None
        base_prompt = data.prompt_tokens(line["prompt"], tokenizer, config.data)
        reference_prompt = data.prompt_tokens(answers.REWRITE_TEMPLATES["synthetic"].format(
            prompt=line["prompt"], reference=line["reference"]), tokenizer, config.data)
        ids = line["response_ids"]
        base = jax.nn.log_softmax(model.forward(cfg, params, np.asarray([base_prompt + ids]))[0])
        ref = jax.nn.log_softmax(model.forward(cfg, params,
                                               np.asarray([reference_prompt + ids]))[0])
        for t in range(len(ids)):
            choice = int(np.argmax(base[len(base_prompt) - 1 + t]))
            position = len(reference_prompt) - 1 + t
            assert line["ref_logprob_base_choice"][t] == pytest.approx(
                float(ref[position, choice]), abs=1e-4)
            assert line["ref_top1"][t] == pytest.approx(float(ref[position].max()), abs=1e-4)


@pytest.mark.slow
def test_a_rewrite_file_from_before_the_veto_signals_still_trains(tmp_path):
    rewrite.rewrite(tiny_config(tmp_path))
    old = tmp_path / "old.jsonl"
    old.write_text("".join(json.dumps({k: v for k, v in line.items()
                                       if k not in ("ref_logprob_base_choice", "ref_top1")}) + "\n"
                           for line in read_lines(tmp_path / "rewrites.jsonl")))
    config = math_config.get_config("tiny")
    config.workdir = str(tmp_path / "train")
    config.data.update(path=str(old), target="response")
    config.train.update(steps=3, warmup_steps=1, batch_size=8)
    config.checkpoint.export = False
    last = train.train(config)
    assert np.isfinite(last["loss"]) and last["correction"] == 0.0  # no r: no correction


@pytest.mark.slow
def test_rerunning_skips_written_ids_and_repairs_a_cut_line(tmp_path):
    rewrite.rewrite(tiny_config(tmp_path, limit=4))
    output = tmp_path / "rewrites.jsonl"
    first = output.read_text()
    with open(output, "a") as file:
        file.write('{"id": "99", "prompt": "cut sh')  # a crash in the middle of a line
    summary = rewrite.rewrite(tiny_config(tmp_path, limit=8))
    text = output.read_text()
    assert text.startswith(first) and summary["records"] == 8
    assert [line["id"] for line in read_lines(output)] == [str(i) for i in range(8)]


@pytest.mark.slow
def test_an_output_from_other_settings_is_not_appended_to(tmp_path):
    rewrite.rewrite(tiny_config(tmp_path, limit=2))
    with pytest.raises(UserError, match=r"written with other settings \(mode differ\); refusing"):
        rewrite.rewrite(tiny_config(tmp_path, limit=2, mode="sdft"))


@pytest.mark.slow
def test_empty_references_and_overlong_prompts_are_counted_and_named(tmp_path):
    records = [{"question": "What is 2 + 2?", "answer": "2 + 2 = 4. The answer is 4."},
               {"question": "What is 3 + 3?", "answer": "  "},
               {"question": "x" * 500, "answer": "The answer is 1."}]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in records))
    config = tiny_config(tmp_path, input=str(source))
    config.rewrite.fields.update(prompt="question", reference="answer")
    summary = rewrite.rewrite(config)
    assert summary["records"] == 1
    assert summary["skipped_this_run"] == {"empty_reference": 1, "prompt_too_long": 1}
    assert summary["skipped_ids"] == {"empty_reference": ["1"], "prompt_too_long": ["2"]}


def test_a_missing_input_field_names_the_flag_to_map_it(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"question": "Q", "solution": "S"}) + "\n")
    config = tiny_config(tmp_path, input=str(source))
    config.rewrite.fields.update(prompt="question", reference="answer")
    with pytest.raises(UserError, match=r"line 1: record has no field 'answer' for the reference.*"
                                        r"--config.rewrite.fields.reference=FIELD"):
        rewrite.rewrite(config)


@pytest.mark.slow
def test_auto_base_confidence_reads_the_signals_of_a_file_this_model_rewrote(tmp_path):
    rewrite.rewrite(tiny_config(tmp_path, limit=4))
    config = math_config.get_config("tiny")
    config.workdir = str(tmp_path)
    config.data.update(path=str(tmp_path / "rewrites.jsonl"), eval_path="", target="response")
    assert config.train.base_confidence == "auto"
    resolved = lambda c: run_config.resolve(c, "train").train.base_confidence
    assert resolved(config) == "cached"
    other = config.copy_and_resolve_references()
    other.seed = 1  # another random model: its signals would not be this one's
    assert resolved(other) == "model"
    config.data.target = "reference"
    assert resolved(config) == "model"
