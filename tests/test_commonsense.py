"""Commonsense multiple choice: the upstream formats, lm-eval prompts, acc and acc_norm."""

import json
from pathlib import Path

import pytest

from dasd_jax.errors import UserError
from dasd_jax.tasks import commonsense

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
EVALUATION_ITEMS = {"commonsenseqa": 1221, "arc_easy": 2376, "arc_challenge": 1172, "boolq": 3270,
                    "openbookqa": 500, "piqa": 1838, "siqa": 1954, "winogrande": 1267}


def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is not present")
    return SHARED_DATA


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def arc_row(answer="B", labels="ABCD", stem="Which is a metal?"):
    texts = ["wood", "iron", "glass", "paper", "stone"][:len(labels)]
    return {"id": "q1", "answerKey": answer, "question": {
        "stem": stem, "choices": [{"label": label, "text": text}
                                  for label, text in zip(labels, texts)]}}


# ----------------------------------------------------------------------------- the real files


@pytest.mark.parametrize("task", commonsense.TASKS)
def test_each_task_reads_its_real_evaluation_split_into_well_formed_items(task):
    path = commonsense.default_paths(shared_data())[task]
    items = commonsense.load(task, path)
    assert len(items) == EVALUATION_ITEMS[task]
    for item in items:
        assert item["task"] == task and isinstance(item["id"], str)
        assert len(item["pairs"]) >= 2
        assert 0 <= item["label"] < len(item["pairs"])
        assert all(context.strip() and continuation.startswith(" ")
                   for context, continuation in item["pairs"])


def test_every_task_defaults_to_the_split_lm_eval_evaluates():
    paths = commonsense.default_paths(Path("root"))
    assert set(paths) == set(commonsense.TASKS)
    assert paths["arc_challenge"] == str(Path("root/arc/ARC-Challenge-Test.jsonl"))
    assert paths["openbookqa"] == str(Path("root/openbookqa/test.tsv"))
    assert paths["commonsenseqa"] == str(Path("root/commonsenseqa/dev_rand_split.jsonl"))


def test_a_folder_and_a_split_pick_the_file_and_limit_keeps_the_first_items():
    root = shared_data()
    assert len(commonsense.load("arc_easy", root / "arc", split="validation")) == 570
    assert len(commonsense.load("arc_challenge", root, split="dev")) == 299
    assert len(commonsense.load("openbookqa", root / "openbookqa", split="train")) == 4957
    first = commonsense.load("siqa", root / "siqa", limit=3)
    assert [item["id"] for item in first] == ["siqa-0", "siqa-1", "siqa-2"]


def test_real_arc_mixes_digit_labels_and_three_or_five_choices():
    items = commonsense.load("arc_easy", commonsense.default_paths(shared_data())["arc_easy"])
    assert {len(item["pairs"]) for item in items} == {3, 4, 5}


def test_real_piqa_and_siqa_labels_come_from_their_lst_files():
    root = shared_data()
    piqa = commonsense.load("piqa", root / "piqa", limit=2)
    siqa = commonsense.load("siqa", root / "siqa", limit=2)
    assert [item["label"] for item in piqa] == [0, 1]        # valid-labels.lst starts 0, 1
    assert [item["label"] for item in siqa] == [2, 0]        # dev-labels.lst starts 3, 1


# ----------------------------------------------------------------------------- prompt formats


def test_lettered_questions_read_question_answer_with_a_space_before_each_choice(tmp_path):
    file = write_jsonl(tmp_path / "dev_rand_split.jsonl", [arc_row()])
    item, = commonsense.load("commonsenseqa", file)
    assert item["pairs"][1] == ("Question: Which is a metal?\nAnswer:", " iron")
    assert item["label"] == 1 and item["id"] == "q1"


def test_arc_labels_may_be_digits_and_questions_may_have_three_or_five_choices(tmp_path):
    file = write_jsonl(tmp_path / "arc.jsonl", [arc_row("3", "1234"), arc_row("C", "ABC"),
                                                arc_row("E", "ABCDE")])
    items = commonsense.load("arc_easy", file)
    assert [(len(item["pairs"]), item["label"]) for item in items] == [(4, 2), (3, 2), (5, 4)]


