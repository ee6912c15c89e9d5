"""The MLflow model registry for rft: register versions, move aliases, the promotion lock, the
champion history, rollback and listing. (Whether a version becomes champion is decided in
`gate.py` and done by `promotion.promote`.)

Versions carry tags (`data_digest`, `config_digest`, `git_commit`, `metric.<key>`); each new
version gets alias `challenger`. Alias moves of `champion` happen under `registry_lock`, and past
champions are kept in a registered-model tag for `rollback`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from datetime import datetime, timezone
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from rft_core.tracking.errors import RegistryError
from rft_core.tracking.runs import git_commit
from rft_core.tracking.tags import (
    ALIAS_CHALLENGER,
    ALIAS_CHAMPION,
    DECISION_PROMOTED,
    DECISION_REFUSED,
    DECISION_RESTORED,
    DECISION_ROLLED_BACK,
    GATE_DECISION,
    GATE_HISTORY,
    GATE_HISTORY_LIMIT,
    GATE_REASON,
    GATE_RULE,
    GATE_TIME,
    HISTORY_LIMIT,
    HISTORY_TAG,
    LOCK_EXPIRES,
    LOCK_OWNER,
    LOCK_SUFFIX,
    METRIC_TAG_PREFIX,
    ROLLED_BACK,
    RULE_ROLLBACK,
    TAG_CONFIG_DIGEST,
    TAG_DATA_DIGEST,
    TAG_GIT_COMMIT,
    TAG_GIT_COMMIT_RUN,
    TAG_PARENT,
)
from rft_core.tracking.uri import current_tracking_uri, mlflow_client

logger = logging.getLogger("rft.tracking")


def now_iso() -> str:
    """The time now, as the registry's tags record it."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat(timespec="seconds")


def not_found(exc: MlflowException) -> bool:
    """Whether MLflow answered "no such model/version" (the error code differs by store)."""
    return exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")


def get_registered_model(client: MlflowClient, name: str) -> Any:
    """The registered model `name`, or `RegistryError` naming the store it was looked for in (a
    deployment or a shell pointed at another store is the usual reason)."""
    try:
        return client.get_registered_model(name)
    except MlflowException as exc:
        if not_found(exc):
            raise RegistryError(f"no registered model named {name!r} in {current_tracking_uri()}") from None
        raise


def get_version(client: MlflowClient, name: str, version: int | str) -> Any:
    """Version `version` of registered model `name`, or `RegistryError`."""
    get_registered_model(client, name)
    try:
        return client.get_model_version(name, str(version))
    except MlflowException as exc:
        if not_found(exc):
            raise RegistryError(
                f"registered model {name!r} in {current_tracking_uri()} has no version {version}"
            ) from None
        raise


def check_registered(model_uri: str, *, tracking_uri: str | None = None) -> None:
    """Raise `RegistryError` naming the store when a `models:/NAME@ALIAS` or `models:/NAME/VERSION`
    URI names nothing there (before any work that would be wasted on it); other URIs pass."""
    if not model_uri.startswith("models:/"):
        return
    reference = model_uri[len("models:/"):]
    client = mlflow_client(tracking_uri)
    if "@" in reference:
        name, alias = reference.split("@", 1)
        registered = get_registered_model(client, name)
        if alias not in registered.aliases:
            known = ", ".join(f"@{a} (v{v})" for a, v in sorted(registered.aliases.items())) or "none"
            raise RegistryError(
                f"registered model {name!r} in {current_tracking_uri()} has no alias @{alias} (its aliases: "
                f"{known}); promote a version first (rft promote {name} VERSION)"
            )
    elif "/" in reference:
        name, version = reference.split("/", 1)
        get_version(client, name, version)


def current_champion(client: MlflowClient, name: str) -> int | None:
    """The version alias `champion` of `name` points at, or None."""
    version = get_registered_model(client, name).aliases.get(ALIAS_CHAMPION)
    return None if version is None else int(version)


def champion_version(name: str, *, tracking_uri: str | None = None) -> int | None:
    """The version alias `champion` of `name` points at, or None."""
    return current_champion(mlflow_client(tracking_uri), name)


def metric_tags(tags: Mapping[str, str]) -> dict[str, float]:
    """The `metric.<key>` tags of a version, as numbers."""
    metrics = {}
    for key, value in tags.items():
        if key.startswith(METRIC_TAG_PREFIX):
            with contextlib.suppress(ValueError):
                metrics[key[len(METRIC_TAG_PREFIX) :]] = float(value)
    return metrics


def _inherited_tag(client: MlflowClient, run_id: str, key: str) -> str | None:
    """A tag of the run, else of its parent (stage runs inherit pipeline-level facts)."""
    run = client.get_run(run_id)
    if key in run.data.tags:
        return run.data.tags[key]
    parent = run.data.tags.get(TAG_PARENT)
    return client.get_run(parent).data.tags.get(key) if parent else None


