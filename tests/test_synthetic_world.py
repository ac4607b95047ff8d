"""The demo world of tasks/synthetic.py: problems, the two solution styles, and its record sets."""

from __future__ import annotations

import random
import re

import pytest

from dasd_jax.char_tokenizer import DEFAULT_ALPHABET
from dasd_jax.tasks import answers, synthetic

OPERATIONS = {"add": lambda a, b: a + b, "minus": lambda a, b: a - b, "times": lambda a, b: a * b}
SYMBOLS = {"add": "+", "minus": "-", "times": "*"}


def parse_prompt(prompt: str) -> tuple[int, list[tuple[str, int]]]:
    """ "Q: start 7, add 5, times 2." -> (7, [("add", 5), ("times", 2)])"""
    match = re.fullmatch(r"Q: start (\d+)((?:, (?:add|minus|times) \d+)+)\.", prompt)
    assert match, prompt
    steps = re.findall(r", (add|minus|times) (\d+)", match.group(2))
    return int(match.group(1)), [(operation, int(operand)) for operation, operand in steps]


def chain_values(start: int, steps: list[tuple[str, int]]) -> list[int]:
    values = [start]
    for operation, operand in steps:
        values.append(OPERATIONS[operation](values[-1], operand))
    return values


def problem_of(prompt: str) -> str:
    """The plain problem of a plain or answer-aware prompt (its first line)."""
    return prompt.split("\n", 1)[0]


def test_every_record_set_is_deterministic_per_seed():
    for make in (lambda seed: synthetic.pretraining_records(60, seed),
                 lambda seed: synthetic.finetune_records(30, seed),
                 lambda seed: synthetic.eval_records(30, seed, "easy"),
                 lambda seed: synthetic.eval_records(30, seed, "hard")):
        assert make(0) == make(0)
        assert make(0) != make(1)


@pytest.mark.parametrize("difficulty", ["easy", "hard"])
def test_problems_respect_their_difficulty_and_the_answer_evaluates_the_chain(difficulty):
    spec = synthetic.DIFFICULTIES[difficulty]
    operand_ranges = {"add": (1, spec.max_operand), "minus": (1, spec.max_operand),
                      "times": (2, spec.max_operand)}
    records = synthetic.eval_records(300, 0, difficulty)
    for record in records:
        start, steps = parse_prompt(record["prompt"])
        values = chain_values(start, steps)
        assert spec.steps[0] <= len(steps) <= spec.steps[1]
        assert spec.start[0] <= start <= spec.start[1]
        assert all(0 <= value <= spec.max_value for value in values)
        for operation, operand in steps:
            low, high = operand_ranges[operation]
            assert low <= operand <= high
        assert record["answer"] == values[-1] and record["difficulty"] == difficulty
        trace = " ".join(f"{a}{SYMBOLS[operation]}{operand}={b}"
                         for a, (operation, operand), b in zip(values, steps, values[1:]))
        assert record["reference"] == f"{trace} A:{values[-1]}"
        assert record["reference"].count("=") == len(steps)
    assert {len(parse_prompt(r["prompt"])[1]) for r in records} == set(
        range(spec.steps[0], spec.steps[1] + 1))


def test_native_and_foreign_solutions_reach_the_same_answer_in_different_styles():
    rng = random.Random(0)
    foreign_shapes = set()
    for difficulty in (synthetic.EASY, synthetic.HARD):
        for _ in range(300):
            problem = synthetic.sample_problem(rng, difficulty)
            native = synthetic.native_solution(problem)
            foreign = synthetic.foreign_solution(problem, rng)
            assert answers.final_number(native) == answers.final_number(foreign) == problem.answer
            assert answers.answers_match("synthetic", native, foreign)
            assert answers.answers_match("synthetic", foreign, native)
            # Native: numbers and symbols only, besides its "A:" marker; foreign: words, no '='.
            assert re.findall(r"[A-Za-z]+", native) == ["A"]
            assert len(re.findall(r"[A-Za-z]{3,}", foreign)) >= 3 and "=" not in foreign
            # Same logic: every value of the chain appears in the foreign text, in order.
            numbers = [int(n) for n in re.findall(r"\d+", foreign)]
            position = 0
            for value in problem.values[1:]:
                position = numbers.index(value, position) + 1
            assert answers.leaked_phrase(foreign) is None
            foreign_shapes.add(re.sub(r"\d+", "N", foreign))
    assert len(foreign_shapes) > 200  # the wording varies from problem to problem


def test_a_wrong_final_answer_is_rejected_by_the_rewrite_check():
    record = synthetic.finetune_records(1, 0)[0]
    assert not answers.answers_match("synthetic", f"1+1=2 A:{record['answer'] + 1}",
                                     record["reference"])


def test_answer_aware_text_is_the_rewrite_template():
    text = synthetic.answer_aware_text("Q: start 7, add 5.", "Adding 5 to 7 gives 12.")
    assert text == answers.REWRITE_TEMPLATES["synthetic"].format(
        prompt="Q: start 7, add 5.", reference="Adding 5 to 7 gives 12.")


