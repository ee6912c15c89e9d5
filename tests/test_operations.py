"""Operations against real servers, the way a team runs rft.

One module-scoped pair of servers: `prefect server start` and `mlflow server` on 127.0.0.1 (free
ports, temporary sqlite databases, artifact root and PREFECT_HOME, telemetry off), stopped by
process group at the end (mlflow server's job runner and huey consumers included). The work pool
is created and `deployments/prefect.yaml` deployed with the CLI, exactly as the README's section
"Operating it" says; a process worker runs the flow runs. Pipelines use
`deployments/configs/tiny.yaml` with its output_dir moved to a temporary directory, so the stages
cached by one test are reused by the next.

Flow runs are triggered with `prefect deployment run` and inspected through the Prefect API
(states, task runs) and the MLflow server (registered versions, aliases, runs).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1500)]

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PREFECT_FILE = "deployments/prefect.yaml"
TINY = "deployments/configs/tiny.yaml"
MODEL = "rft-tiny"  # registry.model_name of the tiny config
PIPELINE = "rft-pipeline/rft-pipeline"
POOL = "rft-process"


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(url: str, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


@dataclass
class Service:
    """A server or worker started in its own session, stopped with its whole process group and
    the groups of its descendants (a worker starts each flow run in a session of its own)."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def tail(self, lines: int = 60) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def groups(self) -> set[int]:
        groups = {self.popen.pid}
        for pid in _descendants(self.popen.pid):
            try:
                groups.add(os.getpgid(pid))
            except ProcessLookupError:
                continue
        return groups

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM, then SIGKILL to whatever is left: `mlflow server` leaves its main process and
        its huey workers running after SIGTERM, a worker waits for its flow runs."""
        groups = self.groups()
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
            for group in groups:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(group, sig)
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline and self.alive(groups):
                time.sleep(0.2)
            if not self.alive(groups):
                return

    def alive(self, groups: set[int] | None = None) -> bool:
        self.popen.poll()  # reap the leader: a zombie does not count
        return any(_state(pid) not in ("Z", None) for pid in _processes_in(groups or self.groups()))


def _stat(pid: int | str) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()  # state, ppid, pgrp, ...


def _state(pid: int) -> str | None:
    stat = _stat(pid)
    return stat[0] if stat else None


def _all_stats() -> dict[int, list[str]]:
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(entry.name)) is not None:
            stats[int(entry.name)] = stat
    return stats


def _descendants(pid: int) -> list[int]:
    stats = _all_stats()
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        children = [p for p, stat in stats.items() if int(stat[1]) == parent]
        found += children
        frontier += children
    return found


def _processes_in(groups: set[int]) -> list[int]:
    return [pid for pid, stat in _all_stats().items() if int(stat[2]) in groups]


def start_service(name: str, args: list[str], env: dict[str, str], logs: Path, cwd: Path) -> Service:
    log = logs / f"{name}.log"
    with open(log, "ab") as out:
        popen = subprocess.Popen(
            args, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    return Service(name, popen, log)


def wait_healthy(service: Service, url: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not healthy(url):
        if service.popen.poll() is not None:
            raise RuntimeError(f"{service.name} exited with {service.popen.returncode}:\n{service.tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{service.name} not healthy at {url} after {timeout_s:.0f}s:\n{service.tail()}"
            )
        time.sleep(0.5)


# --------------------------------------------------------------------------- the operations harness


@dataclass
class Ops:
    tmp: Path
    prefect_port: int
    mlflow_port: int
    env: dict[str, str]
    services: dict[str, Service] = field(default_factory=dict)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.prefect_port}/api"

    @property
    def mlflow_uri(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    @property
    def output_dir(self) -> Path:
        return self.tmp / "out"

    @property
    def logs(self) -> Path:
        path = self.tmp / "logs"
        path.mkdir(exist_ok=True)
        return path

    # ---- servers and workers

    def start_prefect(self) -> None:
        env = self.env | {
            "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{self.tmp / 'prefect.db'}",
            # The scheduler looks for deployments to schedule every 5 s instead of 60 s.
            "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5",
            "PREFECT_UI_ENABLED": "false",
            # A run that waits for the deployment's concurrency slot is retried after 3 s, not 30 s.
            "PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS": "3",
        }
        args = [
            str(BIN / "prefect"),
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.prefect_port),
        ]
        self.services["prefect"] = start_service("prefect-server", args, env, self.logs, self.tmp)
        wait_healthy(self.services["prefect"], self.api_url + "/health")

    def start_mlflow(self) -> None:
        args = [
            str(BIN / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.mlflow_port),
            "--backend-store-uri",
            f"sqlite:///{self.tmp / 'mlflow.db'}",
            "--artifacts-destination",
            str(self.tmp / "mlartifacts"),
            "--workers",
            "1",
        ]
        self.services["mlflow"] = start_service("mlflow-server", args, self.env, self.logs, self.tmp)
        wait_healthy(self.services["mlflow"], self.mlflow_uri + "/health")

    def start_worker(self, **extra_env: str) -> None:
        name = f"worker-{uuid.uuid4().hex[:6]}"
        args = [str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--name", name]
        worker = start_service("worker", args, self.env | extra_env, self.logs, self.tmp)
        self.services["worker"] = worker
        deadline = time.monotonic() + 90
        while f"Worker '{name}' started" not in worker.tail(400):
            if worker.popen.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the worker did not start:\n{worker.tail()}")
            time.sleep(0.5)

    def stop(self, name: str) -> None:
        service = self.services.pop(name, None)
        if service is not None:
            # mlflow server ignores SIGTERM (its job runner and huey consumers too): no long grace.
            service.stop(grace_s=3.0 if name == "mlflow" else 15.0)

    def stop_all(self) -> list[str]:
        """Stop every service; the names of those with a process still running afterwards."""
        stopped = dict(self.services)
        groups = {name: s.groups() for name, s in stopped.items()}
        for name in list(self.services):
            self.stop(name)
        return [name for name, s in stopped.items() if s.alive(groups[name])]

    # ---- CLI and API

    def cli(
        self, *args: str, check: bool = True, timeout: float = 180, **extra_env: str
    ) -> subprocess.CompletedProcess[str]:
        """A command as a user types it, from the project root."""
        exe = args[0] if "/" in args[0] else str(BIN / args[0])
        result = subprocess.run(
            [exe, *args[1:]],
            cwd=ROOT,
            env=self.env | extra_env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
            )
        return result

    def client(self):
        from prefect.client.orchestration import SyncPrefectClient

        return SyncPrefectClient(self.api_url)

    def mlflow(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.mlflow_uri, registry_uri=self.mlflow_uri)

    def overrides(self, *more: str) -> list[str]:
        return [f"output_dir={self.output_dir}", *more]

    def run_deployment(self, name: str, **params: Any) -> uuid.UUID:
        """`prefect deployment run NAME --params JSON`; returns the flow run id."""
        out = self.cli("prefect", "deployment", "run", name, "--params", json.dumps(params)).stdout
        match = re.search(r"UUID: ([0-9a-f-]{36})", out)
        assert match, out
        return uuid.UUID(match.group(1))

    def run_pipeline(self, *overrides: str) -> uuid.UUID:
        return self.run_deployment(PIPELINE, config_path=TINY, overrides=self.overrides(*overrides))

    def flow_run(self, flow_run_id: uuid.UUID):
        with self.client() as client:
            return client.read_flow_run(flow_run_id)

    def wait(self, flow_run_id: uuid.UUID, timeout_s: float = 300.0):
        """Wait for a final state (Completed, Failed, Crashed, Cancelled)."""
        deadline = time.monotonic() + timeout_s
        while True:
            run = self.flow_run(flow_run_id)
            if run.state is not None and run.state.is_final():
                return run
            if time.monotonic() > deadline:
                worker = self.services.get("worker")
                raise AssertionError(
                    f"flow run {flow_run_id} still {run.state_name} after {timeout_s:.0f}s\n"
                    + (worker.tail(80) if worker else "")
                )
            time.sleep(1)

    def wait_completed(self, flow_run_id: uuid.UUID, timeout_s: float = 300.0):
        run = self.wait(flow_run_id, timeout_s)
        if not run.state.is_completed():
            worker = self.services.get("worker")
            raise AssertionError(
                f"flow run {flow_run_id}: {run.state_name}: {run.state.message}\n"
                + (worker.tail(80) if worker else "")
            )
        return run

    def task_runs(self, flow_run_id: uuid.UUID) -> list[Any]:
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
        from prefect.client.schemas.sorting import TaskRunSort

        with self.client() as client:
            return client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                sort=TaskRunSort.EXPECTED_START_TIME_ASC,
                limit=200,
            )

    def states(self, flow_run_id: uuid.UUID) -> list[Any]:
        with self.client() as client:
            return client.read_flow_run_states(flow_run_id)

    def aliases(self) -> dict[str, int]:
        model = self.mlflow().get_registered_model(MODEL)
        return {alias: int(version) for alias, version in model.aliases.items()}

    def versions(self) -> list[int]:
        return sorted(int(v.version) for v in self.mlflow().search_model_versions(f"name = '{MODEL}'"))


def stage_states(task_runs: list[Any], attempt: int) -> dict[str, str]:
    """Stage name -> state name ("Cached", "Completed", "Failed") of one attempt of a flow run."""
    return {
        t.name.rsplit("-", 1)[0]: t.state.name
        for t in task_runs
        if t.flow_run_run_count == attempt and t.state
    }


@pytest.fixture(scope="module")
def ops(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("ops")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    ops = Ops(tmp, free_port(), free_port(), env)
    env.update(
        {
            "PREFECT_HOME": str(tmp / "prefect-home"),
            "PREFECT_API_URL": ops.api_url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "DO_NOT_TRACK": "1",
            "MLFLOW_TRACKING_URI": ops.mlflow_uri,
            "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
            # Workers and `rft serve` look for runs to start every 2 s, not 10 s.
            "PREFECT_WORKER_QUERY_SECONDS": "2",
            "PREFECT_RUNNER_POLL_FREQUENCY": "2",
        }
    )
    try:
        ops.start_mlflow()
        ops.start_prefect()
        yield ops
    finally:
        leftovers = ops.stop_all()
        assert not leftovers, f"still running after teardown: {leftovers}"


@pytest.fixture(scope="module")
def deployed(ops: Ops) -> dict[str, Any]:
    """The work pool, the deployments of deployments/prefect.yaml, the runs the scheduler created
    from their cron schedules, then the schedules paused (no nightly run may start during the
    tests), then a worker."""
    ops.cli("prefect", "work-pool", "create", POOL, "--type", "process")
    out = ops.cli("prefect", "deploy", "--prefect-file", PREFECT_FILE, "--all", timeout=300).stdout
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterName,
        FlowRunFilter,
        FlowRunFilterState,
    )

    with ops.client() as client:
        deployments = {d.name: d for d in client.read_deployments(limit=50)}
        scheduled: list[Any] = []
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            scheduled = client.read_flow_runs(
                deployment_filter=DeploymentFilter(
                    name=DeploymentFilterName(any_=["rft-pipeline", "evaluate-champion"])
                ),
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type={"any_": ["SCHEDULED"]})),
                limit=100,
            )
            if {r.deployment_id for r in scheduled} >= {
                deployments["rft-pipeline"].id,
                deployments["evaluate-champion"].id,
            }:
                break
            time.sleep(1)
    ops.cli("prefect", "deployment", "schedule", "pause", "--all")
    ops.start_worker()
    return {"deploy_output": out, "deployments": deployments, "scheduled": scheduled}


@pytest.fixture(scope="module")
def first_pipeline(ops: Ops, deployed: dict[str, Any]) -> uuid.UUID:
    """One run of the tiny pipeline through the rft-pipeline deployment."""
    return ops.wait_completed(ops.run_pipeline(), timeout_s=420).id


# --------------------------------------------------------------------------- the tests


def test_deploy_creates_every_deployment_on_the_process_pool(ops: Ops, deployed: dict[str, Any]) -> None:
    spec = yaml.safe_load((ROOT / PREFECT_FILE).read_text())
    deployments = deployed["deployments"]
    assert set(deployments) == {d["name"] for d in spec["deployments"]}
    assert {d.work_pool_name for d in deployments.values()} == {POOL}
    pipeline = deployments["rft-pipeline"]
    assert pipeline.parameters["config_path"] == "deployments/configs/nightly.yaml"
    assert pipeline.global_concurrency_limit.limit == 1
    assert pipeline.concurrency_options.collision_strategy == "ENQUEUE"
    # The flow runs start in the directory `prefect deploy` ran in: the project root.
    assert pipeline.pull_steps == [
        {"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}
    ]
    assert {s.schedule.cron for s in pipeline.schedules} == {"0 2 * * *"}
    assert {s.schedule.cron for s in deployments["evaluate-champion"].schedules} == {"0 6 * * *"}
    assert not deployments["promote-model"].schedules


def test_cron_schedules_create_scheduled_runs(ops: Ops, deployed: dict[str, Any]) -> None:
    """The server's scheduler (pinned sqlalchemy/fastapi) turns each cron into scheduled runs."""
    by_deployment: dict[Any, list[datetime]] = {}
    for run in deployed["scheduled"]:
        assert run.auto_scheduled
        by_deployment.setdefault(run.deployment_id, []).append(run.expected_start_time)
    hours = {"rft-pipeline": 2, "evaluate-champion": 6}
    now = datetime.now(timezone.utc)
    for name, hour in hours.items():
        times = sorted(by_deployment[deployed["deployments"][name].id])
        assert len(times) >= 3, (name, times)
        assert all(t.astimezone(timezone.utc).hour == hour and t.minute == 0 for t in times), times
        assert now < times[0] <= now + timedelta(days=1)
        assert all(b - a == timedelta(days=1) for a, b in zip(times, times[1:], strict=False))

    # Change a schedule from the CLI (README, "Operating it", "Change a schedule"): pausing removed
    # the scheduled runs; a new cron, replacing the old one, is scheduled again at once.
    hour = (now.hour + 12) % 24  # far from now: no run becomes due during the tests
    ops.cli(
        "prefect",
        "deployment",
        "schedule",
        "create",
        "evaluate-model/evaluate-champion",
        "--cron",
        f"15 {hour} * * *",
        "--timezone",
        "UTC",
        "--replace",
        "-y",
    )
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
    )

    deployment_id = deployed["deployments"]["evaluate-champion"].id
    deadline = time.monotonic() + 60
    while True:
        with ops.client() as client:
            runs = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type={"any_": ["SCHEDULED"]})),
                limit=100,
            )
        if runs:
            break
        assert time.monotonic() < deadline, "no run scheduled from the new cron"
        time.sleep(1)
    assert {(r.expected_start_time.hour, r.expected_start_time.minute) for r in runs} == {(hour, 15)}
    ops.cli("prefect", "deployment", "schedule", "pause", "--all")


