"""Arithmetic word problems with worked solutions, for runs without any dataset or network.

    >>> generate_records(3, seed=0)[1]
    {'prompt': 'Start with 4, subtract 2, then add 5. What is the result?',
     'reference': 'Start with 4. 4 - 2 = 2. 2 + 5 = 7. The answer is 7.', 'answer': 7}

Each record has `prompt`, `reference` (one sentence per step, ending "The answer is N.") and
`answer` (the int N). A problem has 1-4 steps of add / subtract / multiply with small operands;
subtraction never goes below zero. The same (n, seed) always gives the same records.
"""

from __future__ import annotations

import random

OPERATIONS = ("add", "subtract", "multiply")


def _step(rng: random.Random, value: int) -> tuple[str, str, int]:
    """One step applied to `value`: (instruction, worked line, new value)."""
    operation = rng.choice(OPERATIONS if value > 0 else ("add", "multiply"))
    if operation == "add":
        operand = rng.randint(1, 9)
        return f"add {operand}", f"{value} + {operand} = {value + operand}.", value + operand
    if operation == "subtract":
        operand = rng.randint(1, min(value, 9))
        return f"subtract {operand}", f"{value} - {operand} = {value - operand}.", value - operand
    operand = rng.randint(2, 5)
    return f"multiply by {operand}", f"{value} * {operand} = {value * operand}.", value * operand


def generate_record(rng: random.Random) -> dict:
    """One problem drawn from `rng`: {"prompt", "reference", "answer"}."""
    start = value = rng.randint(1, 9)
    instructions, lines = [], [f"Start with {start}."]
    for _ in range(rng.randint(1, 4)):
        instruction, line, value = _step(rng, value)
        instructions.append(instruction)
        lines.append(line)
    if len(instructions) == 1:
        steps = instructions[0]
    else:
        steps = ", ".join(instructions[:-1]) + ", then " + instructions[-1]
    return {
        "prompt": f"Start with {start}, {steps}. What is the result?",
        "reference": " ".join(lines) + f" The answer is {value}.",
        "answer": value,
    }


def generate_records(n: int, seed: int) -> list[dict]:
    """`n` problems, deterministic given `seed`."""
    rng = random.Random(seed)
    return [generate_record(rng) for _ in range(n)]
