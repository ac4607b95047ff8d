"""Final-answer extraction and the rewrite acceptance check of each task family.

A rewrite is kept only if its final answer matches the reference's (`answers_match`). Math
answers are numbers ("The answer is 72", GSM8K's "#### 72", else the last number); commonsense
answers are option letters ("The answer is (B)"); code answers are Python programs that must parse
and define the functions the reference defines (running tests needs the sandbox of the
evaluation stage).
"""

from __future__ import annotations

import ast
import re
import threading
import warnings

from dasd_jax.tasks import registry

FAMILIES = ("math", "code", "commonsense", "synthetic")  # what answers_match compares
_NUMBER = r"-?\d[\d,]*(?:\.\d+)?"


def _to_number(text: str) -> float | None:
    try:
        return float(text.replace(",", "").rstrip("."))
    except ValueError:
        return None


def final_number(text: str) -> float | None:
    """The number after "The answer is" / "####", else the last number in `text`."""
    for pattern in (rf"answer is\s*:?\s*\$?\s*({_NUMBER})", rf"####\s*\$?\s*({_NUMBER})"):
        found = re.findall(pattern, text, flags=re.IGNORECASE)
        if found:
            return _to_number(found[-1])
    numbers = re.findall(_NUMBER, text)
    return _to_number(numbers[-1]) if numbers else None


def final_choice(text: str) -> str | None:
    """The option letter after "The answer is", e.g. "(B)" or "B"."""
    found = re.findall(r"answer is\s*:?\s*\(?([A-J])\b\)?", text, flags=re.IGNORECASE)
    return found[-1].upper() if found else None


def program(text: str) -> str:
    """The code of a response: its ```python blocks joined, or the whole text."""
    blocks = re.findall(r"```(?:python|py)?\s*\n(.*?)```", text, flags=re.DOTALL)
    return "\n".join(blocks) if blocks else text


_PARSING = threading.Lock()  # CPython 3.11's parser is not thread-safe (gh-106905)


def parse_python(source: str) -> ast.Module | None:
    """The syntax tree of `source`, None if it does not parse; safe from several threads (code
    is scored in a thread pool), its escape-sequence warnings silenced (they are the
    benchmark's or the model's, not the user's)."""
    with _PARSING, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return ast.parse(source)
        except (SyntaxError, ValueError):  # ValueError: source with NUL bytes
            return None


def _defined_functions(source: str) -> set[str] | None:
    tree = parse_python(source)
    if tree is None:
        return None
    return {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}


def answers_match(task: str, response: str, reference: str) -> bool:
    """Whether `response` reaches the reference's final answer (see the module docstring)."""
    if task in ("math", "synthetic"):
        expected = final_number(reference)
        return expected is not None and final_number(response) == expected
    if task == "commonsense":
        expected = final_choice(reference)
        return expected is not None and final_choice(response) == expected
    if task == "code":
        wanted = _defined_functions(program(reference))
        found = _defined_functions(program(response))
        return wanted is not None and found is not None and wanted <= found
    raise ValueError(f"unknown task family {task!r}; choose from {', '.join(FAMILIES)}")


# SDFT-style answer-aware prompts: show the reference, ask for the model's own solution.
REWRITE_TEMPLATES = {
    "math": ("{prompt}\n\nA correct solution, for your reference:\n{reference}\n\n"
             "Now solve the problem yourself, step by step, in your own words. "
             "End with \"The answer is N.\""),
    "synthetic": "{prompt}\nA solution: {reference}\nSolve it yourself.",
    "code": ("{prompt}\n\nA correct program, for your reference:\n```python\n{reference}\n```\n\n"
             "Now write your own solution in a ```python block, explaining it briefly."),
    "commonsense": ("{prompt}\n\nThe correct answer, for your reference: {reference}\n\n"
                    "Now answer the question yourself, reasoning briefly, and end with "
                    "\"The answer is (X).\""),
}
# Phrases that betray the answer-aware prompt in a response; such rewrites fall back.
LEAK_PHRASES = ("reference solution", "reference answer", "for your reference", "the reference",
                "your response", "your own words", "a correct solution", "a correct program")


def leaked_phrase(response: str, phrases=LEAK_PHRASES) -> str | None:
    lowered = response.lower()
    return next((phrase for phrase in phrases if phrase in lowered), None)


def _accepts(family: str):
    def accept(prompt: str, text: str, reference: str) -> str | None:
        return None if answers_match(family, text, reference) else "wrong_answer"
    return accept


REWRITE_FAMILIES = [registry.RewriteFamily(name, REWRITE_TEMPLATES[name], _accepts(name))
                    for name in ("math", "code", "commonsense")]
