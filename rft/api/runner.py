"""The job runner: validates a job's files, queues it, runs it in a worker process, and follows it.

Life of a job: `validating_files` (its files checked as `rft validate` does, in a thread here) ->
`queued` -> `running` (a worker process, `python -m rft.api.worker`, runs the pipeline flow on the
job's config; at most `max_concurrent_jobs` at once, oldest first) -> `succeeded` or `failed` (the
worker records its own outcome). `pause` and `cancel` stop the worker the way a person stops
`rft run` (SIGTERM to its process group: training stops at its next step with a checkpoint)
and record `paused` / `cancelled`; `resume` queues the job again, and its rerun of the same config
resumes from the last checkpoint (stage caching plus checkpoints, as `rft run` resumes).

Workers run in their own sessions, so `kill -9` of the server leaves them running: a restarted
server finds them by the pid on the job and follows them again. A job whose worker is gone without
an outcome is queued again when the server starts (it continues from its last checkpoint), and is
`failed` with a message saying it can be resumed when the worker dies while the server runs.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from rft.api import deployments, job_data, results
from rft.api import hyperparameters as hp_map
from rft.api.settings import ServerSettings
from rft.api.store import Job, Store, now
from rft_core.config import ConfigError, RFTConfig

logger = logging.getLogger("rft.api")

ACTIVE = ("validating_files", "queued", "running", "paused")
RESUMABLE_NOTE = "it can be resumed: POST /v1/fine_tuning/jobs/{id}/resume continues from its last checkpoint"


@dataclass(frozen=True)
class FlowHandle:
    """A job running as a flow run of rft's Prefect deployment (instead of a local worker)."""

    flow_run_id: str


def worker_command(settings: ServerSettings, job_id: str) -> list[str]:
    return [sys.executable, "-m", "rft.api.worker", "--data-dir", str(settings.data_dir), "--job-id", job_id]


