"""The built-in task: multi-step arithmetic word problems over named quantities.

    Ann has 9 pens. Bob has 13 more pens than Ann. Cal has 2 fewer pens than Bob.
    How many pens does Cal have?
    ->  Bob: 9+13=22. Cal: 22-2=20.
        #### 20

Each step defines a new person from the previous one (more, fewer, times, half/a third) or from
the previous one and an earlier one (together), so every step is needed and the skill that matters
is looking up a named quantity, as in GSM8K but compact enough for a ~1M-parameter model on a CPU
(a 4-step prompt stays within 200 characters, its solution under ~70). Every quantity is an
integer in 1..max_value. Some problems carry one unrelated fact (a distractor).

Records are GSM8K-shaped, `{"question", "answer", "steps", "slip"}` with answer = solution +
"\\n#### value" (or just "#### value" for items without a worked solution), so the GSM8K loader
reads them. With `slip_fraction`, that share of worked solutions contains exactly one arithmetic
slip, later steps consistent with it: the solution concludes with its own wrong `#### x` line,
and a last `#### value` line (what loaders take as the reference) stays true. Validation items always carry a correct solution. Train and validation are
disjoint by normalised prompt and by prompt-up-to-numbers, and everything follows from the seed.

`pretraining_documents` writes generic text of the same family (single operations, look-ups, short
chains, definitions then evaluation) for a short pretraining of the tiny model.

`generate`, `write_synthetic` and `pretraining_documents` serve the task `cfg.task` names: this
module's arithmetic, or the ranking task of `cases.py` (see `TASKS`).
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

from rft_core.config import SyntheticConfig
from rft_core.data import cases
from rft_core.data.split import normalize_prompt, numbers_stripped

NAMES = (
    "Ann", "Bob", "Cal", "Dan", "Eve", "Fay", "Gus", "Hal", "Ivy", "Jay", "Kim", "Lea", "Max", "Ned",
    "Oli", "Pam", "Ray", "Sam", "Tom", "Uma", "Val", "Wes", "Zoe", "Amy", "Ben", "Dot", "Eli", "Flo",
    "Gil", "Ida", "Jon", "Kai", "Lou", "Mia", "Pat", "Rex", "Sue", "Ted", "Viv", "Abe",
)  # fmt: skip
# Regular plurals only: the singular is the word without its final "s".
OBJECTS = (
    "pens", "apples", "coins", "books", "cards", "shells", "stamps", "cups", "hats", "toys", "seeds",
    "eggs", "beads", "plums", "rocks", "keys", "bells", "kites", "pins", "nuts", "dolls", "bags",
    "mugs", "jars", "socks", "pears", "shirts", "bowls",
)  # fmt: skip
MAX_ANSWER_SHARE = 0.06  # no answer value is more common than this in a generated set
CHARS_PER_STEP = 50  # prompt budget: a 4-step prompt (and anything shorter) within 200 characters
_SYMBOL = {"add": "+", "sub": "-", "mul": "*", "div": "/", "sum": "+"}
_OP_WEIGHTS = {"add": 3.0, "sub": 3.0, "mul": 2.0, "div": 1.5, "sum": 2.0}
_MAX_FACTOR = 5  # "k times as many" stays readable and keeps values small
_SLIP_DELTAS = (-10, -2, -1, 1, 2, 10)  # off by one, two, ten: the slips people make


@dataclass(frozen=True)
class Step:
    """Person number `target` is defined from person `source` (and `other`, for "sum")."""

    op: str  # add, sub, mul, div, sum
    source: int
    operand: int | None = None  # k for add, sub, mul, div
    other: int | None = None  # the second person of "sum"


@dataclass(frozen=True)
class WordProblem:
    """One problem: people[0] starts with `start`; step i defines people[i + 1]."""

    people: tuple[str, ...]
    obj: str
    start: int
    steps: tuple[Step, ...]
    distractor: tuple[str, int] | None = None
    distractor_at: int = 1  # position among the statements

    def values(self) -> list[int]:
        """The true quantity of every person, in order."""
        values = [self.start]
        for step in self.steps:
            values.append(_apply(step, values))
        return values

    @property
    def answer(self) -> int:
        return self.values()[-1]

    def question(self) -> str:
        statements = [f"{self.people[0]} has {_count(self.start, self.obj)}."]
        statements += [_statement(step, self.people[i + 1], self.people, self.obj) for i, step in enumerate(self.steps)]
        if self.distractor is not None:
            name, value = self.distractor
            statements.insert(self.distractor_at, f"{name} has {_count(value, self.obj)}.")
        return " ".join([*statements, f"How many {self.obj} does {self.people[-1]} have?"])

    def solution(self, values: list[int] | None = None) -> str:
        """The worked solution, one "Name: a+b=c." per step, from `values` (default: the true ones)."""
        values = self.values() if values is None else values
        parts = []
        for i, step in enumerate(self.steps):
            right = values[step.other] if step.op == "sum" else step.operand
            parts.append(f"{self.people[i + 1]}: {values[step.source]}{_SYMBOL[step.op]}{right}={values[i + 1]}.")
        return " ".join(parts)


def _apply(step: Step, values: list[int]) -> int | None:
    """The value a step gives from earlier values; None when it is not a whole number >= 0."""
    a = values[step.source]
    if step.op == "add":
        result = a + step.operand
    elif step.op == "sub":
        result = a - step.operand
    elif step.op == "mul":
        result = a * step.operand
    elif step.op == "div":
        result = a // step.operand if a % step.operand == 0 else None
    else:
        result = a + values[step.other]
    return result if result is not None and result >= 0 else None


def _noun(n: int, obj: str) -> str:
    return obj if n != 1 else obj[:-1]


def _count(n: int, obj: str) -> str:
    return f"{n} {_noun(n, obj)}"


def _statement(step: Step, name: str, people: tuple[str, ...], obj: str) -> str:
    ref = people[step.source]
    if step.op == "add":
        return f"{name} has {step.operand} more {_noun(step.operand, obj)} than {ref}."
    if step.op == "sub":
        return f"{name} has {step.operand} fewer {_noun(step.operand, obj)} than {ref}."
    if step.op == "mul":
        times = "twice" if step.operand == 2 else f"{step.operand} times"
        return f"{name} has {times} as many {obj} as {ref}."
    if step.op == "div":
        part = "half" if step.operand == 2 else "a third"
        return f"{name} has {part} as many {obj} as {ref}."
    return f"{name} has as many {obj} as {ref} and {people[step.other]} together."


# --------------------------------------------------------------------------- drawing problems


def _draw_step(rng: random.Random, values: list[int], cfg: SyntheticConfig) -> Step:
    """A step from the latest person, among the operations that keep the result in 1..max_value."""
    last = len(values) - 1
    a = values[last]
    earlier = [i for i in range(last) if a + values[i] <= cfg.max_value]
    options = []
    if a + 1 <= cfg.max_value:
        options.append("add")
    if a >= 2:
        options.append("sub")
    if a * 2 <= cfg.max_value:
        options.append("mul")
    if a % 2 == 0 or a % 3 == 0:
        options.append("div")
    if earlier:
        options.append("sum")
    op = rng.choices(options, weights=[_OP_WEIGHTS[o] for o in options])[0]
    if op == "add":
        return Step("add", last, rng.randint(1, min(cfg.max_operand, cfg.max_value - a)))
    if op == "sub":
        return Step("sub", last, rng.randint(1, min(cfg.max_operand, a - 1)))
    if op == "mul":
        return Step("mul", last, rng.randint(2, max(2, min(_MAX_FACTOR, cfg.max_operand, cfg.max_value // a))))
    if op == "div":
        return Step("div", last, rng.choice([d for d in (2, 3) if a % d == 0]))
    return Step("sum", last, other=rng.choice(earlier))


def draw_problem(rng: random.Random, cfg: SyntheticConfig, n_steps: int, distractor: bool = False) -> WordProblem:
    """One random problem of `n_steps` steps (with one unrelated fact when `distractor`)."""
    names = rng.sample(NAMES, n_steps + 2)
    start = rng.randint(2, min(cfg.max_operand, cfg.max_value))
    values = [start]
    steps = []
    for _ in range(n_steps):
        step = _draw_step(rng, values, cfg)
        steps.append(step)
        values.append(_apply(step, values))
    problem = WordProblem(people=tuple(names[: n_steps + 1]), obj=rng.choice(OBJECTS), start=start, steps=tuple(steps))
    if distractor:
        extra = WordProblem(
            people=problem.people, obj=problem.obj, start=start, steps=problem.steps,
            distractor=(names[-1], rng.randint(1, cfg.max_operand)), distractor_at=rng.randint(1, n_steps),
        )
        # A distractor must not push the prompt past the length budget of the tiny model.
        if len(extra.question()) <= prompt_budget(n_steps):
            return extra
    return problem


def prompt_budget(n_steps: int) -> int:
    """Longest prompt drawn for `n_steps` steps: 200 characters up to 4 steps, 50 more per step after."""
    return CHARS_PER_STEP * max(4, n_steps)


def slipped_values(problem: WordProblem, rng: random.Random) -> list[int]:
    """The quantities with exactly one arithmetic slip, later steps computed from it, ending wrong.

    Tries steps and slip sizes in random order; a slip that would make a later step impossible
    (a half of an odd number) or cancel out is skipped. A slip on the last step always works.
    """
    true = problem.values()
    n = len(problem.steps)
    for j in rng.sample(range(n), n):
        for delta in rng.sample(_SLIP_DELTAS, len(_SLIP_DELTAS)):
            values = [*true[: j + 1], true[j + 1] + delta]
            if values[-1] < 0:
                continue
            for step in problem.steps[j + 1 :]:
                result = _apply(step, values)
                if result is None:
                    break
                values.append(result)
            if len(values) == len(true) and values[-1] != true[-1]:
                return values
    return [*true[:-1], true[-1] + 1]


def _draw_set(
    rng: random.Random,
    cfg: SyntheticConfig,
    n: int,
    forbidden_prompts: set[str],
    forbidden_templates: set[str],
) -> list[WordProblem]:
    """`n` problems with distinct normalised prompts, none in the forbidden prompts or templates."""
    problems: list[WordProblem] = []
    seen: set[str] = set()
    answers: dict[int, int] = {}
    attempts = 0
    while len(problems) < n:
        attempts += 1
        if attempts > 100 * n + 1000:
            raise ValueError(
                f"cannot draw {n} distinct problems with these settings (steps {cfg.min_steps}-{cfg.max_steps}, "
                f"max_operand {cfg.max_operand}); widen them or ask for fewer items"
            )
        n_steps = rng.randint(cfg.min_steps, cfg.max_steps)
        problem = draw_problem(rng, cfg, n_steps, distractor=rng.random() < cfg.distractor_fraction)
        question = problem.question()
        if len(question) > prompt_budget(n_steps):
            continue
        key = normalize_prompt(question)
        if key in seen or key in forbidden_prompts or numbers_stripped(question) in forbidden_templates:
            continue
        # Halves, thirds and differences pile answers up on small numbers; capping any one answer
        # at MAX_ANSWER_SHARE keeps "always answer 1" from scoring like a model.
        if answers.get(problem.answer, 0) >= max(10, MAX_ANSWER_SHARE * n):
            continue
        answers[problem.answer] = answers.get(problem.answer, 0) + 1
        seen.add(key)
        problems.append(problem)
    return problems


def _record(problem: WordProblem, with_solution: bool, slip_values: list[int] | None) -> dict:
    answer = f"#### {problem.answer}"
    if with_solution and slip_values is not None:
        # The annotator concludes from their own slipped chain; the last marker (what the loader
        # takes as the reference) stays the true answer.
        answer = f"{problem.solution(slip_values)}\n#### {slip_values[-1]}\n{answer}"
    elif with_solution:
        answer = problem.solution() + "\n" + answer
    return {"question": problem.question(), "answer": answer, "steps": len(problem.steps),
            "slip": slip_values is not None}


def generate_arithmetic(cfg: SyntheticConfig) -> tuple[list[dict], list[dict]]:
    """(train, validation) records, GSM8K-shaped; see the module docstring.

    Validation is drawn first from its own stream, so it does not change with `n_train`.
    Exactly round(solution_fraction * n_train) training items carry a solution, and exactly
    round(slip_fraction * that) of those solutions carry a slip.
    """
    val_rng = random.Random(f"rft-synthetic:{cfg.seed}:val")
    train_rng = random.Random(f"rft-synthetic:{cfg.seed}:train")
    val = _draw_set(val_rng, cfg, cfg.n_val, set(), set())
    val_prompts = {normalize_prompt(p.question()) for p in val}
    val_templates = {numbers_stripped(p.question()) for p in val}
    train = _draw_set(train_rng, cfg, cfg.n_train, val_prompts, val_templates)

    with_solution = set(train_rng.sample(range(len(train)), round(cfg.solution_fraction * len(train))))
    slipped = set(train_rng.sample(sorted(with_solution), round(cfg.slip_fraction * len(with_solution))))
    train_records = [
        _record(p, i in with_solution, slipped_values(p, train_rng) if i in slipped else None)
        for i, p in enumerate(train)
    ]
    val_records = [_record(p, True, None) for p in val]
    return train_records, val_records


def write_synthetic(cfg: SyntheticConfig, out_dir: str | Path) -> tuple[Path, Path]:
    """Write `train.jsonl` and `val.jsonl` under `out_dir`; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train, val = generate(cfg)
    paths = []
    for name, records in (("train", train), ("val", val)):
        path = out_dir / f"{name}.jsonl"
        partial = out_dir / f".{name}.jsonl.{os.getpid()}.partial"
        with partial.open("w", encoding="utf-8", newline="\n") as out:
            for record in records:
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(partial, path)  # readers never see half a file
        paths.append(path)
    return paths[0], paths[1]


