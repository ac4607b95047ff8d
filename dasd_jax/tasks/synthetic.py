"""A generated arithmetic world: the embedded DASD demo's problems and texts (pure Python).

A problem is a chain of operations on a starting number, shown to the model as its plain
task prompt:

    Q: start 36, minus 4, add 2, minus 5.

Every problem has two solutions carrying the same logic (the same values in the same order):

* NATIVE, the base model's own style, pretrained on; compact, one `a op b=c` per step:
      36-4=32 32+2=34 34-5=29 A:29
* FOREIGN, the reference style of the fine-tuning data: English sentences whose wording, opening,
  separator (space or newline) and closing marker are drawn at random, so the style varies while
  the numbers never do:
      We begin with 36. First, taking 4 from 36 leaves 32. Next, we add 2 and get 34.
      Finally, subtracting 5 gives 29. Hence we end with 29.
Both end with the final value and no number after it, so `answers.final_number` returns the answer
("A:29" -> 29, "...end with 29." -> 29) and `answers.answers_match("synthetic", ...)` accepts one
for the other. The native style has one '=' per step; the foreign style has none.

EASY = 1-3 steps, start 1-9, every value <= 19, operands <= 5 (as the probe's "range-hard",
shared/demo-world-probe.md); HARD = 2-3 steps, start 20-39, every value <= 49, operands <= 5. Add
and minus use operands 1..max, times 2..max; a step whose result would leave [0, max_value] is
drawn again, so answers are exact non-negative integers in range. There are 12,785 easy problems
over 196 distinct steps ("value op operand" facts) and 23,513 hard ones over 535. (The probe's hard
range, start 20-90 and values <= 99 with operands <= 9, has 1,896 facts: with numbers as single
tokens no method learned them from 1,024 fine-tuning problems in 600 steps, hard accuracy stayed
at 3-5%, so the demo could not tell methods apart on the gain; benchmarks/RESULTS.md.)

The DASD demo uses four record sets:
* `pretraining_records`: the base's mix (`PRETRAINING_MIX`): 35% plain easy -> native solution,
  25% answer-aware easy and 40% answer-aware hard -> native solution, where answer-aware means the
  prompt is `answer_aware_text(problem, foreign solution)`, the rewrite stage's own template. The
  base thus solves easy problems alone and learns to use a reference shown in context, while hard
  problems stay out of reach without one. (The probe's 50/30/20 mix gave a 2-layer base that
  rewrote only 11-24% of hard problems right within the demo's budget; 35/25/40 gave 59% with
  easy accuracy 87%, benchmarks/RESULTS.md.)
* `finetune_records`: hard problems with FOREIGN references, the set DASD rewrites and tunes on.
* `eval_records(n, seed, "easy" | "hard")`: held-out problems with NATIVE references (gold traces);
  "easy" measures forgetting, "hard" the gain.
Disjointness: each problem belongs to one split by a hash of its prompt text (`split_of`: 10% eval,
30% fine-tune, 60% pretraining; easy problems of the fine-tune share also go to pretraining, as
fine-tuning is hard-only). Every set draws only problems of its own split, so an eval problem is
never a fine-tune or pretraining problem, nor a fine-tune problem a pretraining one, for ANY seeds
and sizes. Streams are seeded per set (`random.Random("synthetic/<set>/<seed>")`). Problems may
repeat within a set, as in their distribution (eval has 1,295 easy problems, 10 of one step).

Lengths in characters, over 20,000 problems of each difficulty, mean / max, and in tokens of the
demo tokenizer (`vocabulary_words()` and the numbers 0-999 as single tokens, see
char_tokenizer.build; 5,000 problems), mean / max; a chat template adds 4 specials:
                            characters                          demo tokens
    plain prompt            easy 27 / 38      hard 32 / 39      easy 11 / 14     hard 12 / 14
    native solution         easy 16 / 27      hard 24 / 28      easy 14 / 19     hard 16 / 19
    foreign solution        easy 84 / 147     hard 101 / 145    easy 26 / 43     hard 30 / 43
    answer-aware prompt     easy 143 / 217    hard 165 / 216    easy 46 / 66     hard 51 / 66
    aware prompt + native   easy 160 / 244    hard 189 / 244    easy 60 / 85     hard 68 / 85
By construction (widest numbers, longest phrasings) an answer-aware prompt plus its native
solution is at most 254 characters, so it always fits a 256-token window even character by
character; the demo's window is 96 tokens.

`generate_records(n, seed)` is the older, smaller world of the tiny configs (`data.path =
"synthetic"`, the evaluate task "synthetic" and the embedded checkpoint): unchanged, see
`generate_record`.
"""

