"""KV-cache decoding equals transformers' generate, batching changes nothing, co-decoding's
limits."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from dasd_jax import hf, model, sampling, sharding
from tests import tiny_models

PROMPT_LENGTHS = (5, 23, 11)
NEW = 20


def prompts_for(seed=0):
    return [list(map(int, tiny_models.random_tokens(1, n, seed=seed + n)[0]))
            for n in PROMPT_LENGTHS]


@pytest.mark.slow
@pytest.mark.parametrize("variant", sorted(tiny_models.VARIANTS))
def test_greedy_decoding_of_a_mixed_length_batch_equals_transformers_generate(
        variant, checkpoint_dir):
    directory = checkpoint_dir(variant)
    cfg, params = hf.load(directory)
    prompts = prompts_for()
    decoded = sampling.generate(cfg, params, prompts, sampling.Settings(max_new_tokens=NEW))
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(
        str(directory), attn_implementation="eager").eval()
    for prompt, result in zip(prompts, decoded):
        with torch.no_grad():
            expected = torch_model.generate(torch.tensor([prompt]), max_new_tokens=NEW,
                                            do_sample=False, eos_token_id=None, pad_token_id=0)
        assert result.tokens == expected[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def qwen3(checkpoint_dir):
    return hf.load(checkpoint_dir("qwen3"))


@pytest.mark.slow
def test_a_batch_of_mixed_lengths_equals_each_prompt_decoded_alone(qwen3):
    cfg, params = qwen3
    settings = sampling.Settings(max_new_tokens=NEW)
    together = sampling.generate(cfg, params, prompts_for(), settings)
    for prompt, result in zip(prompts_for(), together):
        alone = sampling.generate(cfg, params, [prompt], settings)[0]
        assert result.tokens == alone.tokens
        np.testing.assert_allclose(result.logprobs, alone.logprobs, atol=1e-5)


@pytest.mark.slow
def test_recorded_logprobs_equal_a_teacher_forced_forward(qwen3):
    cfg, params = qwen3
    prompts = prompts_for()
    settings = sampling.Settings(max_new_tokens=NEW, temperature=1.0, top_k=20)
    for prompt, result in zip(prompts, sampling.generate(cfg, params, prompts, settings,
                                                         jax.random.PRNGKey(7))):
        sequence = jnp.asarray([prompt + result.tokens])
        log_probs = jax.nn.log_softmax(jax.jit(model.forward, static_argnums=0)(
            cfg, params, sequence)[0], -1)
        forced = [float(log_probs[len(prompt) - 1 + i, token])
                  for i, token in enumerate(result.tokens)]
        np.testing.assert_allclose(result.logprobs, forced, atol=1e-4)


@pytest.mark.slow
def test_decoding_stops_at_any_end_of_sequence_id(qwen3):
    cfg, params = qwen3
    prompt = prompts_for()[1]
    free = sampling.generate(cfg, params, [prompt], sampling.Settings(max_new_tokens=NEW))[0]
    stop = free.tokens[6]
    first = free.tokens.index(stop)
    stopped = sampling.generate(cfg, params, [prompt], sampling.Settings(
        max_new_tokens=NEW, eos_ids=(9999, stop)))[0]
    assert stopped.tokens == free.tokens[:first + 1] and stopped.finished
    assert not free.finished and len(free.tokens) == NEW


@pytest.mark.slow
def test_sampling_is_reproducible_and_respects_top_k(qwen3):
    cfg, params = qwen3
    settings = sampling.Settings(max_new_tokens=NEW, temperature=1.0, top_k=3)
    first = sampling.generate(cfg, params, prompts_for(), settings, jax.random.PRNGKey(1))
    again = sampling.generate(cfg, params, prompts_for(), settings, jax.random.PRNGKey(1))
    other = sampling.generate(cfg, params, prompts_for(), settings, jax.random.PRNGKey(2))
    assert [r.tokens for r in first] == [r.tokens for r in again] != [r.tokens for r in other]
    for prompt, result in zip(prompts_for(), first):
        logits = model.forward(cfg, params, jnp.asarray([prompt + result.tokens]))[0]
        for i, token in enumerate(result.tokens):
            top3 = np.argsort(-np.asarray(logits[len(prompt) - 1 + i]))[:3]
            assert token in top3


def test_filters_keep_the_tokens_they_should():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda **kw: np.isfinite(sampling.filter_logits(logits, sampling.Settings(
        temperature=1.0, **kw)))[0].tolist()
    assert kept(top_k=2) == [True, True, False, False]
    assert kept(top_p=0.8) == [True, True, False, False]  # 0.5 + 0.3 reaches 0.8
    assert kept(top_p=0.81) == [True, True, True, False]
    assert kept(min_p=0.2) == [True, True, True, False]  # p >= 0.2 * 0.5
    assert kept() == [True, True, True, True]


@pytest.mark.slow
def test_codecoding_with_alpha_one_follows_the_reference_context_greedily(qwen3):
    cfg, params = qwen3
    references, bases = prompts_for(0), prompts_for(100)
    decoded = sampling.codecode(cfg, params, references, bases,
                                sampling.Settings(max_new_tokens=NEW, alpha=1.0))
    greedy = sampling.generate(cfg, params, references, sampling.Settings(max_new_tokens=NEW))
    for result, expected in zip(decoded, greedy):
        assert result.tokens == expected.tokens
        assert result.signals["n_candidates"] == [1] * NEW
        np.testing.assert_allclose(result.logprobs, expected.logprobs, atol=1e-5)


def test_codecoding_with_a_tiny_alpha_and_no_cap_follows_the_base_context_greedily(qwen3):
    cfg, params = qwen3
    references, bases = prompts_for(0), prompts_for(100)
    decoded = sampling.codecode(cfg, params, references, bases, sampling.Settings(
        max_new_tokens=NEW, alpha=1e-30, candidate_top_k=0))
    greedy = sampling.generate(cfg, params, bases, sampling.Settings(max_new_tokens=NEW))
    for result, expected in zip(decoded, greedy):
        assert result.tokens == expected.tokens
        np.testing.assert_allclose(result.signals["base_logprob"], expected.logprobs, atol=1e-5)
        assert all(n == cfg.vocab_size for n in result.signals["n_candidates"])


@pytest.mark.slow
def test_codecoding_records_the_signals_training_reads(qwen3):
    cfg, params = qwen3
    references, bases = prompts_for(0), prompts_for(100)
    decoded = sampling.codecode(cfg, params, references, bases,
                                sampling.Settings(max_new_tokens=NEW, alpha=0.3, candidate_top_k=4))
    for reference, base, result in zip(references, bases, decoded):
        assert 1 <= min(result.signals["n_candidates"]) and max(result.signals["n_candidates"]) <= 4
        (ref_logprob, _), (base_logprob, base_top1) = sampling.score(
            cfg, params, [reference, base], [result.tokens, result.tokens])
        np.testing.assert_allclose(result.logprobs, ref_logprob, atol=1e-4)
        np.testing.assert_allclose(result.signals["base_logprob"], base_logprob, atol=1e-4)
        np.testing.assert_allclose(result.signals["base_top1"], base_top1, atol=1e-4)
        # The veto signals, teacher-forced as the rewrite computes them for sdft lines.
        (base_stats,) = sampling.score_stats(cfg, params, [base], [result.tokens], ("argmax",))
        (ref_stats,) = sampling.score_stats(cfg, params, [reference], [result.tokens],
                                            ("top1_logprob", "query_logprob"),
                                            queries=[base_stats["argmax"]])
        np.testing.assert_allclose(result.signals["ref_logprob_base_choice"],
                                   ref_stats["query_logprob"],
                                   atol=1e-4)
        np.testing.assert_allclose(result.signals["ref_top1"], ref_stats["top1_logprob"], atol=1e-4)


@pytest.mark.slow
def test_the_veto_ratio_r_matches_a_hand_computation_from_both_contexts(qwen3):
    """r_t = πref(v0_t) / max πref with v0_t = argmax π0, from two plain forwards."""
    cfg, params = qwen3
    forward = jax.jit(model.forward, static_argnums=0)
    reference, base = prompts_for(0)[1], prompts_for(100)[1]
    (result,) = sampling.codecode(cfg, params, [reference], [base],
                                  sampling.Settings(max_new_tokens=8, alpha=0.2))
    for t, _ in enumerate(result.tokens):
        context = result.tokens[:t]
        base_probs = jax.nn.softmax(forward(cfg, params, jnp.asarray([base + context]))[0, -1])
        ref_probs = jax.nn.softmax(forward(cfg, params, jnp.asarray([reference + context]))[0, -1])
        by_hand = float(ref_probs[int(jnp.argmax(base_probs))] / jnp.max(ref_probs))
        recorded = float(np.exp(result.signals["ref_logprob_base_choice"][t]
                                - result.signals["ref_top1"][t]))
        assert recorded == pytest.approx(by_hand, rel=1e-3, abs=1e-6)
        assert (by_hand < 0.2) == (int(jnp.argmax(base_probs)) != result.tokens[t]) or \
            result.signals["n_candidates"][t] == 8  # r < alpha: the base's choice no candidate


@pytest.mark.slow
def test_decoding_on_a_mesh_shards_the_cache_and_changes_nothing(checkpoint_dir, qwen3):
    cfg, params = qwen3
    mesh = sharding.make_mesh((2, 2, 2))
    _, sharded = hf.load(checkpoint_dir("qwen3"), mesh=mesh)
    prompts = prompts_for() + prompts_for(50)[:1]  # 4 rows: one per data x fsdp shard
    settings = sampling.Settings(max_new_tokens=NEW)
    with sharding.activation_rules(mesh):
        on_mesh = sampling.generate(cfg, sharded, prompts, settings)
    plain = sampling.generate(cfg, params, prompts, settings)
    assert [r.tokens for r in on_mesh] == [r.tokens for r in plain]


def test_stop_ids_join_the_model_and_tokenizer_end_of_sequence_ids(qwen3):
    cfg, _ = qwen3
    cfg = cfg.replace(eos_token_ids=(2, 7))
    tokenizer = type("Tokenizer", (), {"eos_token_id": 9})()
    assert sampling.stop_ids(cfg, tokenizer) == (2, 7, 9)
    tokenizer.eos_token_id = 7
    assert sampling.stop_ids(cfg, tokenizer) == (2, 7)


@pytest.mark.slow
def test_continuous_batching_refills_finished_rows_and_changes_no_result(qwen3):
    cfg, params = qwen3
    prompts = prompts_for(0) + prompts_for(7) + prompts_for(31)  # 9 prompts of mixed lengths
    free_running = sampling.generate(cfg, params, prompts, sampling.Settings(max_new_tokens=NEW))
    # An end-of-sequence id that the rows emit at different steps (some never).
    counts = {}
    for result in free_running:
        for step, token in enumerate(result.tokens[:NEW // 2]):
            counts.setdefault(token, set()).add(step)
    eos = max(counts, key=lambda token: len(counts[token]))
    settings = sampling.Settings(max_new_tokens=NEW, eos_ids=(eos,))
    alone = [sampling.generate(cfg, params, [p], settings)[0] for p in prompts]
    assert len({len(r.tokens) for r in alone}) > 2  # rows really end at different times
    together = sampling.generate_all(cfg, params, prompts, settings, batch_size=3)
    for expected, result in zip(alone, together):
        assert result.tokens == expected.tokens and result.finished == expected.finished
        np.testing.assert_allclose(result.logprobs, expected.logprobs, atol=1e-5)
    at_once = sampling.codecode(cfg, params, prompts, prompts[::-1], settings)
    streamed = dict(sampling.codecode_all(cfg, params, prompts, prompts[::-1], settings,
                                          batch_size=4))
    assert sorted(streamed) == list(range(len(prompts)))
    for index, expected in enumerate(at_once):
        assert streamed[index].tokens == expected.tokens
        assert streamed[index].signals["n_candidates"] == expected.signals["n_candidates"]


@pytest.mark.slow
def test_a_sure_reference_is_the_only_candidate(qwen3):
    cfg, params = qwen3
    references, bases = prompts_for(0), prompts_for(100)
    loose = sampling.Settings(max_new_tokens=NEW, alpha=0.01, candidate_top_k=0)
    sure = dataclasses.replace(loose, sure_reference=0.065)  # about the median top-1 here
    wide = sampling.codecode(cfg, params, references, bases, loose)
    narrow = sampling.codecode(cfg, params, references, bases, sure)
    assert max(max(r.signals["n_candidates"]) for r in wide) > 1
    sure_steps = 0
    for result in narrow:  # the steps where the reference is that sure have one candidate
        for count, top in zip(result.signals["n_candidates"], result.signals["ref_top1"]):
            assert count == 1 or np.exp(top) < 0.065
            sure_steps += bool(np.exp(top) >= 0.065)
    assert 0 < sure_steps < sum(len(r.tokens) for r in narrow)