# --------------------------------------------------------------------------- pretraining text


_SENTENCE_BREAK = re.compile(r"(?<=[.?])\s+")


def _contains_excluded(text: str, excluded: set[str]) -> bool:
    """Whether the question of a document ends with (so contains) an excluded prompt.

    Excluded prompts end in their question, and a document holds at most one question, so checking
    every sentence-suffix of the document's first line is complete.
    """
    first_line = text.split("\n", 1)[0]
    if "?" not in first_line or not excluded:
        return False
    sentences = _SENTENCE_BREAK.split(first_line)
    return any(normalize_prompt(" ".join(sentences[i:])) in excluded for i in range(len(sentences)))


def _operation_doc(rng: random.Random, cfg: SyntheticConfig) -> str:
    op = rng.choice(("add", "sub", "mul", "div"))
    if op == "add":
        a, b = rng.randint(0, cfg.max_value - 1), rng.randint(1, cfg.max_operand)
        return f"{a}+{b}={a + b}"
    if op == "sub":
        a = rng.randint(1, cfg.max_value)
        b = rng.randint(1, min(a, cfg.max_operand))
        return f"{a}-{b}={a - b}"
    if op == "mul":
        b = rng.randint(2, _MAX_FACTOR)
        a = rng.randint(0, cfg.max_value // b)
        return f"{a}*{b}={a * b}"
    b = rng.choice((2, 3))
    q = rng.randint(0, cfg.max_value // b)
    return f"{q * b}/{b}={q}"


def _lookup_doc(rng: random.Random, cfg: SyntheticConfig) -> str:
    names = rng.sample(NAMES, rng.randint(2, 4))
    obj = rng.choice(OBJECTS)
    counts = [rng.randint(1, cfg.max_value) for _ in names]
    asked = rng.randrange(len(names))
    facts = " ".join(f"{name} has {_count(c, obj)}." for name, c in zip(names, counts, strict=True))
    return f"{facts} How many {obj} does {names[asked]} have?\n#### {counts[asked]}"


def _chain_doc(rng: random.Random, cfg: SyntheticConfig) -> str:
    problem = draw_problem(rng, cfg, rng.randint(1, 2))
    return f"{problem.question()}\n{problem.solution()}\n#### {problem.answer}"


def _definitions_doc(rng: random.Random, cfg: SyntheticConfig) -> str:
    problem = draw_problem(rng, cfg, rng.randint(1, min(3, cfg.max_steps)))
    definitions = problem.question().rsplit(" How many", 1)[0]
    return f"{definitions}\n{problem.solution()}"


_DOC_KINDS = ((_operation_doc, 0.2), (_lookup_doc, 0.25), (_chain_doc, 0.35), (_definitions_doc, 0.2))


def arithmetic_pretraining_documents(
    cfg: SyntheticConfig, n: int, seed: int, exclude: set[str] | tuple = ()
) -> list[str]:
    """`n` short documents of the task's family, in the task's surface format, for pretraining:
    single operations ("9+13=22"), value look-ups, 1-2-step chains with worked solutions, and
    definitions followed by their evaluation. None contains a prompt in `exclude` (pass the
    validation prompts), compared after normalising whitespace and case.
    """
    rng = random.Random(f"rft-pretraining:{seed}")
    excluded = {normalize_prompt(p) for p in exclude}
    kinds, weights = zip(*_DOC_KINDS, strict=True)
    documents: list[str] = []
    while len(documents) < n:
        make = rng.choices(kinds, weights=weights)[0]
        document = make(rng, cfg)
        if not _contains_excluded(document, excluded):
            documents.append(document)
    return documents


# --------------------------------------------------------------------------- the task table


# task name -> (train and validation records, pretraining documents)
TASKS = {
    "arithmetic": (generate_arithmetic, arithmetic_pretraining_documents),
    "rank": (cases.generate, cases.pretraining_documents),
}


def generate(cfg: SyntheticConfig) -> tuple[list[dict], list[dict]]:
    """(train, validation) records of the task `cfg.task` names."""
    return TASKS[cfg.task][0](cfg)


def pretraining_documents(cfg: SyntheticConfig, n: int, seed: int, exclude: set[str] | tuple = ()) -> list[str]:
    """`n` pretraining documents of the family of `cfg.task`, none holding a prompt in `exclude`."""
    return TASKS[cfg.task][1](cfg, n, seed, exclude)
