"""GSM8K and MATH-500: loading, answer extraction, grading and difficulty groups."""

import json
import re
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from dasd_jax.errors import UserError
from dasd_jax.tasks import gsm8k, math500

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def shared_file(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is not present")
    return path


@pytest.fixture(scope="module")
def gsm8k_test():
    return gsm8k.load(str(shared_file("gsm8k", "test.jsonl")))


@pytest.fixture(scope="module")
def math500_test():
    return math500.load(str(shared_file("math500", "test.jsonl")))


# ----------------------------------------------------------------------------- GSM8K


@pytest.mark.parametrize("completion, number", [
    ("She pays 1,234 dollars in all.", 1234),
    ("Each costs $5", 5),
    ("The temperature drops to -3", -3),
    ("It costs 3.50 per pound.", 3.5),
    ("The answer is 72. Check: 48 + 24 = 72, and 100 - 28 = 72 too, not 99.", 72),
    ("The answer is $1,234.50.", 1234.5),
    ("48 + 24 = 72\n#### 72", 72),
    ("I cannot tell.", None),
])
def test_gsm8k_extracts_the_stated_answer_else_the_last_number(completion, number):
    assert gsm8k.extract_answer(completion) == number


@pytest.mark.parametrize("solution, gold", [
    ("48/2 = <<48/2=24>>24\n#### 72", 72.0), ("#### 1,450,000", 1450000.0),
    ("#### -10", -10.0), ("#### $3.50", 3.5),
])
def test_gsm8k_gold_is_the_number_after_the_hashes(solution, gold):
    assert gsm8k.gold_answer(solution) == gold


def test_a_gsm8k_solution_without_hashes_is_a_user_error(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "It is 3."}) + "\n")
    with pytest.raises(UserError, match=r"bad.jsonl, line 1: .*#### N"):
        gsm8k.load(str(path))


def test_gsm8k_items_carry_the_gold_and_the_number_of_solution_steps(tmp_path):
    rows = [{"question": "q0", "answer": "a = 1\nb = 2\n\n#### 3"}, {"question": "q1",
                                                                     "answer": "#### 1,000"}]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    items = gsm8k.load(str(tmp_path))  # a directory holding {split}.jsonl
    assert items[0] == {"id": "0", "question": "q0", "answer": rows[0]["answer"], "gold": 3.0,
                        "steps": 2}
    assert items[1]["gold"] == 1000.0 and len(gsm8k.load(str(tmp_path), limit=1)) == 1
    with pytest.raises(UserError, match=r"has no train.jsonl \(it has test.jsonl\)"):
        gsm8k.load(str(tmp_path), split="train")


def test_gsm8k_difficulty_groups_steps_up_to_eight_and_more():
    assert [gsm8k.difficulty({"steps": steps}) for steps in (1, 3, 7, 8, 11)] == [
        "steps=1", "steps=3", "steps=7", "steps>=8", "steps>=8"]


def test_gsm8k_prompt_asks_for_step_by_step_reasoning_ending_with_the_answer():
    text = gsm8k.prompt_text({"question": "How many clips?"})
    assert text.startswith("How many clips?") and "step by step" in text
    assert '"The answer is N."' in text


def test_gsm8k_offline_hub_name_fails_fast_saying_to_pass_a_local_file():
    with pytest.raises(UserError, match=r"hf:openai/gsm8k:main: could not load .*local JSONL"):
        gsm8k.load("hf:openai/gsm8k:main")


