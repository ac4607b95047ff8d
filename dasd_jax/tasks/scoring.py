"""Scoring shared by every task: multiple choice as lm-eval scores it, and pass@k.

    context_ids, continuation_ids = scoring.encode_pair(tokenizer, context, continuation)
    pick, pick_norm = scoring.prediction(logliks, lengths)          # acc's and acc_norm's choice
    scoring.summarize_choices(items, predictions)    # {task: {"acc", "acc_norm", ...}}
    scoring.pass_at_k(n=10, c=3, k=1)                 # the unbiased estimator (Codex paper)
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from dasd_jax.errors import UserError

BOS_MODES = ("tokenizer", "always", "never")


def encode_pair(tokenizer, context: str, continuation: str,
                bos: str = "tokenizer") -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval's `hf` model encodes a log-likelihood request:
    the context's trailing spaces move to the continuation, the whole text is encoded and the
    continuation is what follows the context's own encoding (so a token that spans the border
    counts as the continuation's). bos: "tokenizer" adds what the tokenizer's encode() adds by
    itself (lm-eval's default: Llama 3's tokenizer adds its BOS, SmolLM2's and Qwen's none);
    "always" puts the BOS token first where that adds none (models trained to expect it);
    "never" adds no special token (`eval.bos`, checked by dasd_jax/validation.py)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation

    def encode(text: str) -> list[int]:
        ids = tokenizer(text, add_special_tokens=bos == "tokenizer")["input_ids"]
        first = tokenizer.bos_token_id
        if bos == "always" and first is not None and ids[:1] != [first]:
            ids = [first] + ids
        return ids

    whole, context_ids = encode(context + continuation), encode(context)
    return context_ids, whole[len(context_ids):]


def prediction(logliks: Sequence[float], lengths: Sequence[int]) -> tuple[int, int]:
    """(argmax of log-likelihood: `acc`'s pick, argmax of log-likelihood / length: `acc_norm`'s
    pick). logliks: float[C], summed log p(continuation | context); lengths: int[C], from
    the task's `choice_lengths`. Ties go to the lower index, as numpy's argmax."""
    logliks, lengths = np.asarray(logliks, np.float64), np.asarray(lengths, np.float64)
    if logliks.ndim != 1 or logliks.shape != lengths.shape or logliks.size == 0:
        raise ValueError(f"prediction needs one log-likelihood and one length per choice; got "
                         f"{logliks.shape} and {lengths.shape}")
    if (lengths <= 0).any():
        raise ValueError(f"choice lengths must be positive, got {lengths.tolist()}")
    return int(np.argmax(logliks)), int(np.argmax(logliks / lengths))


def choice_accuracy(labels: Sequence[int], predictions: Sequence[tuple[int, int]]) -> dict:
    """{"acc", "acc_norm", "correct", "correct_norm", "count"} of (acc pick, acc_norm pick)
    predictions against the right choices' `labels`."""
    if len(labels) != len(predictions):
        raise ValueError(f"{len(labels)} labels but {len(predictions)} predictions")
    correct = sum(int(pick == label) for label, (pick, _) in zip(labels, predictions))
    correct_norm = sum(int(pick == label) for label, (_, pick) in zip(labels, predictions))
    count = max(len(labels), 1)
    return {"acc": correct / count, "acc_norm": correct_norm / count, "correct": correct,
            "correct_norm": correct_norm, "count": len(labels)}


def summarize_choices(items: Sequence[dict], predictions: Sequence[tuple[int, int]]) -> dict:
    """`choice_accuracy` per task of items with "task" and "label", tasks in the order they
    come."""
    if len(items) != len(predictions):
        raise ValueError(f"{len(items)} items but {len(predictions)} predictions")
    grouped: dict[str, tuple[list, list]] = {}
    for item, predicted in zip(items, predictions):
        labels, picks = grouped.setdefault(item["task"], ([], []))
        labels.append(item["label"])
        picks.append(predicted)
    return {task: choice_accuracy(labels, picks) for task, (labels, picks) in grouped.items()}


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimate from n samples of which c passed: 1 - C(n-c, k) / C(n, k),
    computed as 1 - prod_{i=n-c+1}^{n} (1 - k / i) (Chen et al. 2021), stable for large n."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise UserError(f"pass@k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k} "
                        "(draw at least k samples per problem)")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))