from __future__ import annotations

import hashlib
import random
import re
from typing import NamedTuple

from dasd_jax.tasks import answers, registry
from dasd_jax.tasks.answers import REWRITE_TEMPLATES


class Difficulty(NamedTuple):
    name: str
    steps: tuple[int, int]  # inclusive range of the number of operations
    start: tuple[int, int]  # inclusive range of the starting value
    max_value: int  # every intermediate value stays in [0, max_value]
    max_operand: int


EASY = Difficulty("easy", steps=(1, 3), start=(1, 9), max_value=19, max_operand=5)
HARD = Difficulty("hard", steps=(2, 3), start=(20, 39), max_value=49, max_operand=5)
DIFFICULTIES = {"easy": EASY, "hard": HARD}
PRETRAINING_MIX = {"plain_easy": 0.35, "aware_easy": 0.25, "aware_hard": 0.4}

_SYMBOLS = {"add": "+", "minus": "-", "times": "*"}
_APPLY = {"add": lambda a, b: a + b, "minus": lambda a, b: a - b, "times": lambda a, b: a * b}


class Problem(NamedTuple):
    """A chain: `start`, then `steps` as (operation, operand), operation in add / minus / times."""

    start: int
    steps: tuple[tuple[str, int], ...]

    @property
    def values(self) -> list[int]:
        """[start, value after step 1, ..., answer]."""
        values = [self.start]
        for operation, operand in self.steps:
            values.append(_APPLY[operation](values[-1], operand))
        return values

    @property
    def answer(self) -> int:
        return self.values[-1]


def sample_problem(rng: random.Random, difficulty: Difficulty) -> Problem:
    """A problem of `difficulty`; steps that would leave [0, max_value] are drawn again."""
    value = start = rng.randint(*difficulty.start)
    steps = []
    for _ in range(rng.randint(*difficulty.steps)):
        while True:  # some step always fits: add 1 below max_value, minus 1 at it
            operation = rng.choice(tuple(_APPLY))
            low = 2 if operation == "times" else 1
            operand = rng.randint(low, difficulty.max_operand)
            result = _APPLY[operation](value, operand)
            if 0 <= result <= difficulty.max_value:
                break
        steps.append((operation, operand))
        value = result
    return Problem(start, tuple(steps))


def problem_prompt(problem: Problem) -> str:
    """The plain task prompt: "Q: start 7, add 5, times 2, minus 3." """
    steps = "".join(f", {operation} {operand}" for operation, operand in problem.steps)
    return f"Q: start {problem.start}{steps}."


_PROMPT = re.compile(r"Q: start (\d+)((?:, (?:add|minus|times) \d+)+)\.")


def parse_prompt(prompt: str) -> Problem | None:
    """The problem a plain task prompt states (also found inside an answer-aware prompt), or None
    when `prompt` holds none."""
    match = _PROMPT.search(prompt)
    if match is None:
        return None
    steps = tuple((operation, int(operand)) for operation, operand
                  in re.findall(r"(add|minus|times) (\d+)", match.group(2)))
    return Problem(int(match.group(1)), steps)