def test_openbookqa_tsv_scores_the_bare_stem_and_splits_the_lettered_choices(tmp_path):
    file = tmp_path / "test.tsv"
    file.write_text("ID\tQuestion Stem\tChoices\tComplete Question\tAnswer Key\n"
                    "7-1\tThe sun is responsible for\t(A) puppies (B) plants sprouting (C) rain "
                    "(D) tides\tThe sun is responsible for (A) ...\tB\n", encoding="utf-8")
    item, = commonsense.load("openbookqa", file)
    assert item["pairs"] == [("The sun is responsible for", " puppies"),
                             ("The sun is responsible for", " plants sprouting"),
                             ("The sun is responsible for", " rain"),
                             ("The sun is responsible for", " tides")]
    assert item["label"] == 1 and item["id"] == "7-1"


def test_boolq_asks_about_the_passage_and_answers_no_or_yes(tmp_path):
    file = write_jsonl(tmp_path / "val.jsonl", [
        {"idx": 7, "passage": "Ice is frozen water.", "question": "is ice water", "label": "true"}])
    item, = commonsense.load("boolq", file)
    context = "Ice is frozen water.\nQuestion: is ice water?\nAnswer:"
    assert item["pairs"] == [(context, " no"), (context, " yes")]
    assert item["label"] == 1 and item["id"] == "7"


def test_piqa_reads_its_goal_and_two_solutions_with_labels_from_the_lst_file(tmp_path):
    file = write_jsonl(tmp_path / "valid.jsonl", [{"goal": "Open a jar", "sol1": "twist the lid",
                                                   "sol2": "bite the lid"}])
    (tmp_path / "valid-labels.lst").write_text("0\n")
    item, = commonsense.load("piqa", file)
    assert item["pairs"] == [("Question: Open a jar\nAnswer:", " twist the lid"),
                             ("Question: Open a jar\nAnswer:", " bite the lid")]
    assert item["label"] == 0


def test_siqa_joins_context_and_question_and_its_one_based_labels_become_zero_based(tmp_path):
    file = write_jsonl(tmp_path / "dev.jsonl", [{
        "context": "Tracy helped Riley.", "question": "How would Riley feel?",
        "answerA": "grateful", "answerB": "angry", "answerC": "bored"}])
    (tmp_path / "dev-labels.lst").write_text("1\n")
    item, = commonsense.load("siqa", file)
    context = "Question: Tracy helped Riley. How would Riley feel?\nAnswer:"
    assert item["pairs"] == [(context, " grateful"), (context, " angry"), (context, " bored")]
    assert item["label"] == 0


def test_winogrande_varies_the_context_and_shares_the_continuation_in_either_layout(tmp_path):
    converted = {"context_options": ["Sarah beat Maria so Sarah", "Sarah beat Maria so Maria"],
                 "continuation": "cried.", "gold": 1}
    original = {"sentence": "Sarah beat Maria so _ cried.", "option1": "Sarah",
                "option2": "Maria", "answer": "2"}
    items = commonsense.load("winogrande", write_jsonl(tmp_path / "w.jsonl", [converted, original]))
    expected = [("Sarah beat Maria so Sarah", " cried."), ("Sarah beat Maria so Maria", " cried.")]
    assert [item["pairs"] for item in items] == [expected, expected]
    assert [item["label"] for item in items] == [1, 1]


def test_hub_layouts_read_the_same_as_the_upstream_files(tmp_path):
    arc = {"id": "q1", "question": "Which is a metal?", "answerKey": "B",
           "choices": {"label": ["A", "B"], "text": ["wood", "iron"]}}
    obqa = {"id": "o1", "question_stem": "Metals", "answerKey": "A",
            "choices": {"label": ["A", "B"], "text": ["conduct", "float"]}}
    piqa = {"goal": "Open a jar", "sol1": "twist", "sol2": "bite", "label": 1}
    boolq = {"passage": "P.", "question": "q", "answer": False}
    assert commonsense.load("arc_easy", write_jsonl(tmp_path / "a.jsonl", [arc]))[0]["label"] == 1
    obqa_item, = commonsense.load("openbookqa", write_jsonl(tmp_path / "o.jsonl", [obqa]))
    assert obqa_item["pairs"][0] == ("Metals", " conduct")
    assert commonsense.load("piqa", write_jsonl(tmp_path / "p.jsonl", [piqa]))[0]["label"] == 1
    assert commonsense.load("boolq", write_jsonl(tmp_path / "b.jsonl", [boolq]))[0]["label"] == 0