def test_pretraining_follows_the_mix_and_teaches_native_solutions():
    records = synthetic.pretraining_records(1000, 0)
    kinds = [record["kind"] for record in records]
    assert {kind: kinds.count(kind) for kind in set(kinds)} == {
        kind: round(1000 * share) for kind, share in synthetic.PRETRAINING_MIX.items()}
    assert len(set(kinds[:30])) == 3  # shuffled, not in blocks
    for record in records:
        problem = problem_of(record["prompt"])
        start, steps = parse_prompt(problem)
        values = chain_values(start, steps)
        assert record["reference"].endswith(f" A:{values[-1]}")
        assert (start >= 20) == (record["kind"] == "aware_hard")
        if record["kind"] == "plain_easy":
            assert record["prompt"] == problem
        else:
            prefix, suffix = synthetic.answer_aware_text(problem, "\0").split("\0")
            assert record["prompt"].startswith(prefix) and record["prompt"].endswith(suffix)
            shown = record["prompt"][len(prefix):-len(suffix)]
            assert "=" not in shown
            assert answers.answers_match("synthetic", record["reference"], shown)
    halves = {"plain_easy": 1, "aware_hard": 1}
    odd = [r["kind"] for r in synthetic.pretraining_records(7, 3, mix=halves)]
    assert sorted(odd).count("plain_easy") in (3, 4) and len(odd) == 7
    with pytest.raises(ValueError, match="aware_medium"):
        synthetic.pretraining_records(4, 0, mix={"aware_medium": 1.0})


def test_finetune_records_are_hard_problems_with_foreign_references():
    records = synthetic.finetune_records(100, 0)
    assert [record["id"] for record in records] == [str(i) for i in range(100)]
    for record in records:
        assert set(record) == {"id", "prompt", "reference", "answer", "difficulty"}
        start, steps = parse_prompt(record["prompt"])
        assert record["difficulty"] == "hard" and start >= 20
        assert record["answer"] == chain_values(start, steps)[-1]
        assert "=" not in record["reference"]
        assert answers.final_number(record["reference"]) == record["answer"]


def test_eval_problems_never_appear_in_fine_tuning_or_pretraining():
    for seed in (0, 1, 2):
        pretraining = {problem_of(r["prompt"]) for r in synthetic.pretraining_records(3000, seed)}
        finetune = {r["prompt"] for r in synthetic.finetune_records(1000, seed)}
        evaluation = {r["prompt"] for difficulty in ("easy", "hard")
                      for r in synthetic.eval_records(500, seed, difficulty)}
        assert not evaluation & (pretraining | finetune)
        assert not finetune & pretraining
        # Also across seeds: the split is a property of the problem, not of the stream.
        other = {r["prompt"] for r in synthetic.eval_records(500, seed + 10, "easy")}
        assert not other & pretraining


def test_unknown_difficulty_is_named():
    with pytest.raises(ValueError, match=r"'medium': choose from easy, hard"):
        synthetic.eval_records(3, 0, "medium")


def test_texts_use_the_character_alphabet_and_fit_256_characters():
    alphabet = set(DEFAULT_ALPHABET)
    texts = [text for r in synthetic.pretraining_records(2000, 0)
             for text in (r["prompt"], r["reference"])]
    texts += [r["reference"] for r in synthetic.finetune_records(500, 0)]
    assert set("".join(texts)) <= alphabet
    aware = [len(r["prompt"]) + len(r["reference"]) for r in synthetic.pretraining_records(2000, 1)
             if r["kind"] != "plain_easy"]
    assert max(aware) <= 256


def test_generate_records_keeps_the_tiny_configs_world():
    records = synthetic.generate_records(20, seed=0)
    assert records == synthetic.generate_records(20, seed=0)
    for record in records:
        assert set(record) == {"prompt", "reference", "answer"}
        assert record["reference"].endswith(f"The answer is {record['answer']}.")
        assert answers.final_number(record["reference"]) == record["answer"]


def test_a_rewrite_with_the_right_answer_through_wrong_steps_is_rejected_as_wrong_steps():
    from dasd_jax.rewrite import _judge

    problem = synthetic.Problem(54, (("minus", 7), ("minus", 8), ("minus", 1)))
    prompt = synthetic.problem_prompt(problem)
    reference = synthetic.foreign_solution(problem, random.Random(0))
    assert synthetic.parse_prompt(synthetic.answer_aware_text(prompt, reference)) == problem
    assert _judge("synthetic", prompt, "54-7=47 47-8=39 39-1=38 A:38", reference, True) is None
    judged = lambda text: _judge("synthetic", prompt, text, reference, True)
    assert judged("56-7=35 32-1=35 38-1=38 A:38") == "wrong_steps"
    assert judged("54-7=47 47-8=39 39-1=37 A:37") == "wrong_answer"
    # The tiny configs' world states no chain problem: judged by the final answer alone.
    assert synthetic.trace_is_exact("Start with 4, add 2. What is the result?", "6") is None