def register_model(
    model_uri: str,
    name: str,
    *,
    tags: Mapping[str, Any] | None = None,
    run_id: str | None = None,
    metrics: Mapping[str, float] | None = None,
    data_digest: str | None = None,
    config_digest: str | None = None,
    description: str | None = None,
    tracking_uri: str | None = None,
) -> int:
    """Register `model_uri` as a new version of `name`, tag it, point alias `challenger` at it.

    Tags: `metric.<key>` for each validation metric (the gate reads these), `data_digest` (of the
    validation data the metrics were measured on), `config_digest` and `git_commit` (given, else
    taken from the run `run_id` or its pipeline run), plus `tags`. `description`: the version's
    markdown description (`descriptions.version_description`), shown on its registry page.
    """
    client = mlflow_client(tracking_uri)
    version_tags: dict[str, str] = {}
    if run_id is not None:
        for key, tag in (
            (TAG_CONFIG_DIGEST, TAG_CONFIG_DIGEST),
            (TAG_DATA_DIGEST, TAG_DATA_DIGEST),
            (TAG_GIT_COMMIT, TAG_GIT_COMMIT_RUN),
        ):
            value = _inherited_tag(client, run_id, tag)
            if value:
                version_tags[key] = value
    if config_digest is not None:
        version_tags[TAG_CONFIG_DIGEST] = config_digest
    if data_digest is not None:
        version_tags[TAG_DATA_DIGEST] = data_digest
    if TAG_GIT_COMMIT not in version_tags and (commit := git_commit()):
        version_tags[TAG_GIT_COMMIT] = commit
    for key, value in (metrics or {}).items():
        version_tags[METRIC_TAG_PREFIX + key] = repr(float(value))
    version_tags.update({k: str(v) for k, v in (tags or {}).items()})
    mv = mlflow.register_model(model_uri, name, tags=version_tags)
    version = int(mv.version)
    if description is not None:
        client.update_model_version(name, str(version), description=description)
    client.set_registered_model_alias(name, ALIAS_CHALLENGER, str(version))
    return version


def set_alias(name: str, alias: str, version: int | str, *, tracking_uri: str | None = None) -> None:
    """Point `alias` of registered model `name` at `version` (checked to exist)."""
    client = mlflow_client(tracking_uri)
    get_version(client, name, version)
    client.set_registered_model_alias(name, alias, str(version))


def lock_expiry(held: Any, lease_s: float) -> tuple[float, str | None]:
    """(when the lock model `held` expires, None) from its expiry tag; when the tag is missing or not
    a finite time (edited by hand, written by another tool), (its creation time + `lease_s`, why).

    Such a lock is broken once a lease has passed since it was made: refusing it forever would
    block every promotion until someone deletes it by hand, and breaking it at once could break
    a live holder's lock; rft itself always writes a finite expiry.
    """
    raw = held.tags.get(LOCK_EXPIRES)
    try:
        expires = float(raw)
    except (TypeError, ValueError):
        expires = math.nan
    if math.isfinite(expires):
        return expires, None
    created = (held.creation_timestamp or 0) / 1000
    why = "it has no expiry tag" if raw is None else f"its expiry tag {LOCK_EXPIRES}={raw!r} is not a time"
    return created + lease_s, f"{why}; treated as stale {lease_s:g}s after the lock was created"


@contextlib.contextmanager
def registry_lock(
    client: MlflowClient, name: str, *, lease_s: float = 60.0, timeout_s: float = 120.0
) -> Iterator[str]:
    """Hold the promotion lock of registered model `name` (yield the owner id).

    The lock is the registered model `<name>.rft-lock`: creating a registered model is the one
    atomic test-and-set MLflow's API offers (the store's unique key on the name; a second create
    fails with RESOURCE_ALREADY_EXISTS), on a sqlite file and through a tracking server alike.
    Tags and a tag-then-read-back lease are not: two writers can both read back their own tag.
    The lock model carries its owner and an expiry; a lock past its expiry (its holder died) is
    deleted by the next waiter, and so is one whose expiry cannot be read, one lease after it was
    created, with a warning naming it (`lock_expiry`). Waiters retry with jittered exponential backoff up to `timeout_s`.
    Hold it only for the re-read of the champion and the alias/tag writes.
    """
    lock_name = name + LOCK_SUFFIX
    owner = f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}:{uuid.uuid4().hex[:8]}"
    deadline = time.monotonic() + timeout_s
    delay = 0.02
    while True:
        try:
            client.create_registered_model(
                lock_name,
                tags={LOCK_OWNER: owner, LOCK_EXPIRES: f"{time.time() + lease_s:.3f}"},
                description=f"Transient promotion lock of {name!r} (rft); safe to delete if stale.",
            )
            break
        except MlflowException as exc:
            # The sqlite/SQL store answers a lost race with "not found" when the holder released
            # the lock between our failed insert and the store's look-up of the existing row.
            if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS") and not not_found(exc):
                raise
        holder = None
        try:
            held = client.get_registered_model(lock_name)
            holder = held.tags.get(LOCK_OWNER)
            expires, broken = lock_expiry(held, lease_s)
            if expires < time.time():
                if broken:
                    logger.warning("breaking the promotion lock %r (held by %s): %s", lock_name, holder, broken)
                client.delete_registered_model(lock_name)
                continue
        except MlflowException as exc:
            if not not_found(exc):  # released between our create and our read: try again now
                raise
            continue
        if time.monotonic() > deadline:
            raise RegistryError(
                f"timed out after {timeout_s:.0f}s waiting for the lock {lock_name!r} held by {holder}"
            )
        time.sleep(delay * (0.5 + random.random()))
        delay = min(delay * 2, 1.0)
    try:
        yield owner
    finally:
        with contextlib.suppress(MlflowException):
            if client.get_registered_model(lock_name).tags.get(LOCK_OWNER) == owner:
                client.delete_registered_model(lock_name)