def test_hub_names_fail_at_once_when_the_hub_does_not_answer(monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("unreachable")
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(socket, "create_connection", no_network)
    for task, spec in ((gsm8k, "hf:openai/gsm8k:main"), (math500, "hf:HuggingFaceH4/MATH-500")):
        with pytest.raises(UserError, match=r"does not answer.*pass a local copy of the data"):
            task.load(spec)


def test_every_gsm8k_test_solution_grades_correct_against_its_own_gold(gsm8k_test):
    assert len(gsm8k_test) == 1319
    assert sum(gsm8k.is_correct(item["answer"], item) for item in gsm8k_test) == 1319


def test_gsm8k_answers_off_by_one_grade_wrong(gsm8k_test):
    def off_by_one(item):
        return f"{item['answer'].rpartition('####')[0]}The answer is {item['gold'] + 1:.2f}."
    assert not any(gsm8k.is_correct(off_by_one(item), item) for item in gsm8k_test)


def test_gsm8k_test_difficulty_spans_two_to_eight_and_more_steps(gsm8k_test):
    groups = {gsm8k.difficulty(item) for item in gsm8k_test}
    assert groups == {f"steps={n}" for n in range(2, 8)} | {"steps>=8"}


# ----------------------------------------------------------------------------- MATH-500


@pytest.mark.parametrize("text, content", [
    ("so $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
    ("first \\boxed{3}, then \\fbox{4}", "4"),
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
    ("\\boxed {\\left( 3, \\frac{\\pi}{2} \\right)}.", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("no box here", None),
    ("cut off: \\boxed{\\frac{1}{2}", None),
])
def test_last_boxed_takes_the_last_box_with_balanced_braces(text, content):
    assert math500.last_boxed(text) == content


@pytest.mark.parametrize("completion, answer, correct", [
    ("Thus $\\boxed{0.5}$.", "\\frac{1}{2}", True),
    ("Thus $\\boxed{\\frac{1}{3}}$.", "\\frac{1}{2}", False),
    ("Polar form: \\boxed{(3, \\frac{\\pi}{2})}", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
    ("Polar form: \\boxed{(3, \\pi)}", "\\left( 3, \\frac{\\pi}{2} \\right)", False),
    ("\\boxed{\\text{Evelyn}}", "\\text{Evelyn}", True),
    ("\\boxed{\\text{Bob}}", "\\text{Evelyn}", False),
    ("At first \\boxed{3}, but correcting the sign, \\boxed{4}", "4", True),
    ("At first \\boxed{4}, but correcting the sign, \\boxed{3}", "4", False),
    ("The final answer is $\\frac{1}{2}$.", "\\frac{1}{2}", True),
    ("I do not know.", "\\frac{1}{2}", False),
    ("\\boxed{}", "5", False),
])
def test_math_grading_checks_equivalence_of_the_final_answer(completion, answer, correct):
    assert math500.is_correct(completion, {"answer": answer}) is correct


def test_math_grading_also_works_in_worker_threads_where_signals_cannot_time_out():
    cases = [("\\boxed{0.5}", "\\frac12"), ("\\boxed{7}", "8")]

    def grade(case):
        assert threading.current_thread() is not threading.main_thread()
        return math500.is_correct(case[0], {"answer": case[1]})

    with ThreadPoolExecutor(2) as pool:
        assert list(pool.map(grade, cases)) == [True, False]


def test_math_items_read_subject_and_level_from_math500_or_full_math_records(tmp_path):
    rows = [{"problem": "p", "solution": "s \\boxed{2}", "answer": "2", "subject": "Algebra",
             "level": 3},
            {"problem": "p", "solution": "so \\boxed{\\frac{1}{2}}.", "type": "Geometry",
             "level": "Level 5"}]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    items = math500.load(str(tmp_path / "test.jsonl"))
    assert items[0] == {"id": "0", **rows[0]}
    assert (items[1]["answer"], math500.subject(items[1]), math500.difficulty(items[1])) == (
        "\\frac{1}{2}", "Geometry", "level=5")


def test_a_math_record_without_any_answer_is_a_user_error(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"problem": "p", "solution": "no box"}) + "\n")
    with pytest.raises(UserError, match=r"bad.jsonl, line 1: .*no answer field"):
        math500.load(str(path))


def test_math_prompt_asks_for_the_answer_in_a_box():
    text = math500.prompt_text({"problem": "Find x."})
    assert text.startswith("Find x.") and "step by step" in text and "\\boxed{}" in text


@pytest.mark.slow
def test_every_math500_solution_grades_correct_against_its_answer(math500_test):
    assert len(math500_test) == 500
    assert sum(math500.is_correct(item["solution"], item) for item in math500_test) == 500


def test_math500_integer_answers_off_by_one_grade_wrong(math500_test):
    integer_items = [item for item in math500_test if re.fullmatch(r"-?\d+", item["answer"])]
    assert len(integer_items) > 200
    assert not any(math500.is_correct(f"\\boxed{{{int(item['answer']) + 1}}}", item)
                   for item in integer_items)


def test_math500_difficulty_is_the_level_and_subjects_are_the_seven_of_math(math500_test):
    assert {math500.difficulty(item) for item in math500_test} == {
        f"level={n}" for n in range(1, 6)}
    assert len({math500.subject(item) for item in math500_test}) == 7
