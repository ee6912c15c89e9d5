"""The promotion gate's decision as a pure function: numbers and data digests in, decision and reason
out, no MLflow store. (The promotion that reads and writes the registry is in test_tracking.py.)"""

from __future__ import annotations

from rft_core.tracking.gate import GateDecision, Measurement, decide


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
    assert decision == GateDecision(True, "no champion yet; eval/accuracy=0.3", 0.3, None, None)


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
    assert over_better == GateDecision(True, "forced over champion v1", 0.1, 1, 0.8)
    assert gate(Measurement(1, None, None), None, force=True) == GateDecision(
        True, "forced over champion (none)", None, None, None
    )
    other_data = gate(Measurement(2, 0.1, "new"), Measurement(1, 0.8, "old"), force=True)
    assert other_data.promoted and other_data.champion_value is None