def process_alive(pid: int, job_id: str) -> bool:
    """Whether `pid` is a live worker of `job_id` (its command line names the job: a pid reused by
    another process after a restart is not taken for the worker)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc (not Linux): the pid answers, take it
    if b"rft.api.worker" not in cmdline or job_id.encode() not in cmdline:
        return False
    try:  # a zombie (exited, not yet reaped by its parent) is not running
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def job_config(settings: ServerSettings, job: Job, data_files: dict[str, Path]) -> RFTConfig:
    """The job's config before its hyperparameters: the server's base config with the job's data,
    model, grader, output directory and tracking."""
    base = settings.base_config_dict()
    method = job.data["method_type"]
    grader = job.data.get("grader") if method == "reinforcement" else job_data.SUPERVISED_GRADER
    overrides: dict[str, Any] = {
        "output_dir": str(settings.job_dir(job.id) / "out"),
        "run_name": job.id,
        "tracking.tracking_uri": settings.tracking_uri,
        "data.train_path": str(data_files["training_file"]),
        "data.val_path": str(data_files["validation_file"]) if "validation_file" in data_files else None,
        "model.name_or_path": job.data["source"],
        "registry.model_name": job.data["registry_name"],
        "grader.spec": grader,
        "grader.file": None,
        **hp_map.seed_settings(job.data["seed"]),
    }
    return RFTConfig.from_dict(hp_map.apply(base, overrides), source=f"job {job.id}")


class JobRunner:
    """Validation, queue, worker processes and their follow-up, on one background thread (plus a
    validation thread)."""

    def __init__(self, settings: ServerSettings, store: Store) -> None:
        self.settings, self.store = settings, store
        # job id -> its worker: a Popen, a pid (taken up after a restart), or a deployment's flow run
        self._procs: dict[str, subprocess.Popen | int | FlowHandle] = {}
        self.deployment: str | None = None
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._validation = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rft-validate")
        self._thread: threading.Thread | None = None
        self._last_sync: dict[str, float] = {}

    # ------------------------------------------------------------------ life

    def start(self) -> None:
        self.deployment = deployments.find_deployment(self.settings.deployment)
        if self.deployment:
            logger.info("jobs run as flow runs of the Prefect deployment %s", self.deployment)
        self.adopt()
        self._thread = threading.Thread(target=self._loop, name="rft-jobs", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop following jobs; running workers go on (a restarted server takes them up again)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._validation.shutdown(wait=False, cancel_futures=True)

    def adopt(self) -> None:
        """After a (re)start: follow the workers still running, queue again the jobs whose worker is
        gone without an outcome, validate again the jobs whose validation was cut off."""
        for job in self.store.list_jobs(order="asc"):
            if job.data.get("flow_run_id") and job.status in ("running", "paused", "cancelled"):
                with self._lock:  # the next tick reads its state, and records an outcome reached meanwhile
                    self._procs[job.id] = FlowHandle(job.data["flow_run_id"])
                continue
            pid = job.data.get("pid")
            if pid and process_alive(pid, job.id):
                with self._lock:
                    self._procs[job.id] = pid
                continue
            if pid:
                self.store.transition(job.id, None, pid=None)
            if job.status == "running":
                if self.store.transition(job.id, ("running",), "queued", pid=None):
                    self.store.add_event(
                        job.id, "The server restarted while this job ran and its worker is gone: the job is "
                        "queued again and continues from its last checkpoint.", level="warn",
                    )
            elif job.status == "validating_files":
                self.submit_validation(job.id)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:
                logger.exception("job runner tick failed")
            self._wake.wait(self.settings.poll_interval_s)
            self._wake.clear()

    def tick(self) -> None:
        self._reap()
        self._schedule()
        self._sync_running()

    # ------------------------------------------------------------------ validation

    def submit_validation(self, job_id: str) -> None:
        self._validation.submit(self._validate_safely, job_id)

    def _validate_safely(self, job_id: str) -> None:
        try:
            self.validate(job_id)
        except Exception as exc:
            logger.exception("validating the files of %s failed", job_id)
            self._fail(job_id, ("validating_files",), "validation_failed", f"{type(exc).__name__}: {exc}")

    def validate(self, job_id: str) -> None:
        """Check the job's files, write its config, and queue it (or fail it naming file, line, field)."""
        job = self.store.get_job(job_id)
        if job is None or job.status != "validating_files":
            return
        work = self.settings.job_dir(job_id)
        data_files: dict[str, Path] = {}
        labels: dict[str, tuple[str, Path]] = {}
        for param in ("training_file", "validation_file"):
            file_id = job.data.get(param)
            if not file_id:
                continue
            record = self.store.get_file(file_id)
            source = self.settings.file_path(file_id)
            target = work / "data" / f"{param}.jsonl"
            if not target.is_file():
                if record is None or not source.is_file():
                    self._fail(job_id, ("validating_files",), "invalid_file", f"{param} {file_id}: the file was deleted",
                               param=param)
                    return
                job_data.prepare_file(source, target, job.data["method_type"])
            data_files[param] = target
            name = record["filename"] if record else "deleted"
            labels[param] = (f"{param} {file_id} ({name})", target)
        try:
            cfg = job_config(self.settings, job, data_files)
        except ConfigError as exc:
            self._fail(job_id, ("validating_files",), "invalid_config", str(exc))
            return
        try:
            counts = job_data.validate_files(cfg, labels, work)
        except job_data.FileProblem as exc:
            self._fail(job_id, ("validating_files",), "invalid_file", str(exc), param=exc.param)
            return
        method = job.data["method_type"]
        base = cfg.model_dump(mode="json")
        given = job.data.get("hyperparameters_given") or {}
        if method == "supervised":
            if counts.n_sft == 0:
                self._fail(job_id, ("validating_files",), "invalid_file",
                           "training_file: no example ends with an assistant message to learn", param="training_file")
                return
            overrides, written = hp_map.supervised_settings(base, given, counts.n_sft)
        else:
            overrides, written = hp_map.reinforcement_settings(base, given, counts.n_train)
        try:
            cfg = RFTConfig.from_dict(hp_map.apply(base, overrides), source=f"job {job_id}")
        except ConfigError as exc:
            self._fail(job_id, ("validating_files",), "invalid_hyperparameters", str(exc), param="hyperparameters")
            return
        (work / "config.yaml").write_text(cfg.to_yaml())
        total = cfg.rl.iterations if method == "reinforcement" else (
            cfg.sft.max_steps or math.ceil(cfg.sft.epochs * counts.n_sft / (cfg.sft.batch_size * cfg.sft.grad_accum))
        )
        updated = self.store.transition(
            job_id, ("validating_files",), "queued", hyperparameters=written, experiment=cfg.experiment,
            total_steps=total, counts={"train": counts.n_train, "validation": counts.n_val, "sft": counts.n_sft},
        )
        if updated:
            self.store.add_event(job_id, f"Files validated ({counts.n_train} training items, {counts.n_val} "
                                 "validation items): moving job to queued state")
            self._wake.set()

    # ------------------------------------------------------------------ running

    def _alive(self, job_id: str) -> bool:
        with self._lock:
            proc = self._procs.get(job_id)
        if proc is None:
            return False
        if isinstance(proc, FlowHandle):
            try:
                return not deployments.state(proc.flow_run_id).final
            except Exception:  # the Prefect API is unreachable: the run is not known to be over
                return True
        if isinstance(proc, subprocess.Popen):
            return proc.poll() is None
        return process_alive(proc, job_id)

    def _reap(self) -> None:
        with self._lock:
            ids = list(self._procs)
        for job_id in ids:
            if self._alive(job_id):
                continue
            with self._lock:
                proc = self._procs.pop(job_id, None)
            self.store.transition(job_id, None, pid=None)
            job = self.store.get_job(job_id)
            if isinstance(proc, FlowHandle):
                if job is not None and job.status == "running":
                    self._flow_run_ended(job, proc)
                continue
            if job is not None and job.status == "running":
                # The worker ended without recording an outcome: killed, or out of memory.
                message = f"The job's worker process stopped before the job finished; {RESUMABLE_NOTE.format(id=job_id)}."
                self._fail(job_id, ("running",), "worker_stopped", message, resumable=True)
            if job is not None:
                results.settle_metric_events(self.settings, self.store, job)

    def _schedule(self) -> None:
        with self._lock:
            busy = sum(1 for job_id in list(self._procs) if self._alive(job_id))
        if busy >= self.settings.max_concurrent_jobs:
            return
        for job in self.store.list_jobs(("queued",), order="asc"):
            if busy >= self.settings.max_concurrent_jobs:
                break
            with self._lock:
                if job.id in self._procs:
                    continue  # its last worker (paused, then resumed) is still exiting
            if self._launch(job):
                busy += 1

    def _flow_run_ended(self, job: Job, handle: FlowHandle) -> None:
        """Record the outcome of a job's deployment flow run (the local worker records its own)."""
        from rft.api.worker import finish_from_tracking

        final = deployments.state(handle.flow_run_id)
        if final.type == "COMPLETED":
            try:
                finish_from_tracking(self.settings, self.store, job)
            except Exception as exc:
                logger.exception("recording the result of %s failed", job.id)
                self._fail(job.id, ("running",), "finalize_failed", f"the flow run {handle.flow_run_id} completed "
                           f"but recording its result failed: {type(exc).__name__}: {exc}")
            return
        resumable = final.type in ("CRASHED", "CANCELLED")
        note = f"; {RESUMABLE_NOTE.format(id=job.id)}" if resumable else ""
        self._fail(job.id, ("running",), "training_failed" if final.type == "FAILED" else "flow_run_stopped",
                   f"flow run {handle.flow_run_id} ended {final.type.lower()}: {final.message}{note}", resumable=resumable)

    def _launch(self, job: Job) -> bool:
        started = self.store.transition(job.id, ("queued",), "running", started_at=now(), error=None, resumable=None,
                                        flow_run_id=None)
        if started is None:
            return False
        if self.deployment:
            return self._launch_flow_run(job)
        work = self.settings.job_dir(job.id)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(work / "worker.log", "ab") as log:
            try:
                proc = subprocess.Popen(
                    worker_command(self.settings, job.id), cwd=work, env=env, stdin=subprocess.DEVNULL,
                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                )
            except OSError as exc:
                self._fail(job.id, ("running",), "worker_start_failed", f"cannot start the worker: {exc}")
                return False
        with self._lock:
            self._procs[job.id] = proc
        self.store.transition(job.id, None, pid=proc.pid)
        self.store.add_event(job.id, "Fine-tuning job started")
        return True

    def _launch_flow_run(self, job: Job) -> bool:
        try:
            flow_run_id = deployments.submit(self.deployment, self.settings.job_dir(job.id) / "config.yaml", job.id)
        except Exception as exc:
            self._fail(job.id, ("running",), "worker_start_failed",
                       f"cannot start a run of the deployment {self.deployment}: {type(exc).__name__}: {exc}",
                       resumable=True)
            return False
        with self._lock:
            self._procs[job.id] = FlowHandle(flow_run_id)
        self.store.transition(job.id, None, flow_run_id=flow_run_id)
        self.store.add_event(job.id, f"Fine-tuning job started: flow run {flow_run_id} of the Prefect deployment "
                             f"{self.deployment}")
        return True

    def _sync_running(self) -> None:
        for job in self.store.list_jobs(("running",)):
            if time.monotonic() - self._last_sync.get(job.id, 0.0) < 3.0:
                continue
            self._last_sync[job.id] = time.monotonic()
            results.sync_metric_events(self.settings, self.store, job)

    # ------------------------------------------------------------------ state changes

    def _fail(self, job_id: str, allowed: tuple[str, ...], code: str, message: str, param: str | None = None,
              resumable: bool = False) -> None:
        error = {"code": code, "message": message, "param": param}
        if self.store.transition(job_id, allowed, "failed", error=error, finished_at=now(),
                                 resumable=True if resumable else None):
            self.store.add_event(job_id, message, level="error")

    def signal_worker(self, job_id: str, sig: int = signal.SIGTERM) -> bool:
        """Ask the job's worker (its whole process group) to stop; False when none runs."""
        with self._lock:
            proc = self._procs.get(job_id)
        if isinstance(proc, FlowHandle):
            try:
                deployments.cancel(proc.flow_run_id)
            except Exception:
                logger.exception("cannot cancel flow run %s of %s", proc.flow_run_id, job_id)
                return False
            return True
        pid = proc.pid if isinstance(proc, subprocess.Popen) else proc
        if pid is None or not self._alive(job_id):
            return False
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return False
        return True

    def pause(self, job: Job) -> Job | None:
        paused = self.store.transition(job.id, ("running",), "paused")
        if paused:
            self.signal_worker(job.id)
            self.store.add_event(job.id, "Fine-tuning job paused: training stopped; resume continues from its last "
                                 "checkpoint")
        return paused

    def resume(self, job: Job) -> Job | None:
        allowed = ("paused", "failed") if job.data.get("resumable") else ("paused",)
        resumed = self.store.transition(job.id, allowed, "queued", error=None, finished_at=None, resumable=None)
        if resumed:
            self.store.add_event(job.id, "Fine-tuning job resumed: queued to continue from its last checkpoint")
            self._wake.set()
        return resumed

    def cancel(self, job: Job) -> Job | None:
        cancelled = self.store.transition(job.id, ACTIVE, "cancelled", finished_at=now())
        if cancelled:
            self.signal_worker(job.id)
            self.store.add_event(job.id, "Fine-tuning job cancelled; what it wrote is kept")
        return cancelled

    def wake(self) -> None:
        self._wake.set()


def read_config(settings: ServerSettings, job_id: str) -> RFTConfig:
    raw = yaml.safe_load((settings.job_dir(job_id) / "config.yaml").read_text())
    return RFTConfig.from_dict(raw, source=f"job {job_id}")

