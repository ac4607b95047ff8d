"""Tiny random Hugging Face models of every supported family, made on the spot with torch.

Weights are redrawn at a larger scale than HF's init (and norms away from 1, biases away from 0),
so a misplaced norm, bias, transpose or RoPE detail changes the logits visibly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import transformers

COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=256, max_position_embeddings=1024,
              rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)

VARIANTS = {
    # GQA, a non-default rope_theta, untied head.
    "llama": (transformers.LlamaConfig, dict(
        rope_parameters={"rope_type": "default", "rope_theta": 31337.0},
        tie_word_embeddings=False)),
    # Llama 3.2 style: llama3 rope scaling, tied embeddings.
    "llama3_tied": (transformers.LlamaConfig, dict(
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 64},
        tie_word_embeddings=True)),
    # Llama with attention and MLP biases.
    "llama_bias": (transformers.LlamaConfig, dict(
        rope_parameters={"rope_type": "linear", "rope_theta": 20000.0, "factor": 2.0},
        attention_bias=True, mlp_bias=True)),
    # Qwen2.5 style: q/k/v bias, tied embeddings.
    "qwen2": (transformers.Qwen2Config, dict(
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        tie_word_embeddings=True)),
    # Qwen3: q/k RMSNorm, head_dim (32) != hidden / heads (16), untied.
    "qwen3": (transformers.Qwen3Config, dict(
        head_dim=32, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        tie_word_embeddings=False)),
    # Mistral with a sliding window shorter than the test input.
    "mistral": (transformers.MistralConfig, dict(
        sliding_window=96, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        tie_word_embeddings=False)),
}


def make_tiny_model(variant: str, seed: int = 0) -> transformers.PreTrainedModel:
    config_class, extra = VARIANTS[variant]
    config = config_class(**{**COMMON, **extra})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(0.1 * torch.randn_like(param))
            elif "embed_tokens" in name:
                param.copy_(torch.randn_like(param))
            else:
                param.copy_(0.15 * torch.randn_like(param))
    return model.eval()


def save_tiny_model(variant: str, directory: Path, seed: int = 0) -> Path:
    make_tiny_model(variant, seed).save_pretrained(directory)
    return directory


def torch_logits(directory_or_model, tokens: np.ndarray) -> np.ndarray:
    """float32[B, T, V] logits of the transformers model (loaded from a directory if given one)."""
    model = directory_or_model
    if not isinstance(model, torch.nn.Module):
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(directory_or_model), dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


def random_tokens(batch: int, length: int, vocab: int = 256, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, vocab, size=(batch, length), dtype=np.int32)