def test_pipeline_deployment_trains_and_registers_champion(ops: Ops, first_pipeline: uuid.UUID) -> None:
    states = stage_states(ops.task_runs(first_pipeline), attempt=1)
    assert list(states) == [
        "validate",
        "split",
        "sft",
        "rl",
        "evaluate",
        "training-curve",
        "register",
        "promote",
    ]
    versions = ops.versions()
    assert versions, "no version registered"
    first = versions[0]
    aliases = ops.aliases()
    assert aliases["champion"] == first  # the first version has no champion to beat
    version = ops.mlflow().get_model_version(MODEL, str(first))
    assert version.tags["gate.decision"] == "promoted"
    assert "metric.eval/accuracy" in version.tags
    # The MLflow parent run is tagged with its flow run, and has the stage runs as children.
    runs = ops.mlflow().search_runs(
        [ops.mlflow().get_experiment_by_name("rft-tiny").experiment_id],
        filter_string=f"tags.`prefect.flow_run_id` = '{first_pipeline}'",
    )
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert "eval/accuracy" in runs[0].data.metrics
    # The deployed run draws its training curve onto the parent run too.
    artifacts = [a.path for a in ops.mlflow().list_artifacts(runs[0].info.run_id)]
    assert "training_curve.png" in artifacts, artifacts


