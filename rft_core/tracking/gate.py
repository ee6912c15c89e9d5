"""The promotion gate's decision: a pure function of the challenger's and the champion's values of
one metric and the digests of the validation data each value was measured on.

Promote when there is no champion, with `force`, or when the challenger beats the champion by more
than `min_improvement` on the same data. Refuse when the challenger has no value, or when the
champion has none on the challenger's data (a value on other data proves nothing; `promotion`
scores the champion on the challenger's data first when it can). Nothing here reads or writes
MLflow: `promotion.promote` gathers the numbers and records the decision.
"""

from __future__ import annotations

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
class GateDecision:
    """What the gate decided for a version, and on what numbers (the champion's value only when
    it was measured on the challenger's data)."""

    promoted: bool
    reason: str
    challenger_value: float | None
    champion_version: int | None
    champion_value: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
) -> GateDecision:
    """Promote `challenger` over `champion` (None: there is none)? With the reason, in words.

    >>> decide(Measurement(2, 0.6, "d"), Measurement(1, 0.5, "d"), metric="acc").reason
    'better: acc 0.6 vs champion v1 0.5 (gain +0.1, min_improvement 0)'
    """
    same = champion is not None and comparable(challenger, champion)
    champion_version = None if champion is None else champion.version
    champion_value = champion.value if same else None

    def decision(promoted: bool, reason: str) -> GateDecision:
        return GateDecision(promoted, reason, challenger.value, champion_version, champion_value)

    if force:
        over = "(none)" if champion_version is None else f"v{champion_version}"
        return decision(True, f"forced over champion {over}")
    if challenger.value is None:
        return decision(
            False,
            f"version {challenger.version} has no {metric!r} tag ({METRIC_TAG_PREFIX}{metric}); "
            "nothing to compare",
        )
    if champion is None:
        return decision(True, f"no champion yet; {metric}={fmt(challenger.value)}")
    if champion_value is None:
        why = (
            f"has no {metric!r} tag"
            if same_data(challenger, champion)
            else f"was validated on data {champion.data_digest or '(unknown)'}, "
            f"the challenger on {challenger.data_digest or '(unknown)'}"
        )
        return decision(
            False,
            f"champion v{champion.version} {why}, and no evaluator was given to score it on the current data",
        )
    gain = (challenger.value - champion_value) * (1 if greater_is_better else -1)
    comparison = (
        f"{metric} {fmt(challenger.value)} vs champion v{champion.version} {fmt(champion_value)} "
        f"(gain {gain:+.6g}, min_improvement {min_improvement:g})"
    )
    if gain > min_improvement:
        return decision(True, f"better: {comparison}")
    return decision(False, f"not better by more than min_improvement: {comparison}")
