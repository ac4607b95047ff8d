"""Every bad checkpoint or tokenizer input gets one message naming the input and the fix."""

import json
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from dasd_jax import char_tokenizer, hf
from dasd_jax.errors import CheckpointError


@pytest.fixture
def llama_copy(checkpoint_dir, tmp_path):
    """A writable copy of the tiny llama checkpoint."""
    copy = tmp_path / "llama"
    shutil.copytree(checkpoint_dir("llama"), copy)
    return copy


def edit_config(directory, **changes):
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


def edit_tensors(directory, edit):
    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_missing_config_json(llama_copy):
    (llama_copy / "config.json").unlink()
    with pytest.raises(CheckpointError,
                       match=r"has no config.json; pass a Hugging Face checkpoint"):
        hf.load(llama_copy)


def test_unsupported_model_type_lists_the_supported_ones(llama_copy):
    edit_config(llama_copy, model_type="gpt2")
    with pytest.raises(CheckpointError, match=r"'gpt2' is not supported; supported model types: "
                                              r"llama, qwen2, qwen3, mistral"):
        hf.load(llama_copy)


def test_missing_tensor_is_named_with_its_shape(llama_copy):
    edit_tensors(llama_copy, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor model.layers.1.mlp.up_proj.weight "
                                              r"\(expected shape \[96, 64\]\)"):
        hf.load(llama_copy)


def test_unexpected_tensor_is_named(llama_copy):
    edit_tensors(llama_copy, lambda t: t.update(
        {"model.layers.0.self_attn.extra.weight": np.zeros((3, 3), np.float32)}))
    with pytest.raises(CheckpointError,
                       match=r"unexpected tensor model.layers.0.self_attn.extra.weight"):
        hf.load(llama_copy)


def test_misshaped_tensor_says_expected_and_found(llama_copy):
    edit_tensors(llama_copy, lambda t: t.update(
        {"model.layers.0.self_attn.k_proj.weight": np.zeros((64, 64), np.float32)}))
    with pytest.raises(CheckpointError, match=r"tensor model.layers.0.self_attn.k_proj.weight has "
                                              r"shape \[64, 64\], expected \[32, 64\]"):
        hf.load(llama_copy)


def test_wrong_layer_count_names_every_problem(llama_copy):
    edit_config(llama_copy, num_hidden_layers=3)
    with pytest.raises(CheckpointError, match=r"3 layers(.|\n)*missing tensor model.layers.2."):
        hf.load(llama_copy)


def test_pickle_checkpoints_are_refused_with_a_conversion_hint(llama_copy):
    (llama_copy / "model.safetensors").unlink()
    (llama_copy / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(CheckpointError, match=r"only pickle weights \(pytorch_model.bin\).*"
                                              r"Convert them to safetensors"):
        hf.load(llama_copy)


def test_remote_code_models_are_refused(llama_copy):
    edit_config(llama_copy, auto_map={"AutoModelForCausalLM": "modeling_x.XForCausalLM"})
    with pytest.raises(CheckpointError, match=r"trust_remote_code\), which dasd_jax never runs"):
        hf.load(llama_copy)


def test_remote_code_tokenizers_are_refused(tmp_path):
    char_tokenizer.build().save_pretrained(tmp_path)
    edit_config_path = tmp_path / "tokenizer_config.json"
    config = json.loads(edit_config_path.read_text())
    config["auto_map"] = {"AutoTokenizer": ["tok.X", None]}
    edit_config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"tokenizer needs custom code"):
        hf.load_tokenizer(tmp_path)


def test_tokenizer_larger_than_the_embedding_table(llama_copy):
    edit_config(llama_copy, vocab_size=64)
    edit_tensors(llama_copy, lambda t: t.update({
        "model.embed_tokens.weight": t["model.embed_tokens.weight"][:64],
        "lm_head.weight": t["lm_head.weight"][:64]}))
    char_tokenizer.build().save_pretrained(llama_copy)
    cfg, _ = hf.load(llama_copy)
    with pytest.raises(CheckpointError, match=r"has 103 tokens but the model's embedding table has "
                                              r"only 64 rows"):
        hf.load_tokenizer(llama_copy, cfg)


@pytest.mark.parametrize("changes, message", [
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}},
     r"rope type 'yarn' is not supported \(supported: default, linear, llama3\)"),
    ({"hidden_act": "gelu"}, r"hidden_act 'gelu' is not supported"),
    ({"quantization_config": {"quant_method": "gptq"}}, r"quantized checkpoints are not supported"),
])
def test_features_the_decoder_would_compute_differently_are_refused(llama_copy, changes, message):
    edit_config(llama_copy, **changes)
    with pytest.raises(CheckpointError, match=message):
        hf.load(llama_copy)


def test_mixed_sliding_and_full_layers_are_refused(llama_copy):
    edit_config(llama_copy, model_type="qwen2", use_sliding_window=True, sliding_window=64,
                max_window_layers=1)
    with pytest.raises(CheckpointError, match=r"mixes sliding-window and full-attention layers"):
        hf.load(llama_copy)


def test_hub_ids_fail_at_once_offline_with_a_local_directory_hint():
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=r"Qwen/Qwen2.5-0.5B is not a local directory.*"
                                              r"hf download Qwen/Qwen2.5-0.5B --local-dir DIR"):
        hf.load("Qwen/Qwen2.5-0.5B")
    assert time.perf_counter() - start < 5


def test_a_path_that_is_not_there():
    with pytest.raises(CheckpointError, match=r"no checkpoint directory at ./nowhere/model"):
        hf.load("./nowhere/model")


@pytest.mark.subprocess
def test_the_command_line_prints_the_message_not_a_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "dasd_jax.perplexity", "--checkpoint", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: {tmp_path} has no config.json; pass a Hugging Face "
                                     "checkpoint directory (config.json + *.safetensors)")


def test_a_failed_save_leaves_nothing_behind(checkpoint_dir, tmp_path):
    cfg, params = hf.load(checkpoint_dir("llama"))
    del params["layers"]["mlp"]
    with pytest.raises(KeyError):
        hf.save(tmp_path / "export", cfg, params)
    assert list(tmp_path.iterdir()) == []