def champion_history(client: MlflowClient, name: str) -> list[int]:
    """Past champions of `name`, oldest first (call under `registry_lock` before changing it)."""
    raw = get_registered_model(client, name).tags.get(HISTORY_TAG)
    return [int(v) for v in json.loads(raw)] if raw else []


def set_champion_history(client: MlflowClient, name: str, history: list[int]) -> None:
    """Record past champions (the newest `HISTORY_LIMIT`)."""
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history[-HISTORY_LIMIT:]))


def rollback(name: str, *, tracking_uri: str | None = None, lock_timeout_s: float = 120.0) -> int:
    """Move `champion` back to the previous champion; return that version.

    Past champions whose versions were deleted are skipped. Both versions record it as a decision
    (`record_decision`: the gate.* tags, `gate.history`, the gate section of the description): the
    demoted one `rolled back`, the one made champion again `restored`; the demoted version is also
    tagged `rollback.demoted_at`.
    """
    client = mlflow_client(tracking_uri)
    with registry_lock(client, name, timeout_s=lock_timeout_s):
        current = current_champion(client, name)
        if current is None:
            raise RegistryError(f"registered model {name!r} has no champion to roll back from")
        history = champion_history(client, name)
        while history:
            previous = history.pop()
            try:
                client.get_model_version(name, str(previous))
            except MlflowException as exc:
                if not_found(exc):
                    continue
                raise
            if previous == current:
                continue
            client.set_registered_model_alias(name, ALIAS_CHAMPION, str(previous))
            set_champion_history(client, name, history)
            when = now_iso()
            client.set_model_version_tag(name, str(current), ROLLED_BACK, when)
            record_decision(client, name, current, DECISION_ROLLED_BACK, RULE_ROLLBACK,
                            f"rolled back: champion moved back to v{previous}", when)
            record_decision(client, name, previous, DECISION_RESTORED, RULE_ROLLBACK,
                            f"champion again: rolled back from v{current}", when)
            return previous
        raise RegistryError(
            f"registered model {name!r}: champion v{current} has no previous champion to roll back to"
        )


def gate_history(tags: Mapping[str, str]) -> list[dict[str, str]]:
    """The decisions recorded on a version, oldest first (a version gated before the history was
    kept contributes its one latest decision)."""
    with contextlib.suppress(ValueError, TypeError):
        history = json.loads(tags.get(GATE_HISTORY, ""))
        if isinstance(history, list):
            return [entry for entry in history if isinstance(entry, dict)]
    if GATE_DECISION in tags:
        return [{key: tags[key] for key in (GATE_DECISION, GATE_RULE, GATE_REASON, GATE_TIME) if key in tags}]
    return []


def record_decision(client: MlflowClient, name: str, version: int, decision: str, rule: str, reason: str,
                    when: str) -> None:
    """A decision on a version that is not the gate's (a rollback), recorded as the gate records its
    own: the latest in the gate.* tags, appended to `gate.history`, and the gate section of the
    version's description, so that the version reads what it is now (a demoted version does not
    read "promoted"). Call under `registry_lock`."""
    from rft_core.tracking.descriptions import event_section, with_gate

    tags = client.get_model_version(name, str(version)).tags
    latest = {GATE_DECISION: decision, GATE_RULE: rule, GATE_REASON: reason, GATE_TIME: when}
    history = [*gate_history(tags), latest]
    for key, value in {**latest, GATE_HISTORY: json.dumps(history[-GATE_HISTORY_LIMIT:])}.items():
        client.set_model_version_tag(name, str(version), key, value)
    description = client.get_model_version(name, str(version)).description
    section = event_section(decision, rule, reason, when, earlier=history[:-1])
    client.update_model_version(name, str(version), description=with_gate(description, section))