# ----------------------------------------------------------------------------- scoring


def test_choice_lengths_count_the_choice_without_its_delimiter():
    item = {"pairs": [("Q:", " iron"), ("Q:", " plants sprouting")]}
    assert commonsense.choice_pairs(item) == item["pairs"]
    assert commonsense.choice_lengths(item) == [4, 16]


# ----------------------------------------------------------------------------- bad input


def test_a_line_that_is_not_json_is_named_by_file_and_line(tmp_path):
    file = tmp_path / "arc.jsonl"
    file.write_text(json.dumps(arc_row()) + "\n{not json\n")
    with pytest.raises(UserError, match=r"arc\.jsonl, line 2: not valid JSON"):
        commonsense.load("arc_easy", file)


def test_an_answer_key_outside_the_choices_is_named_by_file_and_line(tmp_path):
    file = write_jsonl(tmp_path / "arc.jsonl", [arc_row(), arc_row(answer="E")])
    with pytest.raises(UserError, match=r"arc\.jsonl, line 2: answerKey 'E' is not among"):
        commonsense.load("arc_challenge", file)


def test_an_out_of_range_label_names_the_labels_file_and_its_line(tmp_path):
    row = {"context": "c", "question": "q", "answerA": "a", "answerB": "b", "answerC": "c"}
    file = write_jsonl(tmp_path / "dev.jsonl", [row, row])
    (tmp_path / "dev-labels.lst").write_text("1\n4\n")
    with pytest.raises(UserError, match=r"dev\.jsonl, line 2 \(label: .*dev-labels\.lst, line 2\)"
                                        r": label '4' is out of range"):
        commonsense.load("siqa", file)


def test_winogrande_gold_out_of_range_is_named_by_file_and_line(tmp_path):
    file = write_jsonl(tmp_path / "w.jsonl", [{"context_options": ["a", "b"], "continuation": "c",
                                               "gold": 2}])
    with pytest.raises(UserError, match=r"w\.jsonl, line 1: label 2 is out of range"):
        commonsense.load("winogrande", file)


def test_a_missing_field_is_named_with_the_fields_the_record_has(tmp_path):
    file = write_jsonl(tmp_path / "valid.jsonl", [{"goal": "g", "sol1": "a", "label": 0}])
    with pytest.raises(UserError, match=r"valid\.jsonl, line 1: the piqa record has no field "
                                        r"'sol2' \(its fields: goal, sol1, label\)"):
        commonsense.load("piqa", file)


def test_labels_files_must_match_the_records_line_for_line(tmp_path):
    file = write_jsonl(tmp_path / "valid.jsonl", [{"goal": "g", "sol1": "a", "sol2": "b"}] * 2)
    (tmp_path / "valid-labels.lst").write_text("0\n1\n1\n")
    with pytest.raises(UserError, match=r"valid-labels\.lst has 3 labels but .* has 2 records"):
        commonsense.load("piqa", file)
    (tmp_path / "valid-labels.lst").unlink()
    with pytest.raises(UserError, match=r"line 1: the record has no label and there is no labels"):
        commonsense.load("piqa", file)


def test_a_tsv_row_with_missing_fields_is_named_by_file_and_line(tmp_path):
    file = tmp_path / "test.tsv"
    file.write_text("ID\tQuestion Stem\tChoices\tComplete Question\tAnswer Key\n1\tStem\n")
    with pytest.raises(UserError, match=r"test\.tsv, line 2: expected 5 tab-separated fields"):
        commonsense.load("openbookqa", file)


def test_missing_files_unknown_tasks_and_an_unreachable_hub_say_what_to_pass(tmp_path):
    with pytest.raises(UserError, match=r"no boolq data at .*nowhere\.jsonl: pass its upstream"):
        commonsense.load("boolq", tmp_path / "nowhere.jsonl")
    with pytest.raises(UserError, match=r"holds no ARC-Easy-Test\.jsonl"):
        commonsense.load("arc_easy", tmp_path)
    with pytest.raises(UserError, match=r"unknown commonsense task 'hellaswag'"):
        commonsense.load("hellaswag", tmp_path)
    pytest.importorskip("datasets")
    with pytest.raises(UserError, match=r"Pass a local JSONL file or a save_to_disk directory"):
        commonsense.load("piqa", "hf:no-such-owner/no-such-piqa")
