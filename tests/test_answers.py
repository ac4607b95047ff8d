"""Final-answer extraction and the rewrite acceptance check."""

import pytest

from dasd_jax.tasks import answers


@pytest.mark.parametrize("text, number", [
    ("She sold 48 + 24 = 72 clips. The answer is 72.", 72),
    ("Natalia sold 48/2 = 24 clips in May.\n#### 72", 72),
    ("The answer is $1,234.50", 1234.5),
    ("First 3, then -7", -7),
    ("no digits here", None),
])
def test_final_number(text, number):
    assert answers.final_number(text) == number


def test_math_rewrites_match_on_the_final_number_not_the_wording():
    reference = "48/2 = 24. 48 + 24 = 72.\n#### 72"
    rewrite = "Half of 48 is 24, so 72 in all. The answer is 72."
    assert answers.answers_match("math", rewrite, reference)
    assert not answers.answers_match("math", "The answer is 70.", reference)


def test_commonsense_rewrites_match_on_the_option_letter():
    assert answers.answers_match("commonsense", "Birds fly. The answer is (b).",
                                 "The answer is (B)")
    assert not answers.answers_match("commonsense", "The answer is (C).", "The answer is (B)")


def test_code_rewrites_must_parse_and_define_the_reference_functions():
    reference = "def add(a, b):\n    return a + b\n"
    good = "Here it is:\n```python\ndef add(x, y):\n    return x + y\n```"
    assert answers.answers_match("code", good, reference)
    renamed = "```python\ndef plus(x, y): return x + y\n```"
    assert not answers.answers_match("code", renamed, reference)
    assert not answers.answers_match("code", "```python\ndef add(x, y) return\n```", reference)


def test_template_phrases_are_caught():
    assert answers.leaked_phrase("As the reference solution shows, 72.") == "reference solution"
    assert answers.leaked_phrase("48 + 24 = 72. The answer is 72.") is None


def test_every_rewrite_family_has_a_template_with_both_fields_and_an_acceptance_check():
    from dasd_jax.tasks import registry
    assert set(registry.rewrite_families()) == {*answers.FAMILIES, "synthetic"}
    families = {name: registry.rewrite_family(name) for name in answers.FAMILIES}
    for family in families.values():
        text = family.template.format(prompt="P?", reference="R.")
        assert "P?" in text and "R." in text
    assert families["math"].accept("Q", "The answer is 7.", "#### 7") is None
    assert families["math"].accept("Q", "The answer is 8.", "#### 7") == "wrong_answer"