def trace_is_exact(prompt: str, response: str) -> bool | None:
    """Whether `response` writes every number of the problem's native solution, in order and
    nothing else ("54-7=47 47-8=39 39-1=38 A:38"); None when `prompt` states no problem of this
    world. A stricter check than the final answer: a rewrite can reach the right answer through
    wrong steps."""
    problem = parse_prompt(prompt)
    if problem is None:
        return None
    return re.findall(r"\d+", response) == re.findall(r"\d+", native_solution(problem))


def native_solution(problem: Problem) -> str:
    """The base model's style: "7+5=12 12*2=24 24-3=21 A:21" (one '=' per step)."""
    values = problem.values
    lines = [f"{a}{_SYMBOLS[operation]}{operand}={b}"
             for a, (operation, operand), b in zip(values, problem.steps, values[1:])]
    return " ".join(lines) + f" A:{problem.answer}"


# The FOREIGN style's phrasings: {a} the value before a step, {b} the operand, {c} the value after.
_CLAUSES = {
    "add": ("adding {b} to {a} gives {c}", "{a} plus {b} is {c}", "{a} increased by {b} is {c}",
            "we add {b} and get {c}"),
    "minus": ("taking {b} from {a} leaves {c}", "{a} minus {b} is {c}", "subtracting {b} gives {c}",
              "we remove {b} and have {c}"),
    "times": ("multiplying by {b} gives {c}", "{a} times {b} is {c}",
              "{a} multiplied by {b} is {c}", "we multiply {a} by {b} to get {c}"),
}
_OPENINGS = ("", "We begin with {s}.", "Start from {s}.", "It starts at {s}.")
_FIRST = ("First, ", "")
_MIDDLE = ("Then ", "Next, ")
_LAST = ("Finally, ", "Then ")
_CLOSINGS = ("So the result is {v}.", "The final value is {v}.", "Hence we end with {v}.",
             "Result: {v}")


def tokenizer():
    """The world's tokenizer: characters, plus its words and the numbers 0-999 as single
    tokens (`char_tokenizer.build`)."""
    from dasd_jax import char_tokenizer

    return char_tokenizer.build(words=vocabulary_words(), numbers=True)


def vocabulary_words() -> list[str]:
    """Every word (2+ letters) of the world's texts, as written and capitalized: with the numbers
    0-999 these are the single tokens of the demo tokenizer (`char_tokenizer.build`)."""
    texts = [*_OPENINGS, *_FIRST, *_MIDDLE, *_LAST, *_CLOSINGS,
             *(clause for clauses in _CLAUSES.values() for clause in clauses),
             REWRITE_TEMPLATES["synthetic"], "Q: start, add, minus, times."]
    words = sorted({word for text in texts for word in re.findall(r"[A-Za-z]{2,}", text)})
    return sorted({variant for word in words for variant in (word, word.capitalize())})


def foreign_solution(problem: Problem, rng: random.Random) -> str:
    """The reference style: English sentences, wording drawn from `rng`, ending in the answer."""
    values, count = problem.values, len(problem.steps)
    sentences = [rng.choice(_OPENINGS).format(s=problem.start)]
    for i, ((operation, operand), a, c) in enumerate(zip(problem.steps, values, values[1:])):
        lead = rng.choice(_FIRST if i == 0 else _LAST if i == count - 1 else _MIDDLE)
        clause = rng.choice(_CLAUSES[operation]).format(a=a, b=operand, c=c)
        sentences.append(lead + (clause if lead else clause[0].upper() + clause[1:]) + ".")
    sentences.append(rng.choice(_CLOSINGS).format(v=problem.answer))
    return rng.choice((" ", "\n")).join(s for s in sentences if s)


def answer_aware_text(prompt: str, reference: str) -> str:
    """The rewrite stage's answer-aware prompt (REWRITE_TEMPLATES["synthetic"]), used verbatim in
    pretraining so the base learns to use a reference in exactly the form rewriting shows it."""
    return REWRITE_TEMPLATES["synthetic"].format(prompt=prompt, reference=reference)


