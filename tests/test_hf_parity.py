"""The JAX decoder computes what the transformers checkpoint computes, both ways."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from dasd_jax import hf, model
from tests import tiny_models

SEQ_LEN = 320  # RoPE and sliding-window bugs hide at short lengths
PARITY = 1e-4

jitted_forward = jax.jit(model.forward, static_argnums=0)


def max_abs_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


@pytest.mark.slow
@pytest.mark.parametrize("variant", sorted(tiny_models.VARIANTS))
def test_logits_match_transformers_and_export_loads_back(variant, checkpoint_dir, tmp_path):
    directory = checkpoint_dir(variant)
    tokens = tiny_models.random_tokens(2, SEQ_LEN)
    expected = tiny_models.torch_logits(directory, tokens)

    cfg, params = hf.load(directory, dtype=jnp.float32)
    logits = jitted_forward(cfg, params, jnp.asarray(tokens))
    assert logits.shape == expected.shape
    assert max_abs_diff(logits, expected) <= PARITY

    exported = hf.save(tmp_path / "export", cfg, params)
    assert max_abs_diff(tiny_models.torch_logits(exported, tokens), logits) <= PARITY
    reloaded_cfg, reloaded = hf.load(exported)
    assert reloaded_cfg == cfg
    jax.tree.map(np.testing.assert_array_equal, reloaded, params)


def test_config_reads_the_checkpoint_architecture(checkpoint_dir):
    cfg, _ = hf.load(checkpoint_dir("qwen3"))
    assert (cfg.model_type, cfg.head_dim, cfg.qk_norm, cfg.qkv_bias) == ("qwen3", 32, True, False)
    cfg, _ = hf.load(checkpoint_dir("qwen2"))
    assert (cfg.qkv_bias, cfg.out_bias, cfg.tie_word_embeddings, cfg.rope_theta) == (
        True, False, True, 1e6)
    cfg, params = hf.load(checkpoint_dir("llama3_tied"))
    assert (cfg.rope_type, cfg.rope_factor, cfg.rope_original_max_position) == ("llama3", 8.0, 64)
    assert "lm_head" not in params
    cfg, _ = hf.load(checkpoint_dir("mistral"))
    assert cfg.sliding_window == 96


def test_legacy_rope_theta_and_rope_scaling_fields_are_read(checkpoint_dir, tmp_path):
    directory = checkpoint_dir("llama3_tied")
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    for file in directory.iterdir():
        (legacy / file.name).write_bytes(file.read_bytes())
    config = json.loads((directory / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = rope
    (legacy / "config.json").write_text(json.dumps(config))
    assert hf.load(legacy)[0] == hf.load(directory)[0]


def test_sharded_export_writes_an_index_that_transformers_and_load_read(checkpoint_dir, tmp_path):
    cfg, params = hf.load(checkpoint_dir("llama"))
    exported = hf.save(tmp_path / "sharded", cfg, params, max_shard_bytes=64 * 1024)
    shards = sorted(p.name for p in exported.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and not (exported / "model.safetensors").exists()
    index = json.loads((exported / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards

    tokens = tiny_models.random_tokens(1, 64)
    expected = tiny_models.torch_logits(checkpoint_dir("llama"), tokens)
    assert max_abs_diff(tiny_models.torch_logits(exported, tokens), expected) <= PARITY
    _, reloaded = hf.load(exported)
    jax.tree.map(np.testing.assert_array_equal, reloaded, params)


def test_bfloat16_export_keeps_bfloat16_on_disk(checkpoint_dir, tmp_path):
    cfg, params = hf.load(checkpoint_dir("qwen2"), dtype=jnp.bfloat16)
    exported = hf.save(tmp_path / "bf16", cfg, params)
    assert json.loads((exported / "config.json").read_text())["dtype"] == "bfloat16"
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(str(exported))
    assert str(torch_model.dtype) == "torch.bfloat16"


def test_bfloat16_compute_stays_close_to_float32(checkpoint_dir):
    directory = checkpoint_dir("llama")
    tokens = jnp.asarray(tiny_models.random_tokens(2, SEQ_LEN))
    cfg32, params32 = hf.load(directory, dtype=jnp.float32)
    cfg16 = cfg32.replace(dtype=jnp.bfloat16)
    reference = jitted_forward(cfg32, params32, tokens)
    mixed = jitted_forward(cfg16, params32, tokens)
    assert mixed.dtype == jnp.bfloat16
    assert max_abs_diff(mixed, reference) <= 2e-2 * max(1.0, float(jnp.max(jnp.abs(reference))))


def test_end_of_sequence_ids_join_config_and_generation_config(checkpoint_dir, tmp_path):
    cfg, params = hf.load(checkpoint_dir("llama"))
    exported = hf.save(tmp_path / "eos", cfg.replace(eos_token_ids=(2,)), params)
    (exported / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7, 9]}))
    assert hf.load(exported)[0].eos_token_ids == (2, 7, 9)