CHAMPION, ROLLED_BACK_STATUS, REPLACED, REFUSED, NOT_GATED = "champion", "rolled back", "replaced", "refused", "not gated"


def version_statuses(rows: list[dict[str, Any]], champions: list[int]) -> dict[int, dict[str, Any]]:
    """What each version is now, from its aliases and decisions (`rows` as `list_versions` builds
    them, with `aliases` and `gate_history`) and the succession of champions (`champions`: past
    ones oldest first, then the current one): {version: {"status", "since", "detail"}}.

    - champion: holds the alias; since its latest promotion (or restoration by a rollback);
    - rolled back: a rollback demoted it, and nothing promoted it since;
    - replaced: it was champion, and a later promotion moved the alias on (detail: to which);
    - refused: the gate's latest word on it was no (detail: the rule);
    - not gated: no decision yet.
    """
    by_version = {row["version"]: row for row in rows}

    def made_champion(version: int) -> str | None:
        times = [e.get(GATE_TIME) for e in by_version.get(version, {}).get("gate_history", [])
                 if e.get(GATE_DECISION) in (DECISION_PROMOTED, DECISION_RESTORED)]
        return times[-1] if times else None

    def successor(version: int) -> int | None:
        """The champion after `version`'s last turn as champion."""
        if version not in champions:
            return None
        last = len(champions) - 1 - champions[::-1].index(version)
        return champions[last + 1] if last + 1 < len(champions) else None

    statuses = {}
    for row in rows:
        version, history = row["version"], row["gate_history"]
        latest = history[-1] if history else {}
        decision = latest.get(GATE_DECISION)
        if ALIAS_CHAMPION in row["aliases"]:
            status = {"status": CHAMPION, "since": made_champion(version), "detail": None}
        elif decision == DECISION_ROLLED_BACK:
            status = {"status": ROLLED_BACK_STATUS, "since": latest.get(GATE_TIME), "detail": latest.get(GATE_REASON)}
        elif made_champion(version) is not None:
            after = successor(version)
            status = {"status": REPLACED, "since": made_champion(after) if after else None,
                      "detail": f"by v{after}" if after else None}
        elif decision is not None:
            status = {"status": REFUSED if decision == DECISION_REFUSED else decision, "since": latest.get(GATE_TIME),
                      "detail": latest.get(GATE_RULE)}
        else:
            status = {"status": NOT_GATED, "since": None, "detail": None}
        statuses[version] = status
    return statuses


def list_versions(name: str, *, tracking_uri: str | None = None) -> list[dict[str, Any]]:
    """Every version of `name`, oldest first: version, aliases, what it is now (`status`, `since`,
    `status_detail`: `version_statuses`), metrics, digests, gate decision and its history,
    creation time, run id and experiment, source."""
    client = mlflow_client(tracking_uri)
    registered = get_registered_model(client, name)
    aliases: dict[int, list[str]] = {}
    for alias, version in registered.aliases.items():
        aliases.setdefault(int(version), []).append(alias)
    escaped = name.replace("'", "\\'")
    versions = []
    page_token = None
    while True:
        page = client.search_model_versions(f"name = '{escaped}'", max_results=1000, page_token=page_token)
        versions.extend(page)
        page_token = page.token
        if not page_token:
            break
    rows = []
    for mv in sorted(versions, key=lambda v: int(v.version)):
        tags = mv.tags or {}
        rows.append(
            {
                "version": int(mv.version),
                "aliases": sorted(aliases.get(int(mv.version), [])),
                "metrics": metric_tags(tags),
                "data_digest": tags.get(TAG_DATA_DIGEST),
                "config_digest": tags.get(TAG_CONFIG_DIGEST),
                "git_commit": tags.get(TAG_GIT_COMMIT),
                "gate_decision": tags.get(GATE_DECISION),
                "gate_reason": tags.get(GATE_REASON),
                "gate_history": gate_history(tags),
                "created": _iso(mv.creation_timestamp),
                "run_id": mv.run_id,
                "experiment_id": _experiment_of(client, mv.run_id),
                "source": mv.source,
            }
        )
    champion = registered.aliases.get(ALIAS_CHAMPION)
    chain = champion_history(client, name) + ([int(champion)] if champion is not None else [])
    statuses = version_statuses(rows, chain)
    for row in rows:
        status = statuses[row["version"]]
        row.update(status=status["status"], since=status["since"], status_detail=status["detail"])
    return rows


def _experiment_of(client: MlflowClient, run_id: str | None) -> str | None:
    """The experiment of a version's run (its page in the UI is under it), or None."""
    if not run_id:
        return None
    try:
        return client.get_run(run_id).info.experiment_id
    except MlflowException:
        return None
