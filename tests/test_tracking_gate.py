"""The promotion gate's decision as a pure function: numbers and data digests in, decision and reason
out, no MLflow store. (The promotion that reads and writes the registry is in test_tracking.py.)"""

from __future__ import annotations

import math

import pytest

from rft_core.tracking.gate import GateDecision, Health, Measurement, decide


def gate(challenger: Measurement, champion: Measurement | None, **rules: object) -> GateDecision:
    return decide(challenger, champion, metric="eval/accuracy", **rules)  # type: ignore[arg-type]


def test_a_better_challenger_on_the_same_data_is_promoted_with_the_numbers_in_the_reason() -> None:
    decision = gate(Measurement(2, 0.75, "val"), Measurement(1, 0.5, "val"))
    assert decision == GateDecision(
        promoted=True,
        reason="better: eval/accuracy 0.75 vs champion v1 0.5 (gain +0.25, min_improvement 0)",
        challenger_value=0.75,
        champion_version=1,
        champion_value=0.5,
        rule="better",
    )


def test_a_tie_is_refused() -> None:
    decision = gate(Measurement(2, 0.5, "val"), Measurement(1, 0.5, "val"))
    assert not decision.promoted
    assert decision.reason == (
        "not better by more than min_improvement: eval/accuracy 0.5 vs champion v1 0.5 "
        "(gain +0, min_improvement 0)"
    )
    assert (decision.challenger_value, decision.champion_value) == (0.5, 0.5)


def test_a_gain_must_exceed_min_improvement_strictly() -> None:
    champion = Measurement(1, 0.5, "val")
    assert gate(Measurement(2, 0.75, "val"), champion, min_improvement=0.125).promoted
    exactly = gate(Measurement(2, 0.75, "val"), champion, min_improvement=0.25)
    assert not exactly.promoted
    assert "(gain +0.25, min_improvement 0.25)" in exactly.reason
    assert not gate(Measurement(2, 0.75, "val"), champion, min_improvement=0.5).promoted


def test_lower_is_better_flips_the_sign_of_the_gain() -> None:
    lower, higher = Measurement(2, 1.5, "val"), Measurement(1, 2.0, "val")
    promoted = gate(lower, higher, greater_is_better=False)
    assert promoted.promoted and "(gain +0.5," in promoted.reason
    refused = gate(lower, higher, greater_is_better=True)
    assert not refused.promoted and "(gain -0.5," in refused.reason
    assert not gate(Measurement(3, 2.5, "val"), higher, greater_is_better=False).promoted


def test_without_a_champion_the_first_version_is_promoted() -> None:
    decision = gate(Measurement(1, 0.3, "val"), None)
    assert decision == GateDecision(True, "no champion yet; eval/accuracy=0.3", 0.3, None, None, "no-champion")


def test_a_champion_measured_on_other_data_is_not_compared() -> None:
    decision = gate(Measurement(2, 0.6, "val-new"), Measurement(1, 0.9, "val-old"))
    assert not decision.promoted
    assert decision.reason == (
        "champion v1 was validated on data val-old, the challenger on val-new, "
        "and no evaluator was given to score it on the current data"
    )
    # Its value on the other data is not reported as if it were comparable.
    assert (decision.champion_version, decision.champion_value) == (1, None)


def test_unknown_digests_never_count_as_the_same_data() -> None:
    decision = gate(Measurement(2, 0.6, None), Measurement(1, 0.1, None))
    assert not decision.promoted
    assert "was validated on data (unknown), the challenger on (unknown)" in decision.reason
    assert decision.champion_value is None


def test_a_champion_without_a_value_on_the_same_data_is_not_compared() -> None:
    decision = gate(Measurement(2, 0.6, "val"), Measurement(1, None, "val"))
    assert not decision.promoted
    assert decision.reason.startswith("champion v1 has no 'eval/accuracy' tag, and no evaluator")


def test_a_challenger_without_a_value_is_refused_even_without_a_champion() -> None:
    for champion in (None, Measurement(1, 0.5, "val")):
        decision = gate(Measurement(2, None, "val"), champion)
        assert not decision.promoted
        assert decision.reason == (
            "version 2 has no 'eval/accuracy' tag (metric.eval/accuracy); nothing to compare"
        )