def test_retry_of_failed_run_reruns_only_the_failed_stage_and_after(
    ops: Ops, first_pipeline: uuid.UUID
) -> None:
    # rl fails on this worker (a broken node, say): the run fails at rl.
    ops.stop("worker")
    ops.start_worker(RFT_FAIL_STAGE="rl")
    flow_run_id = ops.run_pipeline("rl.seed=1")  # new rl key; validate, split, sft as before
    run = ops.wait(flow_run_id)
    assert run.state.is_failed(), run.state
    assert "RFT_FAIL_STAGE=rl" in run.state.message
    first = stage_states(ops.task_runs(flow_run_id), attempt=1)
    assert list(first) == ["validate", "split", "sft", "rl"] and first["rl"] == "Failed", first
    sft_dirs = sorted((ops.output_dir / "stages").glob("sft-*"))
    sft_mtimes = {p: p.stat().st_mtime_ns for d in sft_dirs for p in d.rglob("*")}

    # The node is fixed; the same flow run is retried in place.
    ops.stop("worker")
    ops.start_worker()
    out = ops.cli("prefect", "flow-run", "retry", str(flow_run_id)).stdout
    assert "scheduled for retry" in out
    run = ops.wait_completed(flow_run_id)
    assert run.run_count == 2
    second = stage_states(ops.task_runs(flow_run_id), attempt=2)
    assert second == {
        "validate": "Cached",
        "split": "Cached",
        "sft": "Cached",
        "rl": "Completed",
        "evaluate": "Completed",
        "training-curve": "Completed",
        "register": "Completed",
        "promote": "Completed",
    }
    assert {p: p.stat().st_mtime_ns for d in sft_dirs for p in d.rglob("*")} == sft_mtimes
    # Both attempts reported to one MLflow parent run, finished by the retry.
    client = ops.mlflow()
    experiment = client.get_experiment_by_name("rft-tiny").experiment_id
    (parent,) = client.search_runs(
        [experiment], filter_string=f"tags.`prefect.flow_run_id` = '{flow_run_id}'"
    )
    assert parent.info.status == "FINISHED"
    (rl_run,) = client.search_runs(
        [experiment],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and tags.`rft.stage` = 'rl'",
    )
    assert rl_run.info.status == "FINISHED"


