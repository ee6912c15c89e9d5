"""The promotion gate's decision: a pure function of the challenger's and the champion's values of
one metric, the digests of the validation data each value was measured on, and the challenger's
health (`Health`).

Rules, in order; the first that applies decides, and its name is `GateDecision.rule`:
1. `non-finite`: a challenger with non-finite weights or a non-finite metric value is refused,
   even with `force` (no use can be made of it).
2. `forced`: with `force`, promoted.
3. `no-value`: a challenger without a value of the metric is refused.
4. `grader-errors`: refused when more than `max_grader_error_share` of its validation grades were
   grader errors (its value measures the grader's failures, not the model).
5. `worse-than-start`: refused when it is worse than the model its training started from (the
   warm-up model, on the same data): training made it worse.
6. `no-champion`: promoted when there is no champion.
7. `champion-not-comparable`: refused when the champion has no value on the challenger's data (a
   value on other data proves nothing; `promotion` scores the champion on the challenger's data
   first when it can).
8. `better` / `not-better`: promoted when it beats the champion by more than `min_improvement`.
Rules 1, 3, 4 and 5 hold even when there is no champion yet. Nothing here reads or writes MLflow:
`promotion.promote` gathers the numbers and records the decision.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from rft_core.tracking.tags import METRIC_TAG_PREFIX


@dataclass(frozen=True)
class Measurement:
    """A version's value of the gate's metric (None: it has none), and the digest of the
    validation data it was measured on (None: unknown)."""

    version: int
    value: float | None
    data_digest: str | None


@dataclass(frozen=True)
class Health:
    """What the gate knows of the challenger itself (None: not known, the rule does not apply):
    the metric's value for the model its training started from, on the same validation data;
    whether its weights are all finite; the share of its validation grades that were errors."""

    start_value: float | None = None
    weights_finite: bool | None = None
    grader_error_share: float | None = None


# The rules' names, as `GateDecision.rule` and the version tag `gate.rule` give them.
RULE_NON_FINITE = "non-finite"
RULE_FORCED = "forced"
RULE_NO_VALUE = "no-value"
RULE_GRADER_ERRORS = "grader-errors"
RULE_WORSE_THAN_START = "worse-than-start"
RULE_NO_CHAMPION = "no-champion"
RULE_NOT_COMPARABLE = "champion-not-comparable"
RULE_BETTER = "better"
RULE_NOT_BETTER = "not-better"
RULE_ALREADY_CHAMPION = "already-champion"


@dataclass(frozen=True)
class GateDecision:
    """What the gate decided for a version, by which rule, and on what numbers (the champion's
    value only when it was measured on the challenger's data)."""

    promoted: bool
    reason: str
    challenger_value: float | None
    champion_version: int | None
    champion_value: float | None
    rule: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def verdict(decision: dict[str, Any]) -> str:
    """A decision (`GateDecision.to_dict()`) in a word or three: what the summary line says before
    the reason. A rerun that registers the champion again changes nothing; it is not a refusal."""
    if decision.get("promoted"):
        return "promoted to champion"
    return "unchanged" if decision.get("rule") == RULE_ALREADY_CHAMPION else "refused"


def fmt(value: float | None) -> str:
    """A metric value as reasons and tags show it."""
    return "none" if value is None else f"{value:.6g}"


def same_data(challenger: Measurement, champion: Measurement) -> bool:
    """Whether both were measured on the same, known, validation data."""
    return challenger.data_digest is not None and champion.data_digest == challenger.data_digest


def comparable(challenger: Measurement, champion: Measurement) -> bool:
    """Whether the champion has a value on the challenger's validation data."""
    return champion.value is not None and same_data(challenger, champion)


def decide(
    challenger: Measurement,
    champion: Measurement | None,
    *,
    metric: str,
    greater_is_better: bool = True,
    min_improvement: float = 0.0,
    force: bool = False,
    health: Health | None = None,
    max_grader_error_share: float = 0.5,
) -> GateDecision:
    """Promote `challenger` over `champion` (None: there is none)? With the rule and the reason, in
    words (the rules: the module docstring).

    >>> decide(Measurement(2, 0.6, "d"), Measurement(1, 0.5, "d"), metric="acc").reason
    'better: acc 0.6 vs champion v1 0.5 (gain +0.1, min_improvement 0)'
    >>> decide(Measurement(2, 0.4, "d"), None, metric="acc", health=Health(start_value=0.8)).rule
    'worse-than-start'
    """
    health = health or Health()
    same = champion is not None and comparable(challenger, champion)
    champion_version = None if champion is None else champion.version
    champion_value = champion.value if same else None
    sign = 1 if greater_is_better else -1

    def decision(promoted: bool, rule: str, reason: str) -> GateDecision:
        return GateDecision(promoted, reason, challenger.value, champion_version, champion_value, rule)

    if health.weights_finite is False or (challenger.value is not None and not math.isfinite(challenger.value)):
        what = "non-finite weights" if health.weights_finite is False else f"{metric}={fmt(challenger.value)}"
        return decision(False, RULE_NON_FINITE, f"version {challenger.version} has {what}: never promoted, even forced")
    if force:
        over = "(none)" if champion_version is None else f"v{champion_version}"
        return decision(True, RULE_FORCED, f"forced over champion {over}")
    if challenger.value is None:
        return decision(
            False,
            RULE_NO_VALUE,
            f"version {challenger.version} has no {metric!r} tag ({METRIC_TAG_PREFIX}{metric}); "
            "nothing to compare",
        )
    share = health.grader_error_share
    if share is not None and share > max_grader_error_share:
        return decision(
            False,
            RULE_GRADER_ERRORS,
            f"{share:.0%} of version {challenger.version}'s validation grades were grader errors "
            f"(more than max_grader_error_share {max_grader_error_share:g}): its {metric} measures the grader",
        )
    start = health.start_value
    if start is not None and math.isfinite(start) and (challenger.value - start) * sign < 0:
        return decision(
            False,
            RULE_WORSE_THAN_START,
            f"worse than the model its training started from: {metric} {fmt(challenger.value)} vs "
            f"{fmt(start)} at the start, on the same validation data",
        )
    if champion is None:
        return decision(True, RULE_NO_CHAMPION, f"no champion yet; {metric}={fmt(challenger.value)}")
    if champion_value is None:
        why = (
            f"has no {metric!r} tag"
            if same_data(challenger, champion)
            else f"was validated on data {champion.data_digest or '(unknown)'}, "
            f"the challenger on {challenger.data_digest or '(unknown)'}"
        )
        return decision(
            False,
            RULE_NOT_COMPARABLE,
            f"champion v{champion.version} {why}, and no evaluator was given to score it on the current data",
        )
    gain = (challenger.value - champion_value) * sign
    comparison = (
        f"{metric} {fmt(challenger.value)} vs champion v{champion.version} {fmt(champion_value)} "
        f"(gain {gain:+.6g}, min_improvement {min_improvement:g})"
    )
    if gain > min_improvement:
        return decision(True, RULE_BETTER, f"better: {comparison}")
    return decision(False, RULE_NOT_BETTER, f"not better by more than min_improvement: {comparison}")
