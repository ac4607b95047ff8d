"""The distribution-shift measure: how far a tuned model has moved from its base, on the base's
own answers to held-out prompts (dasd_jax/shift.py)."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import math as math_config
from dasd_jax import evaluate, losses, model, sampling, sharding, shift, loading, run_config


def softmax_log(logits):
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def test_the_chunked_shift_equals_a_hand_computation():
    keys = jax.random.split(jax.random.PRNGKey(0), 5)
    base_h, tuned_h = (jax.random.normal(k, (2, 7, 8)) for k in keys[:2])
    base_k, tuned_k = (jax.random.normal(k, (8, 11)) for k in keys[2:4])
    targets = jax.random.randint(keys[4], (2, 7), 0, 11)
    found = losses.distribution_shift(base_h, base_k, tuned_h, tuned_k, targets, chunk=3)
    p = softmax_log(np.einsum("btd,dv->btv", base_h, base_k))
    q = softmax_log(np.einsum("btd,dv->btv", tuned_h, tuned_k))
    picked = lambda table: np.take_along_axis(table, np.asarray(targets)[..., None], -1)[..., 0]
    np.testing.assert_allclose(found["kl"], (np.exp(p) * (p - q)).sum(-1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(found["logprob_base"], picked(p), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(found["logprob_tuned"], picked(q), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(found["top1_kept"], p.argmax(-1) == q.argmax(-1))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(config, cfg, params, tokenizer) of the tiny random model, with shift on the synthetic
    task's prompts and its cache in a temporary folder."""
    config = math_config.get_config("tiny")
    config.workdir = str(tmp_path_factory.mktemp("shift"))
    config.eval.update(batch_size=4, prompt_buckets=(64, 128))
    config.eval.shift.update(tasks="synthetic", limit=6, max_new_tokens=12,
                             cache=str(tmp_path_factory.mktemp("cache")))
    config = run_config.resolve(config)
    cfg, params, tokenizer = loading.load_model(config, sharding.make_mesh((1, 1, 1),
                                                                          jax.devices()[:1]))
    return config, cfg, params, tokenizer


def perturbed(params, scale=0.05, seed=1):
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree.unflatten(tree, [x + scale * jax.random.normal(k, x.shape, x.dtype)
                                     for x, k in zip(leaves, keys)])


@pytest.mark.slow
def test_a_model_against_itself_has_moved_nowhere(tiny):
    config, cfg, params, tokenizer = tiny
    answered = shift.base_answers(config, cfg, params, tokenizer)
    lines, summary = shift.measure(config, (cfg, params), (cfg, params), answered)
    assert len(lines) == 6 and summary["synthetic"]["prompts"] == 6
    for name in shift.MEASURES:
        assert abs(summary["synthetic"][name]) < 1e-6


@pytest.mark.slow
def test_a_perturbed_model_matches_the_kl_of_its_logits(tiny):
    config, cfg, params, tokenizer = tiny
    other = perturbed(params)
    answered = shift.base_answers(config, cfg, params, tokenizer)
    lines, summary = shift.measure(config, (cfg, params), (cfg, other), answered)
    for line, row in zip(lines, answered):
        tokens = jnp.asarray([row["prompt_ids"] + row["answer_ids"]])
        p = softmax_log(np.asarray(model.forward(cfg, params, tokens), np.float64)[0])
        q = softmax_log(np.asarray(model.forward(cfg, other, tokens), np.float64)[0])
        span = slice(len(row["prompt_ids"]) - 1, tokens.shape[1] - 1)
        kl = (np.exp(p[span]) * (p[span] - q[span])).sum(-1).mean()
        answer = np.asarray(row["answer_ids"])
        nll = (np.take_along_axis(p[span], answer[:, None], -1)
               - np.take_along_axis(q[span], answer[:, None], -1)).mean()
        changed = 1 - np.mean(p[span].argmax(-1) == q[span].argmax(-1))
        assert line["kl"] == pytest.approx(kl, rel=1e-3, abs=1e-6) and line["kl"] > 0
        assert line["delta_nll"] == pytest.approx(nll, rel=1e-3, abs=1e-5)
        assert line["top1_changed"] == pytest.approx(changed)
    values = np.asarray([line["kl"] for line in lines])
    assert summary["synthetic"]["kl"] == pytest.approx(values.mean())
    assert summary["synthetic"]["kl_se"] == pytest.approx(values.std(ddof=1) / np.sqrt(6))


@pytest.mark.slow
def test_the_base_answers_are_cached_for_the_same_base_only(tiny, monkeypatch):
    config, cfg, params, tokenizer = tiny
    first = shift.base_answers(config, cfg, params, tokenizer)
    calls = []
    real = sampling.generate_all
    monkeypatch.setattr(sampling, "generate_all", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert shift.base_answers(config, cfg, params, tokenizer) == first and calls == []
    shift.base_answers(config, cfg, perturbed(params, scale=1e-3), tokenizer)
    assert calls == [1]  # another base: its own answers
    other_prompts = run_config.replaced_fields(config, {"eval.shift.limit": 5})
    assert len(shift.base_answers(other_prompts, cfg, params, tokenizer)) == 5
    assert calls == [1, 1]
    assert len(list(Path(config.eval.shift.cache).glob("base_answers_*.jsonl"))) == 3


@pytest.mark.slow
def test_evaluate_writes_the_shift_beside_the_accuracies(tiny):
    config = run_config.mutable(tiny[0])
    config.eval.update(tasks="synthetic", checkpoint="base", baseline="", limit=2,
                       max_new_tokens=8)
    summary = evaluate.evaluate(config)
    assert summary["shift"]["synthetic"]["kl"] == pytest.approx(0.0, abs=1e-6)
    output = Path(config.eval.output)
    written = json.loads((output / "summary.json").read_text())
    assert written["shift"] == summary["shift"] and "synthetic" in written["tasks"]
    lines = (output / "shift.jsonl").read_text()
    assert len(lines.splitlines()) == 6
