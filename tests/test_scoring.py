"""Scoring shared by every task: multiple-choice predictions and accuracies, pass@k, and
log-likelihood requests tokenized as lm-eval's hf model does."""

import pytest

from dasd_jax import char_tokenizer
from dasd_jax.errors import UserError
from dasd_jax.tasks import scoring


def test_acc_picks_the_likeliest_choice_and_acc_norm_the_likeliest_per_character():
    assert scoring.prediction([-10.0, -12.0], [5, 20]) == (0, 1)   # -2.0 vs -0.6 per char
    assert scoring.prediction([-3.0, -9.0, -4.0], [4, 4, 4]) == (0, 0)


def test_prediction_rejects_mismatched_or_empty_lengths():
    with pytest.raises(ValueError):
        scoring.prediction([-1.0, -2.0], [3])
    with pytest.raises(ValueError):
        scoring.prediction([-1.0, -2.0], [3, 0])


def test_summarize_reports_acc_and_acc_norm_per_task_with_counts():
    items = [{"task": "piqa", "label": 0}, {"task": "piqa", "label": 1},
             {"task": "boolq", "label": 1}]
    summary = scoring.summarize_choices(items, [(0, 1), (0, 1), (1, 1)])
    assert summary["piqa"] == {"acc": 0.5, "acc_norm": 0.5, "correct": 1, "correct_norm": 1,
                               "count": 2}
    assert summary["boolq"] == {"acc": 1.0, "acc_norm": 1.0, "correct": 1, "correct_norm": 1,
                                "count": 1}
    assert list(summary) == ["piqa", "boolq"]  # in the order they come


@pytest.mark.parametrize("n, c, k, expected", [
    (5, 2, 1, 0.4),          # pass@1 is the fraction correct
    (5, 0, 3, 0.0),
    (5, 2, 5, 1.0),          # k = n: passes if any sample did
    (5, 5, 1, 1.0),
    (4, 1, 2, 0.5),          # 1 - C(3,2)/C(4,2) = 1 - 3/6
    (10, 3, 4, 1 - 35 / 210),  # 1 - C(7,4)/C(10,4)
])
def test_pass_at_k_matches_hand_values(n, c, k, expected):
    assert scoring.pass_at_k(n, c, k) == pytest.approx(expected)


def test_pass_at_k_is_stable_for_many_samples_and_rejects_k_above_n():
    assert scoring.pass_at_k(1000, 1, 1) == pytest.approx(0.001)
    assert 0.0 < scoring.pass_at_k(10_000, 1, 10) < 1.0
    with pytest.raises(UserError, match="k <= n"):
        scoring.pass_at_k(3, 1, 5)


def test_a_pair_is_split_where_the_contexts_own_encoding_ends_and_its_spaces_move_on():
    tokenizer = char_tokenizer.build()
    context, continuation = scoring.encode_pair(tokenizer, "Answer: ", "no")
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
    assert context == ids("Answer:") and continuation == ids(" no")
    assert scoring.encode_pair(tokenizer, "Answer:", " no", "always")[0][0] == \
        tokenizer.bos_token_id
    assert scoring.encode_pair(tokenizer, "Answer:", " no", "never")[0] == ids("Answer:")
