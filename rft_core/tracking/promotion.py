"""Promotion: `promote` is the one function that makes a registered version champion, or refuses
to. The pipeline's promote stage, the `promote-model` flow and `rft promote` all call it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from mlflow import MlflowClient

from rft_core.tracking.descriptions import gate_section, with_gate
from rft_core.tracking.errors import RegistryError
from rft_core.tracking.gate import (
    RULE_ALREADY_CHAMPION,
    GateDecision,
    Health,
    Measurement,
    comparable,
    decide,
    fmt,
)
from rft_core.tracking.registry import (
    champion_history,
    current_champion,
    gate_history,
    get_version,
    metric_tags,
    now_iso,
    registry_lock,
    set_champion_history,
)
from rft_core.tracking.tags import (
    ALIAS_CHAMPION,
    GATE_CHAMPION_VALUE,
    GATE_CHAMPION_VERSION,
    GATE_DECISION,
    GATE_HISTORY,
    GATE_HISTORY_LIMIT,
    GATE_METRIC,
    GATE_REASON,
    GATE_RULE,
    GATE_TIME,
    START_METRIC_TAG_PREFIX,
    TAG_DATA_DIGEST,
    TAG_WEIGHTS_FINITE,
)
from rft_core.tracking.uri import mlflow_client

if TYPE_CHECKING:
    from rft_core.config import RegistryConfig

# Scores a model (`models:/NAME/V`) on the challenger's validation data: metric key -> value.
Evaluator = Callable[[str], Mapping[str, float]]

_MAX_RACES = 20


def promote(
    rules: RegistryConfig,
    version: int | str,
    *,
    data_digest: str | None = None,
    evaluate: Evaluator | None = None,
    force: bool = False,
    tracking_uri: str | None = None,
    lock_timeout_s: float = 120.0,
) -> GateDecision:
    """Move alias `champion` of `rules.model_name` to `version` if the gate says so; record why.

    1. Read the challenger: its tag `metric.<rules.metric>`, measured on `data_digest` (default:
       its own `data_digest` tag).
    2. Read the champion: its tag value, which counts only when measured on the same data; else
       `evaluate(models:/NAME/V)` scores it on the challenger's data (without an evaluator the
       gate refuses).
    3. Decide with `gate.decide` (`rules.greater_is_better`, `rules.min_improvement`, `force`, and
       the version's own health from its tags: `version_health`).
    4. Under the registry lock, read the champion again: if another promotion moved it meanwhile,
       go back to 2 against the new one. Else move the alias (and remember the old champion for
       `rollback`) and tag the version `gate.decision` (promoted or refused), `gate.reason`,
       `gate.rule`, `gate.metric`, `gate.champion_version`, `gate.champion_value`, `gate.time`,
       and appends the decision to `gate.history` (every decision on the version is kept); the gate
       section of its description says the same in words (`descriptions.with_gate`).

    A version that is already champion is returned as refused, with nothing written.
    """
    client = mlflow_client(tracking_uri)
    name, metric = rules.model_name, rules.metric
    version = int(version)
    tags = get_version(client, name, version).tags
    challenger = Measurement(version, metric_tags(tags).get(metric), data_digest or tags.get(TAG_DATA_DIGEST))
    health = version_health(tags, metric)
    for _ in range(_MAX_RACES):
        champion = current_champion(client, name)
        if champion == version:
            return GateDecision(
                False,
                f"version {version} is already the champion",
                challenger.value,
                champion,
                challenger.value,
                RULE_ALREADY_CHAMPION,
            )
        # Outside the lock: scoring the champion can take minutes.
        measured = _measure_champion(client, name, champion, challenger, metric, evaluate, force=force)
        decision = decide(
            challenger,
            measured,
            metric=metric,
            greater_is_better=rules.greater_is_better,
            min_improvement=rules.min_improvement,
            force=force,
            health=health,
            max_grader_error_share=rules.max_grader_error_share,
        )
        with registry_lock(client, name, timeout_s=lock_timeout_s):
            if current_champion(client, name) != champion:
                continue  # another promotion won the race meanwhile: decide against its result
            if decision.promoted:
                client.set_registered_model_alias(name, ALIAS_CHAMPION, str(version))
                if champion is not None:
                    set_champion_history(client, name, [*champion_history(client, name), champion])
            when = now_iso()
            latest = {
                GATE_DECISION: "promoted" if decision.promoted else "refused",
                GATE_RULE: decision.rule,
                GATE_REASON: decision.reason,
                GATE_METRIC: metric,
                GATE_CHAMPION_VERSION: "none" if champion is None else str(champion),
                GATE_CHAMPION_VALUE: fmt(decision.champion_value),
                GATE_TIME: when,
            }
            # The gate.* tags say the latest decision; gate.history keeps every one (a rerun that
            # gates the version again appends, it does not rewrite the record).
            history = [*gate_history(client.get_model_version(name, str(version)).tags), latest]
            latest[GATE_HISTORY] = json.dumps(history[-GATE_HISTORY_LIMIT:])
            for key, value in latest.items():
                client.set_model_version_tag(name, str(version), key, value)
            description = client.get_model_version(name, str(version)).description
            section = gate_section(decision, metric, when, earlier=history[:-1])
            client.update_model_version(name, str(version), description=with_gate(description, section))
        return decision
    raise RegistryError(
        f"the champion of {name!r} kept changing during {_MAX_RACES} attempts to gate version {version}"
    )


def version_health(tags: Mapping[str, str], metric: str) -> Health:
    """What a version's tags say of its health (`gate.Health`): the metric's value at the start of
    its training, whether its weights are finite, the share of its validation grades that were
    grader errors (`<prefix>/grader_error_share` beside the metric, e.g. eval/grader_error_share)."""
    start = tags.get(START_METRIC_TAG_PREFIX + metric)
    prefix = metric.rsplit("/", 1)[0] + "/" if "/" in metric else ""
    return Health(
        start_value=_number(start),
        weights_finite={"true": True, "false": False}.get(str(tags.get(TAG_WEIGHTS_FINITE, "")).lower()),
        grader_error_share=metric_tags(tags).get(prefix + "grader_error_share"),
    )


def _number(text: str | None) -> float | None:
    try:
        return None if text is None else float(text)
    except ValueError:
        return None


def _measure_champion(
    client: MlflowClient,
    name: str,
    champion: int | None,
    challenger: Measurement,
    metric: str,
    evaluate: Evaluator | None,
    *,
    force: bool,
) -> Measurement | None:
    """The champion's value: its tag, or its score on the challenger's data when the tag is not on
    that data and the decision depends on it."""
    if champion is None:
        return None
    tags = client.get_model_version(name, str(champion)).tags
    measured = Measurement(champion, metric_tags(tags).get(metric), tags.get(TAG_DATA_DIGEST))
    if force or challenger.value is None or evaluate is None or comparable(challenger, measured):
        return measured
    if challenger.data_digest is None:
        raise ValueError(
            f"version {challenger.version} has no data_digest: give the digest of the data "
            "the evaluator scores on"
        )
    scores = evaluate(f"models:/{name}/{champion}")
    return Measurement(champion, _metric_value(scores, metric), challenger.data_digest)


def _metric_value(scores: Mapping[str, float], metric: str) -> float:
    """The gate's metric out of an evaluator's result (full key, or the key without its prefix)."""
    for key in (metric, metric.rsplit("/", 1)[-1]):
        if key in scores:
            return float(scores[key])
    raise RegistryError(f"the evaluator returned no {metric!r} (it returned {sorted(scores)})")