def test_overlapping_runs_of_the_pipeline_wait_for_each_other(ops: Ops, first_pipeline: uuid.UUID) -> None:
    """Two runs of one config write the same stage directories: the deployment's concurrency limit
    (1, ENQUEUE) makes the second wait for the first.

    Both runs are queued before a worker can pick either up (as when a schedule fires while a manual
    run is queued): created one after the other with a worker polling, the second could arrive after
    the first (all its stages cached) had already ended on a loaded machine, and never need to wait."""
    ops.stop("worker")
    first, second = ops.run_pipeline(), ops.run_pipeline()
    ops.start_worker()
    runs = [ops.wait_completed(first), ops.wait_completed(second)]
    waited = [r for r in runs if any(s.name == "AwaitingConcurrencySlot" for s in ops.states(r.id))]
    assert waited, "neither run waited for a concurrency slot"
    (a, b) = sorted(runs, key=lambda r: r.start_time)
    assert b.start_time >= a.end_time, "the runs overlapped"
    # The registry is consistent: one champion, a gate decision on every version.
    for version in ops.versions():
        assert ops.mlflow().get_model_version(MODEL, str(version)).tags["gate.decision"] in (
            "promoted",
            "refused",
        )
    assert ops.aliases()["champion"] in ops.versions()


def test_promote_and_roll_back_through_deployments_and_cli(ops: Ops, first_pipeline: uuid.UUID) -> None:
    if len(ops.versions()) < 2:  # when run alone: a second model, another registered version
        ops.wait_completed(ops.run_pipeline("rl.seed=3"))
    champion = ops.aliases()["champion"]
    other = max(v for v in ops.versions() if v != champion)
    params = {"config_path": TINY, "overrides": ops.overrides()}

    # Through the gate: the same accuracy on the same data is not better, so no promotion.
    run = ops.wait_completed(ops.run_deployment("promote-model/promote-model", version=other, **params))
    assert ops.aliases()["champion"] == champion
    assert ops.mlflow().get_model_version(MODEL, str(other)).tags["gate.decision"] == "refused"
    # Forced through the deployment.
    run = ops.wait_completed(
        ops.run_deployment("promote-model/promote-model", version=other, force=True, **params)
    )
    assert ops.aliases()["champion"] == other, run.state
    # Rolled back with the CLI.
    out = ops.cli("rft", "rollback", MODEL, "--tracking-uri", ops.mlflow_uri).stdout
    assert f"champion v{other} -> v{champion}" in out
    assert ops.aliases()["champion"] == champion
    # Promoted with the CLI, rolled back through the deployment.
    ops.cli("rft", "promote", MODEL, str(other), "--force", "--tracking-uri", ops.mlflow_uri)
    assert ops.aliases()["champion"] == other
    ops.wait_completed(ops.run_deployment("rollback-model/rollback-model", **params))
    assert ops.aliases()["champion"] == champion
    listing = json.loads(ops.cli("rft", "models", MODEL, "--json", "--tracking-uri", ops.mlflow_uri).stdout)
    assert [row["version"] for row in listing if "champion" in row["aliases"]] == [champion]