def test_force_promotes_whatever_the_numbers_and_still_reports_them() -> None:
    over_better = gate(Measurement(2, 0.1, "val"), Measurement(1, 0.8, "val"), force=True)
    assert over_better == GateDecision(True, "forced over champion v1", 0.1, 1, 0.8, "forced")
    assert gate(Measurement(1, None, None), None, force=True) == GateDecision(
        True, "forced over champion (none)", None, None, None, "forced"
    )
    other_data = gate(Measurement(2, 0.1, "new"), Measurement(1, 0.8, "old"), force=True)
    assert other_data.promoted and other_data.champion_value is None


# --------------------------------------------------------------------------- the challenger's health


@pytest.mark.parametrize("champion", [None, Measurement(1, 0.2, "val")], ids=["no champion", "weaker champion"])
def test_a_model_worse_than_its_warm_up_start_is_never_promoted(champion) -> None:
    decision = gate(Measurement(2, 0.40, "val"), champion, health=Health(start_value=0.83))
    assert not decision.promoted
    assert decision.rule == "worse-than-start"
    assert decision.reason == (
        "worse than the model its training started from: eval/accuracy 0.4 vs 0.83 at the start, "
        "on the same validation data"
    )


def test_as_good_as_its_start_is_not_refused_by_the_start_rule() -> None:
    assert gate(Measurement(2, 0.5, "val"), None, health=Health(start_value=0.5)).rule == "no-champion"
    assert gate(Measurement(2, 0.6, "val"), None, health=Health(start_value=0.5)).promoted


def test_worse_than_start_follows_the_metric_direction() -> None:
    loss_up = gate(Measurement(2, 2.0, "val"), None, greater_is_better=False, health=Health(start_value=1.5))
    assert loss_up.rule == "worse-than-start" and not loss_up.promoted
    loss_down = gate(Measurement(2, 1.0, "val"), None, greater_is_better=False, health=Health(start_value=1.5))
    assert loss_down.promoted


@pytest.mark.parametrize(
    ("value", "health"),
    [
        (0.9, Health(weights_finite=False)),
        (math.nan, Health()),
        (math.inf, Health()),
        (math.nan, Health(weights_finite=True, start_value=0.1)),
    ],
    ids=["nan weights", "nan metric", "inf metric", "nan metric, finite weights"],
)
@pytest.mark.parametrize("force", [False, True])
def test_non_finite_models_are_never_promoted_even_forced(value, health, force) -> None:
    for champion in (None, Measurement(1, 0.1, "val")):
        decision = gate(Measurement(2, value, "val"), champion, health=health, force=force)
        assert not decision.promoted
        assert decision.rule == "non-finite"
        assert "never promoted, even forced" in decision.reason


@pytest.mark.parametrize("share", [0.51, 0.9, 1.0])
def test_a_model_graded_mostly_by_errors_is_refused_even_without_a_champion(share) -> None:
    decision = gate(Measurement(2, 0.0, "val"), None, health=Health(grader_error_share=share))
    assert not decision.promoted
    assert decision.rule == "grader-errors"
    assert f"{share:.0%} of version 2's validation grades were grader errors" in decision.reason


def test_the_grader_error_limit_is_a_setting_and_a_share_at_it_passes() -> None:
    assert gate(Measurement(2, 0.5, "val"), None, health=Health(grader_error_share=0.5)).promoted
    strict = gate(Measurement(2, 0.5, "val"), None, health=Health(grader_error_share=0.1), max_grader_error_share=0.05)
    assert strict.rule == "grader-errors"


def test_force_overrides_the_start_and_error_rules_but_reports_the_forcing() -> None:
    sick = Health(start_value=0.9, grader_error_share=0.8, weights_finite=True)
    decision = gate(Measurement(2, 0.1, "val"), None, health=sick, force=True)
    assert decision.promoted and decision.rule == "forced"


def test_health_rules_come_before_the_champion_comparison() -> None:
    # Better than the champion, but worse than where its own training started.
    decision = gate(Measurement(2, 0.6, "val"), Measurement(1, 0.5, "val"), health=Health(start_value=0.7))
    assert decision.rule == "worse-than-start" and not decision.promoted
