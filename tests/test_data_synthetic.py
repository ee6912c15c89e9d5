"""The built-in task: determinism, difficulty as configured, disjoint sets, honest slips, no easy guess."""

from __future__ import annotations

import re
from collections import Counter

import pydantic
import pytest

from rft_core.config import SyntheticConfig
from rft_core.data import generate, load_items, normalize_prompt, pretraining_documents, write_synthetic
from rft_core.data.split import numbers_stripped
from rft_core.graders.numeric import extract_answer

STEP = re.compile(r"(\w+): (\d+)([+\-*/])(\d+)=(\d+)\.")


def steps_of(solution: str) -> list[tuple[int, str, int, int]]:
    return [(int(a), op, int(b), int(c)) for _, a, op, b, c in STEP.findall(solution)]


def computed(a: int, op: str, b: int) -> float:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    return a * b if op == "*" else a / b


def solution_and_value(record: dict) -> tuple[str | None, int]:
    solution, _, value = record["answer"].rpartition("#### ")
    return (solution.strip() or None), int(value)


@pytest.fixture(scope="module")
def dataset():
    cfg = SyntheticConfig(n_train=1500, n_val=300, solution_fraction=0.6, slip_fraction=0.25, seed=11)
    return cfg, *generate(cfg)


def test_same_seed_same_items_other_seed_other_items():
    cfg = SyntheticConfig(n_train=200, n_val=50, slip_fraction=0.3, solution_fraction=0.5)
    assert generate(cfg) == generate(cfg)
    other_train, other_val = generate(cfg.model_copy(update={"seed": 1}))
    train, val = generate(cfg)
    assert len({r["question"] for r in train} & {r["question"] for r in other_train}) < 5


def test_validation_set_does_not_move_when_the_training_set_grows():
    _, small_val = generate(SyntheticConfig(n_train=100, n_val=50))
    _, large_val = generate(SyntheticConfig(n_train=1000, n_val=50))
    assert small_val == large_val


def test_train_and_validation_are_disjoint_by_prompt_and_by_template(dataset):
    _, train, val = dataset
    assert len(train) == 1500 and len(val) == 300
    train_keys = {normalize_prompt(r["question"]) for r in train}
    assert len(train_keys) == 1500  # no duplicate within train either
    assert not train_keys & {normalize_prompt(r["question"]) for r in val}
    assert not {numbers_stripped(r["question"]) for r in train} & {numbers_stripped(r["question"]) for r in val}


@pytest.mark.parametrize(("low", "high"), [(1, 1), (3, 3), (2, 4), (1, 5)])
def test_step_counts_follow_the_config(low, high):
    train, val = generate(SyntheticConfig(n_train=300, n_val=30, min_steps=low, max_steps=high, max_operand=20,
                                          max_value=200, solution_fraction=1.0))
    counts = Counter(r["steps"] for r in train + val)
    assert set(counts) == set(range(low, high + 1))
    for record in train + val:
        solution, _ = solution_and_value(record)
        assert len(steps_of(solution)) == record["steps"]
        # One defining statement per step, plus the first fact and at most one distractor.
        facts = record["question"].count(" has ")
        assert facts in (record["steps"] + 1, record["steps"] + 2)


def test_the_answer_is_not_guessable(dataset):
    _, train, val = dataset
    answers = Counter(solution_and_value(r)[1] for r in train + val)
    most_common, count = answers.most_common(1)[0]
    assert count / (len(train) + len(val)) < 0.10, most_common
    assert len(answers) > 20


def test_no_answer_is_more_common_than_the_cap_even_with_small_numbers():
    train, val = generate(SyntheticConfig(n_train=2000, n_val=300))  # the demo's small numbers
    for records in (train, val):
        answers = Counter(r["answer"].rsplit("####", 1)[1].strip() for r in records)
        assert answers.most_common(1)[0][1] <= 0.06 * len(records)


def test_correct_solutions_compute_every_step_and_end_on_the_answer(dataset):
    cfg, train, val = dataset
    for record in val + [r for r in train if not r["slip"]]:
        solution, value = solution_and_value(record)
        if solution is None:
            continue
        steps = steps_of(solution)
        assert all(computed(a, op, b) == c for a, op, b, c in steps)
        assert all(steps[i][0] == steps[i - 1][3] for i in range(1, len(steps)))  # a chain
        assert steps[-1][3] == value
        assert all(1 <= c <= cfg.max_value for *_, c in steps)  # whole, positive, bounded