# ----------------------------------------------------------------------------- record sets

SPLITS = ("eval", "finetune", "pretrain")


def split_of(problem: Problem) -> str:
    """The one split a problem belongs to, by a hash of its prompt: 10% / 30% / 60%."""
    digest = hashlib.sha256(problem_prompt(problem).encode()).digest()
    bucket = int.from_bytes(digest[:4], "big") % 100
    return "eval" if bucket < 10 else "finetune" if bucket < 40 else "pretrain"


def _allowed(difficulty: Difficulty, record_set: str) -> tuple[str, ...]:
    if record_set == "eval":
        return ("eval",)
    if record_set == "finetune":
        return ("finetune",)
    # Pretraining: never eval problems, and never hard problems that fine-tuning may use.
    return ("finetune", "pretrain") if difficulty is EASY else ("pretrain",)


def _draw(rng: random.Random, difficulty: Difficulty, record_set: str) -> Problem:
    allowed = _allowed(difficulty, record_set)
    while True:
        problem = sample_problem(rng, difficulty)
        if split_of(problem) in allowed:
            return problem


def _stream(record_set: str, seed: int) -> random.Random:
    return random.Random(f"synthetic/{record_set}/{seed}")


def _counts(n: int, mix: dict[str, float]) -> dict[str, int]:
    """`n` split by the weights of `mix`, exactly (largest remainders)."""
    total = sum(mix.values())
    if total <= 0 or min(mix.values()) < 0:
        raise ValueError(f"pretraining mix {mix!r}: weights must be >= 0 with a positive sum")
    shares = {kind: n * weight / total for kind, weight in mix.items()}
    counts = {kind: int(share) for kind, share in shares.items()}
    by_remainder = sorted(mix, key=lambda kind: counts[kind] - shares[kind])
    for kind in by_remainder[:n - sum(counts.values())]:
        counts[kind] += 1
    return counts


def pretraining_records(n: int, seed: int, mix: dict[str, float] = PRETRAINING_MIX) -> list[dict]:
    """`n` records {"prompt", "reference" (the target: a native solution), "kind"}, in the exact
    proportions of `mix` (kinds plain_easy, aware_easy, aware_hard), shuffled."""
    unknown = set(mix) - set(PRETRAINING_MIX)
    if unknown:
        raise ValueError(f"pretraining mix kinds {sorted(unknown)}: choose from "
                         f"{', '.join(PRETRAINING_MIX)}")
    rng = _stream("pretrain", seed)
    kinds = [kind for kind, count in _counts(n, mix).items() for _ in range(count)]
    rng.shuffle(kinds)
    records = []
    for kind in kinds:
        problem = _draw(rng, HARD if kind == "aware_hard" else EASY, "pretrain")
        prompt = problem_prompt(problem)
        if kind != "plain_easy":
            prompt = answer_aware_text(prompt, foreign_solution(problem, rng))
        records.append({"prompt": prompt, "reference": native_solution(problem), "kind": kind})
    return records


def finetune_records(n: int, seed: int) -> list[dict]:
    """`n` hard problems with FOREIGN references: {"id", "prompt", "reference", "answer",
    "difficulty"}, the set DASD rewrites into the base's own style and fine-tunes on."""
    rng = _stream("finetune", seed)
    records = []
    for i in range(n):
        problem = _draw(rng, HARD, "finetune")
        records.append({"id": str(i), "prompt": problem_prompt(problem),
                        "reference": foreign_solution(problem, rng), "answer": problem.answer,
                        "difficulty": HARD.name})
    return records