def test_champion_regression_fails_the_evaluation_run_loudly(ops: Ops, first_pipeline: uuid.UUID) -> None:
    params = {"config_path": TINY, "overrides": ops.overrides(), "threshold": 1.01}
    run = ops.wait(ops.run_deployment("evaluate-model/evaluate-champion", **params))
    assert run.state.is_failed()
    assert f"models:/{MODEL}@champion: eval/accuracy = " in run.state.message
    assert "is below the threshold 1.01" in run.state.message
    client = ops.mlflow()
    (logged,) = client.search_runs(
        [client.get_experiment_by_name("rft-tiny").experiment_id],
        filter_string="tags.`rft.kind` = 'regression-evaluation'",
    )
    assert logged.data.tags["regression.verdict"] == "below threshold"
    assert "eval/accuracy" in logged.data.metrics


def test_dead_mlflow_fails_the_run_clearly_and_retry_resumes_from_cache(
    ops: Ops, first_pipeline: uuid.UUID
) -> None:
    ops.stop("mlflow")
    assert not healthy(ops.mlflow_uri + "/health")
    flow_run_id = ops.run_pipeline("rl.seed=2")
    run = ops.wait(flow_run_id, timeout_s=120)
    assert run.state.is_failed()
    assert f"MLflow tracking store {ops.mlflow_uri} is unreachable" in run.state.message

    ops.start_mlflow()  # same port, same database and artifacts
    ops.cli("prefect", "flow-run", "retry", str(flow_run_id))
    ops.wait_completed(flow_run_id)
    states = stage_states(ops.task_runs(flow_run_id), attempt=2)
    assert states["validate"] == states["split"] == states["sft"] == "Cached"
    assert states["rl"] == "Completed"