def test_slipped_solutions_have_one_wrong_step_and_end_on_a_wrong_number(dataset):
    cfg, train, _ = dataset
    with_solution = [r for r in train if solution_and_value(r)[0] is not None]
    slipped = [r for r in train if r["slip"]]
    assert len(with_solution) == round(0.6 * 1500)
    assert len(slipped) == round(0.25 * len(with_solution))
    for record in slipped:
        solution, value = solution_and_value(record)
        steps = steps_of(solution)
        wrong = [i for i, (a, op, b, c) in enumerate(steps) if computed(a, op, b) != c]
        assert len(wrong) == 1, solution
        # Later steps are consistent with the slip: each starts from the result written before it.
        assert all(steps[i][0] == steps[i - 1][3] for i in range(1, len(steps)))
        assert float(extract_answer(solution)) != value
        assert steps[-1][3] != value
    # Items without a worked solution are just the answer, and load with solution None.
    assert sum(1 for r in train if r["answer"].startswith("#### ")) == 1500 - len(with_solution)


def test_generated_files_load_cleanly_with_solution_none_for_answer_only_items(tmp_path):
    cfg = SyntheticConfig(n_train=200, n_val=40, solution_fraction=0.25, slip_fraction=0.5)
    train_path, val_path = write_synthetic(cfg, tmp_path)
    train = load_items(train_path, numeric=True)
    val = load_items(val_path, numeric=True)
    assert (train.rows, train.valid, val.valid) == (200, 200, 40)
    assert train.frame["solution"].isna().sum() == 150
    assert train.frame["solution"].map(lambda s: s is None).sum() == 150
    slipped = train.frame[train.frame["slip"].astype(bool)]
    assert len(slipped) == 25
    assert all(extract_answer(s) != r for s, r in zip(slipped["solution"], slipped["reference"], strict=True))


def test_prompts_and_solutions_fit_the_tiny_model(dataset):
    _, train, val = dataset
    for record in train + val:
        solution, _ = solution_and_value(record)
        if record["steps"] <= 4:
            assert len(record["question"]) <= 200
        if solution is not None:
            assert len(solution) <= 120


def test_min_steps_above_max_steps_is_a_config_error():
    with pytest.raises(pydantic.ValidationError, match="min_steps"):
        SyntheticConfig(min_steps=5, max_steps=2)


def test_pretraining_documents_cover_the_family_and_are_deterministic():
    cfg = SyntheticConfig()
    docs = pretraining_documents(cfg, 400, seed=0)
    assert docs == pretraining_documents(cfg, 400, seed=0)
    assert docs != pretraining_documents(cfg, 400, seed=1)
    assert len(docs) == 400
    operations = [d for d in docs if re.fullmatch(r"\d+[+\-*/]\d+=\d+", d)]
    lookups = [d for d in docs if "?" in d and not any(w in d for w in (" more ", " fewer ", " as many "))]
    chains = [d for d in docs if "?" in d and "\n" in d and STEP.search(d)]
    definitions = [d for d in docs if "?" not in d and STEP.search(d)]
    assert min(len(operations), len(lookups), len(chains), len(definitions)) > 40
    assert all(computed(*map_op(d)) == int(d.split("=")[1]) for d in operations)
    for doc in lookups:
        question, answer = doc.split("\n#### ")
        asked = re.search(r"How many \w+ does (\w+) have\?", question).group(1)
        assert re.search(rf"{asked} has {answer} \w+\.", question)


def map_op(doc: str) -> tuple[int, str, int]:
    a, op, b = re.match(r"(\d+)([+\-*/])(\d+)=", doc).groups()
    return int(a), op, int(b)


def test_pretraining_documents_never_contain_an_excluded_prompt():
    cfg = SyntheticConfig(min_steps=1, max_steps=2)
    first = pretraining_documents(cfg, 600, seed=3)
    # Exclude the very prompts this seed produces: they must all disappear.
    excluded = {d.split("\n")[0].upper() for d in first if "?" in d}
    assert len(excluded) > 200
    docs = pretraining_documents(cfg, 600, seed=3, exclude=excluded)
    normalised = {normalize_prompt(p) for p in excluded}
    assert not any(normalize_prompt(d.split("\n")[0]) in normalised for d in docs)
