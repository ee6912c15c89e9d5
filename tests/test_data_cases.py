"""The ranking task: a catalogue that needs absent findings, honest worked solutions, balanced causes,
disjoint sets, its config, its grading, and its pretraining text."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pydantic
import pytest

from rft_core.config import RFTConfig, SyntheticConfig
from rft_core.data import generate, load_items, pretraining_documents, write_synthetic
from rft_core.data.cases import CATALOGUE, CAUSES, FINDINGS, Case, case_key, findings_of, profile_overlaps
from rft_core.graders import build_grader
from rft_core.graders.rank import rank_score, ranked_list
from rft_core.sft import solution_target
from rft_core.tiny import tiny_digest

ROOT = Path(__file__).resolve().parents[1]
EVIDENCE = re.compile(r"^([a-z ]+): (.+) = (-?\d+)$")
SCORES = (1.0, 0.7, 0.5)


def prompt_of(record: dict) -> str:
    return record["messages"][-1]["content"]


@pytest.fixture(scope="module")
def dataset():
    cfg = SyntheticConfig(task="rank", n_train=2000, n_val=300, solution_fraction=0.1, seed=3)
    return cfg, *generate(cfg)


def test_catalogue_pairs_siblings_that_differ_by_one_finding_and_crosses_pairs():
    assert (len(CAUSES), len(FINDINGS)) == (10, 17)
    overlaps = profile_overlaps()
    siblings = {(a, b) for a, b, shared, different in overlaps if different == 2 and shared >= 3}
    # Five pairs that share all but one finding each: every cause has exactly one sibling.
    assert siblings == {("flu", "covid"), ("cold", "allergy"), ("strep", "mono"),
                        ("pneumonia", "bronchitis"), ("stomach bug", "food poisoning")}
    for a, b in siblings:
        shared = set(CATALOGUE[a]) & set(CATALOGUE[b])
        assert all(CATALOGUE[a][f] == CATALOGUE[b][f] for f in shared)  # neither sibling is the better guess
    # Common findings cross the pairs, so present findings alone point at several causes.
    assert len(overlaps) == 31
    carriers = Counter(f for profile in CATALOGUE.values() for f in profile)
    assert (carriers["fever"], carriers["cough"], carriers["fatigue"]) == (6, 6, 4)


def test_same_seed_same_items_other_seed_other_items():
    cfg = SyntheticConfig(task="rank", n_train=300, n_val=50, solution_fraction=0.5)
    train, val = generate(cfg)
    assert (train, val) == generate(cfg)
    other_train, _ = generate(cfg.model_copy(update={"seed": 1}))
    assert len({prompt_of(r) for r in train} & {prompt_of(r) for r in other_train}) < 5


def test_validation_set_does_not_move_when_the_training_set_grows():
    _, small_val = generate(SyntheticConfig(task="rank", n_train=100, n_val=50))
    _, large_val = generate(SyntheticConfig(task="rank", n_train=1000, n_val=50))
    assert small_val == large_val


def test_train_and_validation_are_disjoint_by_findings_whatever_the_age_or_order(dataset):
    _, train, val = dataset
    assert (len(train), len(val)) == (2000, 300)
    train_keys = {case_key(prompt_of(r)) for r in train}
    assert len(train_keys) == 2000  # no two training cases with the same findings either
    assert not train_keys & {case_key(prompt_of(r)) for r in val}


def test_causes_are_balanced_exactly(dataset):
    _, train, val = dataset
    assert Counter(r["reference"] for r in train) == {cause: 200 for cause in CAUSES}
    assert Counter(r["reference"] for r in val) == {cause: 30 for cause in CAUSES}


def test_the_rule_ranks_the_true_cause_first_and_absent_findings_decide_a_third_of_cases(dataset):
    _, train, val = dataset
    for record in train + val:
        present, absent = case_key(prompt_of(record))
        case = Case(30, "Man", tuple(present), tuple(absent), record["reference"])
        assert case.first_alone()
        assert case.needs_absent() == record["needs_absent"]
        assert len(present) >= 1 and 1 <= len(absent) <= 3
    share = sum(r["needs_absent"] for r in train + val) / len(train + val)
    assert 0.25 < share < 0.40, share
    # In those cases a rival explains as many present findings, and an absent finding rules it out.
    for record in (r for r in val if r["needs_absent"]):
        present, absent = case_key(prompt_of(record))
        explained = {c: len(present & set(CATALOGUE[c])) for c in CAUSES}
        cause = record["reference"]
        rivals = [c for c in CAUSES if c != cause and explained[c] >= explained[cause]]
        assert any(absent & set(CATALOGUE[c]) for c in rivals)


def test_worked_solutions_tally_every_candidate_and_end_with_a_list_scoring_one(dataset):
    _, train, val = dataset
    solved = [r for r in train if "solution" in r] + val
    assert len(solved) == 200 + 300
    rank = build_grader({"type": "rank", "name": "rank", "scores": list(SCORES)})
    for record in solved:
        *evidence, ranking = record["solution"].split("\n")
        present, absent = case_key(prompt_of(record))
        tallies = {}
        for line in evidence:
            cause, items, score = EVIDENCE.match(line).groups()
            items = [] if items == "none" else items.split(", ")
            supports = [i for i in items if not i.startswith("no ")]
            against = [i[3:] for i in items if i.startswith("no ")]
            assert set(supports) == present & set(CATALOGUE[cause])
            assert set(against) == absent & set(CATALOGUE[cause])
            assert [i.removeprefix("no ") for i in items] == [f for f in CATALOGUE[cause] if f in present | absent]
            assert int(score) == len(supports) - len(against)
            tallies[cause] = int(score)
        # Three tallies in catalogue order (the decision comes after them), then the ranking by score.
        assert len(tallies) == 3 and list(tallies) == [c for c in CAUSES if c in tallies]
        by_score = sorted(tallies, key=lambda c: -tallies[c])
        assert ranking == f"Ranking: {', '.join(by_score)}"
        assert by_score[0] == record["reference"] and tallies[by_score[0]] > tallies[by_score[1]]
        assert ranked_list(record["solution"]) == by_score
        assert rank.grade(record["solution"], record).reward == 1.0
        # What warm-up SFT trains on (the solution plus its `#### answer` line) grades the same.
        assert rank.grade(solution_target(record["solution"], record["reference"]), record).reward == 1.0


def test_prompts_and_solutions_fit_the_tiny_model(dataset):
    _, train, val = dataset
    assert max(len(prompt_of(r)) for r in train + val) <= 140
    assert max(len(r["solution"]) for r in val) <= 220  # 40-63 tokens of the tiny model
    assert all(prompt_of(r).endswith(" Likely causes?") for r in train + val)
    assert re.fullmatch(r"(Man|Woman), \d+\. Has [a-z ,]+\. No [a-z ,]+\. Likely causes\?", prompt_of(val[0]))


def test_generated_files_load_as_openai_items_with_the_cause_as_reference(tmp_path):
    cfg = SyntheticConfig(task="rank", n_train=200, n_val=40, solution_fraction=0.25)
    train_path, val_path = write_synthetic(cfg, tmp_path)
    train = load_items(train_path, RFTConfig().data, numeric=False)
    val = load_items(val_path, RFTConfig().data, numeric=False)
    assert (train.format, train.rows, train.valid, val.valid) == ("openai", 200, 200, 40)
    assert train.frame["solution"].map(lambda s: s is None).sum() == 150
    assert set(train.frame["reference"]) == set(CAUSES)
    assert set(train.frame["needs_absent"]) == {True, False}  # kept for graders and analysis


def test_slips_are_refused_for_the_rank_task():
    with pytest.raises(pydantic.ValidationError, match="arithmetic task only"):
        SyntheticConfig(task="rank", slip_fraction=0.1)


def test_rank_yaml_runs_the_rank_task_with_the_rank_grader():
    cfg = RFTConfig.from_yaml(ROOT / "configs" / "rank.yaml")
    assert cfg.data.synthetic.task == "rank" and cfg.data.train_path is None
    spec = cfg.grader.resolved_spec()
    assert (spec["type"], spec["reference"], spec["scores"]) == ("rank", "{{ item.reference }}", list(SCORES))
    assert cfg.eval.pass_threshold == 1.0  # accuracy: the right cause ranked first
    assert cfg.registry.model_name == "rft-rank" != RFTConfig().registry.model_name
    assert cfg.rl.max_new_tokens >= 64 and cfg.eval.max_new_tokens >= 64  # room for a worked solution
    assert cfg.data.synthetic.slip_fraction == 0.0


@pytest.mark.parametrize(
    ("output", "score"),
    [
        ("flu: fever, cough = 2\ncovid: fever, cough, no loss of smell = 1\nRanking: flu, covid, cold\n#### flu", 1.0),
        ("1. covid\n2. flu\n3. pneumonia", 0.7),
        ("1. covid\n2. mono\n3. flu", 0.5),
        ("1. covid\n2. mono\n3. cold\n4. flu", 0.0),  # the config scores three positions only
        ("Likely causes: covid, FLU, cold", 0.7),
        ("flu: fever, cough = 2\ncovid: fever, cough = 2", 0.0),  # tallies without a ranking
        ("", 0.0),
    ],
)
def test_rank_config_grades_hand_written_outputs(output, score):
    spec = RFTConfig.from_yaml(ROOT / "configs" / "rank.yaml").grader.resolved_spec()
    assert build_grader(spec).grade(output, {"reference": "flu"}).reward == score
    assert rank_score(output, "flu", SCORES) == score


def test_pretraining_documents_state_the_catalogue_and_are_deterministic():
    cfg = SyntheticConfig(task="rank")
    docs = pretraining_documents(cfg, 2000, seed=0)
    assert docs == pretraining_documents(cfg, 2000, seed=0)
    assert docs != pretraining_documents(cfg, 2000, seed=1)
    assert pretraining_documents(SyntheticConfig(), 50, seed=0) != docs[:50]  # the arithmetic family
    profiles = [d for d in docs if re.fullmatch(r"[a-z ]+: [a-z ,]+", d)]
    associations = [d for d in docs if " is seen in " in d]
    tallies = [d for d in docs if d.startswith("Has ")]
    solved = [d for d in docs if "\nRanking: " in d]
    assert min(len(profiles), len(associations)) > 200 and min(len(tallies), len(solved)) > 500
    assert len(profiles) + len(associations) + len(tallies) + len(solved) == 2000
    for doc in profiles:
        cause, findings = doc.split(": ")
        assert findings.split(", ") == list(CATALOGUE[cause])
    for doc in associations:
        finding, causes = doc.split(" is seen in ")
        assert causes.split(", ") == [c for c in CAUSES if finding in CATALOGUE[c]]
    for doc in solved:  # short cases, ranked right
        prompt, solution = doc.split("\n", 1)
        present, absent = findings_of(prompt)
        assert len(present) <= 3 and len(absent) <= 2
        reference = Case(30, "Man", present, absent, ranked_list(solution)[0])
        assert reference.first_alone()
        assert solution == reference.solution()


def test_pretraining_documents_never_hold_the_findings_of_an_excluded_prompt():
    cfg = SyntheticConfig(task="rank")
    first = pretraining_documents(cfg, 3000, seed=4)
    cases = [d.split("\n")[0] for d in first if d.split("\n")[0].endswith("Likely causes?")]
    # Exclude these very cases, reworded as other patients with the findings in another order.
    excluded = set()
    for prompt in cases:
        present, absent = case_key(prompt)
        excluded.add(Case(44, "Woman", tuple(sorted(present)), tuple(sorted(absent)), "flu").prompt())
    assert len({case_key(p) for p in excluded}) > 100
    docs = pretraining_documents(cfg, 3000, seed=4, exclude=excluded)
    keys = {case_key(p) for p in excluded}
    assert not any(case_key(d) in keys for d in docs)


def test_the_tiny_model_of_the_rank_task_is_built_apart_from_the_arithmetic_one():
    rank = RFTConfig.from_yaml(ROOT / "configs" / "rank.yaml")
    arithmetic = rank.model_copy(update={"data": rank.data.model_copy(update={"synthetic": SyntheticConfig()})})
    assert tiny_digest(rank, ["x"]) != tiny_digest(arithmetic, ["x"])  # never reuses the other family's cache



def test_the_tally_checker_of_bench_rank_errors_counts_each_kind_of_slip():
    """bench/rank_errors.py's figures (what RL changed in the tallies) rest on this check."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("rank_errors", ROOT / "bench" / "rank_errors.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    case = Case(34, "Woman", ("fever", "cough", "body aches"), ("loss of smell",), "flu")
    assert case.first_alone()
    right = module.check(case.solution() + "\n#### flu", case.prompt(), "flu")
    assert right["right_first"] == right["all_lines_right"] == right["right_three"] == 1
    assert right["ranking_follows_tallies"] == 1 and right["lines"] == 3 and right["lines_wrong"] == 0
    # covid's line: loss of smell (absent) written as present, headache made up, body aches is not covid's;
    # flu's line misses body aches and its sum is off; the ranking does not follow the tallies.
    slips = (
        "flu: fever, cough = 3\n"
        "covid: fever, cough, headache, loss of smell, body aches = 5\n"
        "Ranking: flu, covid"
    )
    got = module.check(slips, case.prompt(), "flu")
    assert (got["right_first"], got["lines"], got["lines_wrong"], got["all_lines_right"]) == (1, 2, 2, 0)
    assert (got["made_up"], got["sign_flipped"], got["not_in_profile"], got["missed"]) == (1, 1, 1, 1)
    assert (got["arithmetic"], got["right_three"], got["ranking_follows_tallies"]) == (1, 0, 0)
