"""`python -m dasd_jax.perplexity` runs end to end on the embedded default, as a real process."""

import json
import math
import subprocess
import sys

import pytest

from dasd_jax import hf, perplexity


@pytest.mark.slow
@pytest.mark.subprocess
def test_embedded_default_writes_a_checkpoint_and_scores_text(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "dasd_jax.perplexity", "--cache_dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    checkpoint = tmp_path / "tiny-random-llama"
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    perplexity_line = next(line for line in result.stdout.splitlines()
                           if line.startswith("perplexity"))
    value = float(perplexity_line.split()[1])
    # A random model is close to uniform over its 128-token vocabulary.
    assert 0.5 * 128 < value < 2 * 128


@pytest.mark.slow
def test_perplexity_is_exp_of_the_mean_negative_log_likelihood(tmp_path):
    checkpoint = perplexity.embedded_checkpoint(tmp_path / "ckpt")
    result = perplexity.main(["--checkpoint", str(checkpoint), "--text", "2+2=4"])
    assert result["tokens"] == 5  # <s> prepended, 5 characters scored
    assert math.isclose(result["perplexity"], math.exp(result["mean_nll"]), rel_tol=1e-6)
    tokenizer = hf.load_tokenizer(checkpoint)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == (
        "<|user|>hi</s>")