def test_rft_serve_serves_the_same_deployments_on_the_same_schedules(
    ops: Ops, first_pipeline: uuid.UUID
) -> None:
    """Last: `rft serve` takes the deployments' names over from the work pool."""
    ops.stop("worker")  # from here on only rft serve runs flows
    spec = {d["name"]: d for d in yaml.safe_load((ROOT / PREFECT_FILE).read_text())["deployments"]}
    refused = ops.cli(sys.executable, "-m", "rft", "serve", check=False)
    assert refused.returncode == 2
    assert (
        "already deployed to a work pool: rft-pipeline/rft-pipeline (work pool rft-process)" in refused.stderr
    )
    for name in (
        "rft-pipeline/rft-pipeline",
        "evaluate-model/evaluate-champion",
        "promote-model/promote-model",
        "rollback-model/rollback-model",
    ):
        ops.cli("prefect", "deployment", "delete", name)

    started = datetime.now(timezone.utc)
    serve = start_service("rft-serve", [sys.executable, "-m", "rft", "serve"], ops.env, ops.logs, ROOT)
    ops.services["serve"] = serve
    try:
        deadline = time.monotonic() + 180
        while True:
            with ops.client() as client:
                served = {d.name: d for d in client.read_deployments(limit=50) if d.updated > started}
            if set(served) == set(spec):
                break
            assert serve.popen.poll() is None and time.monotonic() < deadline, serve.tail()
            time.sleep(1)
        ops.cli("prefect", "deployment", "schedule", "pause", "--all")
        for name, entry in spec.items():
            assert [s.schedule.cron for s in served[name].schedules] == [
                s["cron"] for s in entry.get("schedules", [])
            ]
            assert served[name].parameters == entry["parameters"]
            assert served[name].global_concurrency_limit.limit == entry["concurrency_limit"]["limit"]
        champion = ops.aliases()["champion"]
        flow_run_id = ops.run_deployment(
            "promote-model/promote-model", version=champion, config_path=TINY, overrides=ops.overrides()
        )
        ops.wait_completed(flow_run_id, timeout_s=240)
        assert str(flow_run_id) in serve.tail(400)  # run by rft serve
    finally:
        ops.stop("serve")