def eval_records(n: int, seed: int, difficulty: str) -> list[dict]:
    """`n` held-out problems of `difficulty` ("easy" or "hard") with NATIVE references (the gold
    trace): {"id", "prompt", "reference", "answer", "difficulty"}."""
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty {difficulty!r}: choose from {', '.join(DIFFICULTIES)}")
    spec = DIFFICULTIES[difficulty]
    rng = _stream(f"eval-{difficulty}", seed)
    records = []
    for i in range(n):
        problem = _draw(rng, spec, "eval")
        records.append({"id": str(i), "prompt": problem_prompt(problem),
                        "reference": native_solution(problem), "answer": problem.answer,
                        "difficulty": spec.name})
    return records


# ----------------------------------------------------------------------------- tiny-config world

def _legacy_step(rng: random.Random, value: int) -> tuple[str, str, int]:
    """One step applied to `value`: (instruction, worked line, new value)."""
    operation = rng.choice(("add", "subtract", "multiply") if value > 0 else ("add", "multiply"))
    if operation == "add":
        operand = rng.randint(1, 9)
        return f"add {operand}", f"{value} + {operand} = {value + operand}.", value + operand
    if operation == "subtract":
        operand = rng.randint(1, min(value, 9))
        return f"subtract {operand}", f"{value} - {operand} = {value - operand}.", value - operand
    operand = rng.randint(2, 5)
    return f"multiply by {operand}", f"{value} * {operand} = {value * operand}.", value * operand


def generate_record(rng: random.Random) -> dict:
    """One problem of the tiny configs' world: {"prompt", "reference", "answer"}, e.g.
    {'prompt': 'Start with 4, subtract 2, then add 5. What is the result?',
     'reference': 'Start with 4. 4 - 2 = 2. 2 + 5 = 7. The answer is 7.', 'answer': 7}.
    1-4 steps of add / subtract / multiply on a start of 1-9, never below zero; the reference (the
    training target of `data.path = "synthetic"`) has one sentence per step, ending "The answer is
    N." The embedded checkpoint and the tests of data/evaluate/rewrite rely on this exact stream."""
    start = value = rng.randint(1, 9)
    instructions, lines = [], [f"Start with {start}."]
    for _ in range(rng.randint(1, 4)):
        instruction, line, value = _legacy_step(rng, value)
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
    """`n` problems of the tiny configs' world, deterministic given `seed`."""
    rng = random.Random(seed)
    return [generate_record(rng) for _ in range(n)]


# ----------------------------------------------------------------------------- the stages' view


def _grade(item: dict, completion: str) -> dict:
    predicted = answers.final_number(completion)
    return {"correct": predicted == item["answer"], "prediction": predicted}


def _steps(item: dict) -> str:
    return f"steps={item['reference'].count('=')}"


def _tiny_items(path, split, limit, seed) -> list[dict]:
    return [{"id": str(i), **r} for i, r in enumerate(generate_records(limit or 200, seed + 2))]


def _held_out(difficulty: str) -> registry.EvalTask:
    return registry.EvalTask(
        f"synthetic_{difficulty}", needs_path=False, prompt=lambda item: item["prompt"],
        load=lambda path, split, limit, seed: eval_records(limit or 200, seed, difficulty),
        grade=_grade, difficulty=_steps)


def _accept(prompt: str, text: str, reference: str) -> str | None:
    """Right final answer, and (for the demo world's problems) every step right."""
    if not answers.answers_match("synthetic", text, reference):
        return "wrong_answer"
    return "wrong_steps" if trace_is_exact(prompt, text) is False else None


# "synthetic": the tiny world's records and task; "synthetic_easy" / "synthetic_hard": the demo
# world's held-out problems.
EVAL_TASKS = [registry.EvalTask("synthetic", load=_tiny_items, prompt=lambda item: item["prompt"],
                                grade=_grade, difficulty=_steps, needs_path=False),
              _held_out("easy"), _held_out("hard")]
REWRITE_FAMILIES = [registry.RewriteFamily("synthetic", REWRITE_TEMPLATES["synthetic"], _accept)]
RECORD_SOURCES = {"synthetic": generate_records}
TOKENIZERS = {"synthetic": tokenizer}
