"""Multiple-choice scores equal lm-eval's, item for item: SmolLM2-135M-Instruct scored by
`evaluate.choice_logliks` and by lm-eval 0.4.13's own `hf` model (transformers, float32) on the
same (context, continuation) requests of every commonsense task, the first items of each.

Skipped, with the reason, without the real checkpoint (`make smollm2`) or ../shared/data.
Tolerance: summed log-likelihoods within 2e-3 (two float32 stacks summing in another order);
predictions (acc and acc_norm) identical.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

from configs import math as math_config
from dasd_jax import evaluate, hf
from dasd_jax.tasks import commonsense, registry, scoring
from dasd_jax.tools import smollm2

CHECKPOINT = Path(os.environ.get("DASD_JAX_SMOLLM2", smollm2.DEFAULT_OUT)).expanduser()
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ITEMS = 4  # per task: the first items, 8-20 (context, continuation) pairs
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not smollm2.is_built(CHECKPOINT),
                       reason=f"no SmolLM2 checkpoint at {CHECKPOINT}: `make smollm2` builds it"),
    pytest.mark.skipif(not DATA.is_dir(), reason=f"{DATA} is not present"),
]


@pytest.fixture(scope="module")
def models():
    cfg, params = hf.load(CHECKPOINT, dtype=jnp.float32)
    tokenizer = hf.load_tokenizer(CHECKPOINT, cfg)
    reference = HFLM(pretrained=str(CHECKPOINT), dtype="float32", device="cpu", batch_size=16)
    return cfg, params, tokenizer, reference


@pytest.mark.parametrize("task", commonsense.TASKS)
def test_predictions_and_logliks_equal_lm_evals_hf_model(models, task):
    cfg, params, tokenizer, reference = models
    path = commonsense.default_paths(DATA)[task]
    if not Path(path).exists():
        pytest.skip(f"{path} is not present")
    items = commonsense.load(task, path, limit=ITEMS)
    config = math_config.get_config()
    config.eval.update(batch_size=8, prompt_buckets=(64, 128, 256, 512, 1024))
    ours = evaluate.choice_logliks(config, cfg, params, tokenizer, registry.eval_task(task),
                                   items)
    requests = [Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=0)
                for item in items for pair in commonsense.choice_pairs(item)]
    theirs = iter(loglik for loglik, _ in reference.loglikelihood(requests, disable_tqdm=True))
    for item, scored in zip(items, ours):
        expected = [next(theirs) for _ in scored]
        found = [loglik for loglik, _ in scored]
        np.testing.assert_allclose(found, expected, atol=2e-3, err_msg=f"{task} {item['id']}")
        lengths = commonsense.choice_lengths(item)
        assert (scoring.prediction(found, lengths)
                == scoring.prediction(expected, lengths)), f"{task} {item['id']}"
