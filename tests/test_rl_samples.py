"""The RL trainer's samples hook: which iterations hand rollout samples over, and what a row holds."""

from __future__ import annotations

import json

import pytest
from training_fixtures import tiny_config, tiny_task

from rft_core.graders import GradeResult, build_grader
from rft_core.rl.trainer import LOGGED_SAMPLES, run_rl

COLUMNS = {"iteration", "id", "prompt", "completion", "reward", "error", "sub_rewards", "reference"}


class RefusesOddReferences:
    """A multi grader (sub-graders `answer` and `near`) that fails on items with an odd reference:
    grader errors in known rows."""

    name = "flaky"
    concurrent = False

    def __init__(self) -> None:
        self.inner = build_grader(
            {
                "type": "multi", "name": "mix", "calculate_output": "0.9 * answer + 0.1 * near",
                "graders": {
                    "answer": {"type": "numeric_match"},
                    "near": {"type": "text_similarity", "evaluation_metric": "fuzzy_match",
                             "input": "{{ sample.output_text }}", "reference": "{{ item.reference }}"},
                },
            }
        )

    def grade(self, sample, item) -> GradeResult:
        result = self.inner.grade(sample, item)
        if int(float(item["reference"])) % 2:
            return GradeResult.failure("flaky: odd reference refused", sub_rewards=result.sub_rewards)
        return result


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("samples")
    # 6 prompts x 4 samples = 24 rows an iteration, more than are logged; validated at 2 and 3. The
    # grader refuses about half the references on purpose (error rows in the table), more than the
    # default grader.max_error_share lets a run go on with.
    cfg = tiny_config(
        tmp, "rl.iterations=3", "rl.eval_interval=2", "rl.prompts_per_iteration=6", "rl.samples_per_prompt=4",
        "rl.minibatch_size=8", "grader.max_error_share=0.75",
    )
    train, _, model_dir = tiny_task(tmp, cfg)
    val = train.iloc[:4]
    calls: list[list[dict]] = []
    run_rl(cfg, train, val, model_dir, tmp / "rl", grader=RefusesOddReferences(), log_samples=calls.append)
    return train, calls


def test_samples_are_handed_over_at_the_first_each_validated_and_the_last_iteration(samples):
    _, calls = samples
    assert [{row["iteration"] for row in rows} for rows in calls] == [{1}, {2}, {3}]
    assert all(len(rows) == LOGGED_SAMPLES for rows in calls)


def test_a_sample_row_has_the_items_prompt_and_reference_and_its_grade(samples):
    train, calls = samples
    by_id = {str(row["id"]): row for _, row in train.iterrows()}
    rows = [row for rows in calls for row in rows]
    assert all(set(row) == COLUMNS for row in rows)
    for row in rows:
        item = by_id[row["id"]]
        assert row["prompt"] == item["prompt"] and row["reference"] == item["reference"]
        assert isinstance(row["completion"], str)
        assert set(json.loads(row["sub_rewards"])) == {"answer", "near"}
        if int(float(row["reference"])) % 2:
            assert row["reward"] is None and row["error"] == "flaky: odd reference refused"
        else:
            assert 0.0 <= row["reward"] <= 1.0 and row["error"] == ""
    # The samples of a prompt come together (4 per prompt), the first prompts of the iteration.
    first = calls[0]
    assert [row["id"] for row in first[:4]] == [first[0]["id"]] * 4
    assert any(row["reward"] is None for row in rows) and any(row["reward"] is not None for row in rows)
