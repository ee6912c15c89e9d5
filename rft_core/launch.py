"""A training stage on several processes, on this machine or a Ray cluster, through Ray Train.

`run_on_ray(job)` connects to Ray (a Ray instance of its own on this machine, or the cluster at
`compute.address`), and Ray Train's `TorchTrainer` starts `processes x machines` worker processes:
it places them (one per GPU, spread over the machines), sets up torch's process group, ranks and
devices, and tears every one of them down when one fails. Each worker runs the stage's ordinary
training code (`StageJob.run`): accelerate inside, `training.Processes`, the same checkpoints, so
N processes compute what `accelerate launch` over N processes computes, which tests prove equal to
one process's update.

Why Ray Train, and for one machine too: one mechanism for a laptop, a multi-GPU machine and a
KubeRay cluster (same code, same faults, same logs), where torch's elastic launcher would serve
one machine well but need a rendezvous, a start on every node and a way to stop every node's
ranks when one dies, which is what Ray Train is. Its cost is the start-up of Ray (measured in
bench/README.md: seconds, against stages of minutes to hours).

Between this process (the driver: a Prefect task, `rft run`, `rft train`) and the workers, one
small actor (`StageChannel`) carries:
- log records and progress of the workers, replayed here: into the Prefect task's log and the
  terminal's progress display, the main process's lines as they are, the other ranks' warnings
  and errors prefixed with their rank;
- where each rank runs (node address, pid), logged and tagged on the stage's MLflow run
  (`rft.compute.ranks`);
- a stop request (Ctrl-C, SIGTERM here): every worker stops at the same step with a checkpoint
  (`lifecycle`), and the stage raises `TrainingStopped` here, as in one process;
- the main process's result (model directory, metrics, history, guard events).
Metrics go from the main worker to MLflow directly (`StageJob.run`), once.

Faults. A rank that dies (killed, out of memory, crashed) or raises fails the whole stage: Ray Train
stops the other ranks, and the stage raises `StageProcessFailed` naming the rank that failed first
(the others' lost-connection errors are its consequences) with its error, which the task's log and
the MLflow run (`rft.ended_because`) show. A Ray instance started here is shut down whatever
happens; from a cluster the driver disconnects, and Ray ends the stage's actors with it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import ray
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from rft_core import compute, progress
from rft_core.compute import ComputeError, StageJob
from rft_core.config import ConfigError, RFTConfig
from rft_core.guards import GraderFailing, TrainingDiverged
from rft_core.lifecycle import TrainingStopped, deferring_stops, die_with_parent, request_stop, stop_requested
from rft_core.training import StageResult

logger = logging.getLogger("rft.launch")

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # telemetry tries the network

POLL_S = 0.5  # how often the driver and the workers exchange what the channel holds


class RayUnavailable(ComputeError):
    """The Ray cluster named by compute.address cannot be used."""


class StageProcessFailed(ComputeError):
    """A training process of a stage failed (died or raised); the stage failed with it."""

    def __init__(self, message: str, rank: int | None = None, resumable: bool = True):
        super().__init__(message)
        self.rank = rank
        # False when the rank stopped on one of rft's own guards (diverged, a failing grader): the
        # same command would fail the same way; the error says what to change.
        self.resumable = resumable


class StageStartTimeout(ComputeError):
    """Ray did not start every training process of a stage within compute.start_timeout_s."""


# --------------------------------------------------------------------------- where the stage runs


@dataclass(frozen=True)
class Workers:
    """The processes a stage asks Ray for."""

    processes: int  # per machine
    machines: int
    use_gpu: bool
    strategy: str

    @property
    def world(self) -> int:
        return self.processes * self.machines

    @property
    def resources(self) -> dict[str, float]:
        return {"CPU": 1.0, **({"GPU": 1.0} if self.use_gpu else {})}

    @property
    def placement_strategy(self) -> str:
        """All on one machine; one per machine; else Ray packs them (GPU nodes fill by their GPUs)."""
        if self.machines == 1:
            return "STRICT_PACK"
        return "STRICT_SPREAD" if self.processes == 1 else "PACK"


def workers_for(cfg: RFTConfig) -> Workers:
    """Resolve `compute` against what Ray sees (call once connected): `processes: auto` is the GPUs
    of the largest GPU node (this machine's with a Ray instance of its own), 1 without GPUs."""
    gpus_per_node = [int(node["Resources"].get("GPU", 0)) for node in ray.nodes() if node.get("Alive")]
    has_gpus = cfg.model.device not in ("cpu", "mps") and max(gpus_per_node, default=0) > 0
    use_gpu = cfg.model.device == "cuda" or has_gpus
    processes = cfg.compute.processes
    if processes == "auto":
        processes = max(gpus_per_node, default=0) if use_gpu else 1
    return Workers(max(1, int(processes)), cfg.compute.machines, use_gpu, cfg.compute.strategy)


@contextlib.contextmanager
def connected(cfg: RFTConfig) -> Iterator[None]:
    """Ray for the block: a Ray instance of its own on this machine (shut down after, with every
    process it started), or the cluster at `compute.address` (disconnected after: Ray ends the
    stage's actors with the driver). A process already connected (e.g. a Ray job) stays so."""
    if ray.is_initialized():
        yield
        return
    address = cfg.compute.address
    # ray.init replaces SIGTERM's handler (with sys.exit) in the main thread: SIGTERM must stay a
    # stop request at the next training step (`lifecycle.stop_on_signals`).
    main = threading.current_thread() is threading.main_thread()
    sigterm = signal.getsignal(signal.SIGTERM) if main else None
    quiet = logging.getLogger("ray._private.authentication.authentication_token_setup")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "token authentication is enabled" on every local start
    reaper, before = None, _children(os.getpid())
    try:
        # Outermost: a SIGTERM kept pending while Ray started comes once its handler is back (and
        # an interrupt then still shuts the instance down, below).
        with _group_signals_spared() if address is None else contextlib.nullcontext():
            try:
                if address is None:
                    # Room for every process whatever the core count: a one-CPU reservation each.
                    cpus = max(os.cpu_count() or 1, compute.local_processes(cfg))
                    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False,
                             logging_level=logging.WARNING)
                else:
                    if (problem := compute.cluster_problem(address)) is not None:
                        raise RayUnavailable(problem)
                    try:
                        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
                    except Exception as exc:  # ConnectionError, AuthenticationError, a version mismatch: Ray's words
                        raise RayUnavailable(
                            f"compute.address {address}: cannot connect to the Ray cluster: {exc} (a cluster with "
                            "token authentication, Ray's default, needs its token here: RAY_AUTH_MODE=token with "
                            "RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH in this process's environment)"
                        ) from None
            finally:
                quiet.setLevel(level)
                if main and sigterm is not None:
                    signal.signal(signal.SIGTERM, sigterm)
            if address is None:
                reaper = _start_reaper(_children(os.getpid()) - before)
        yield
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if reaper is not None:
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                reaper.communicate(b"done", timeout=10)  # the instance is down: nothing to reap


@contextlib.contextmanager
def _group_signals_spared() -> Iterator[None]:
    """Start a Ray instance in the block whose processes ignore the stop signals sent to this
    process's whole group: they inherit SIGTERM blocked (Ray blocks SIGINT in them itself, for
    Ctrl-C at a terminal). A Prefect worker cancelling a flow run, `kill -TERM -PGID`, a terminal's
    group all signal every process of the group at once: the driver must stop training at its next
    step with a checkpoint (`lifecycle`), which needs the instance alive until then; the driver
    then shuts the instance down itself (`connected`). (A signal mask is kept across fork and exec,
    and the raylet passes it on to the workers it starts.)"""
    if not hasattr(signal, "pthread_sigmask"):  # not POSIX: no process groups to signal
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        # A SIGTERM that came meanwhile was kept pending: it is handled here, as a stop request.
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


# Runs as `python -c <this> PIDS`: the Ray instance this process started (PIDS, and what they start)
# is killed when this process dies however it dies (kill -9 included: the parent-death signal, or
# its stdin closing); "done" on stdin means it was shut down and ends the reaper quietly. Ray's own
# clean-up leaves its agents running after its driver is killed, holding their ports.
_REAPER = """
import os, signal, sys, threading, time
def ticks(pid):
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[19]
    except OSError:
        return None
roots = {int(p) for p in sys.argv[1].split(",") if p}
known = {}
# Reentrant: the driver's death closes stdin and sends the parent-death SIGTERM at once, so reap()
# can be interrupted by its own signal handler while it holds the lock (a plain Lock deadlocked).
lock = threading.RLock()
def scan():
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                table[int(entry)] = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
            except OSError:
                pass
    with lock:
        frontier = [p for p in roots if p in table and p not in known]
        for p in frontier:
            known[p] = ticks(p)
        frontier = [p for p in known if p in table]
        while frontier:
            children = [p for p, parent in table.items() if parent in frontier and p not in known]
            for p in children:
                known[p] = ticks(p)
            frontier = children
def reap(*_):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one reap is enough (reap runs in the main thread)
    scan()
    with lock:
        for pid, started in known.items():
            if started is not None and ticks(pid) == started:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
    os._exit(0)
signal.signal(signal.SIGTERM, reap)
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # started while its starter blocked it
def watch():
    while True:
        scan()
        time.sleep(1)
threading.Thread(target=watch, daemon=True).start()
if sys.stdin.read() == "done":
    os._exit(0)
reap()
"""


def _children(pid: int) -> set[int]:
    """The processes whose parent is `pid` (Linux; empty elsewhere)."""
    found = set()
    with contextlib.suppress(OSError):
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError):
                    if (Path("/proc") / entry / "stat").read_text().rsplit(")", 1)[1].split()[1] == str(pid):
                        found.add(int(entry))
    return found


def _start_reaper(pids: set[int]) -> subprocess.Popen[bytes] | None:
    """Start the reaper of the Ray instance made of `pids` (see `_REAPER`); None off Linux."""
    if not pids or not os.path.isdir("/proc"):
        return None
    command = die_with_parent([sys.executable, "-c", _REAPER, ",".join(map(str, sorted(pids)))], signal.SIGTERM)
    return subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


# --------------------------------------------------------------------------- the channel


@ray.remote(num_cpus=0)
class StageChannel:
    """What the driver and the workers of one stage tell each other (see the module docstring).
    An async actor: the driver's `take` returns as soon as a worker has news, so that progress
    shows when it happens (its rate and time left are computed here)."""

    def __init__(self) -> None:
        import asyncio

        self.events: list[tuple[Any, ...]] = []
        self.news = asyncio.Event()
        self.stop: str | None = None

    async def put(self, events: list[tuple[Any, ...]]) -> str | None:
        """A worker's news; answers whether a stop was requested (and why)."""
        if events:
            self.events.extend(events)
            self.news.set()
        return self.stop

    async def take(self, wait_s: float) -> list[tuple[Any, ...]]:
        """Every event so far, waiting up to `wait_s` for one."""
        import asyncio

        if not self.events:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.news.wait(), wait_s)
        events, self.events = self.events, []
        self.news.clear()
        return events

    async def request_stop(self, reason: str) -> None:
        self.stop = reason


class _Outbox:
    """A worker's side of the channel: events queue here and a thread sends them, at once for
    progress and results, else every POLL_S, bringing back a stop request (the worker then stops
    at its next step, `lifecycle`)."""

    URGENT = ("progress", "started", "result", "stopped")

    def __init__(self, channel: Any, rank: int):
        self.channel, self.rank = channel, rank
        self.pending: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self.done, self.wake = threading.Event(), threading.Event()
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="rft-outbox", daemon=True)

    def __enter__(self) -> _Outbox:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.done.set()
        self.wake.set()
        self.thread.join(timeout=10)
        self.flush()

    def send(self, kind: str, *payload: Any) -> None:
        self.pending.put((kind, self.rank, *payload))
        if kind in self.URGENT:
            self.wake.set()

    def flush(self) -> None:
        with self.lock:
            events = []
            while not self.pending.empty():
                events.append(self.pending.get())
            stop = ray.get(self.channel.put.remote(events))
        if stop is not None and stop_requested() is None:
            request_stop(stop)

    def _run(self) -> None:
        while not self.done.is_set():
            self.wake.wait(POLL_S)
            self.wake.clear()
            with contextlib.suppress(Exception):  # a lost channel must not take training down
                self.flush()


class _ForwardLogs(logging.Handler):
    """rft's log records of a worker, sent to the driver (message already formatted)."""

    def __init__(self, outbox: _Outbox, level: int):
        super().__init__(level)
        self.outbox = outbox

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.exc_info:
                message += "\n" + logging.Formatter().formatException(record.exc_info)
            self.outbox.send("log", record.name, record.levelno, message)
        except Exception:
            self.handleError(record)


class _ForwardProgress:
    """A `progress.Reporter` that sends the loop's progress to the driver, which shows it."""

    def __init__(self, outbox: _Outbox):
        self.outbox, self.count = outbox, 0

    def start(self, task: str, total: int, unit: str) -> int:
        self.count += 1
        self.outbox.send("progress", "start", self.count, task, total, unit)
        return self.count

    def update(self, handle: int, done: int, latest: Mapping[str, float]) -> None:
        self.outbox.send("progress", "update", handle, done, {k: float(v) for k, v in latest.items()})

    def finish(self, handle: int) -> None:
        self.outbox.send("progress", "finish", handle)


# --------------------------------------------------------------------------- the workers


def train_worker(config: dict[str, Any]) -> None:
    """What each Ray Train worker runs: the stage's training in this process, as one rank."""
    import ray.train

    job: StageJob = config["job"]
    context = ray.train.get_context()
    rank = context.get_world_rank()
    if os.path.isdir(config["cwd"]):
        os.chdir(config["cwd"])  # relative paths mean what they mean to the driver
    if job.config.compute.strategy == "fsdp":
        # What `accelerate launch --use_fsdp --fsdp_version 2` tells its processes (training.fsdp_settings).
        os.environ.update({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"})
    with _Outbox(config["channel"], rank) as outbox:
        rft_logger = logging.getLogger("rft")
        rft_logger.setLevel(logging.INFO)
        # The main process says everything; the others what went wrong (the rest repeats rank 0).
        rft_logger.addHandler(_ForwardLogs(outbox, logging.INFO if rank == 0 else logging.WARNING))
        progress.set_reporter(_ForwardProgress(outbox))
        outbox.send("started", {"host": socket.gethostname(), "address": ray.util.get_node_ip_address(),
                                "node": ray.get_runtime_context().get_node_id(), "pid": os.getpid()})
        try:
            result = job.run(is_main=rank == 0)
        except KeyboardInterrupt as exc:  # a requested stop, at a step boundary (TrainingStopped)
            stopped = exc if isinstance(exc, TrainingStopped) else None
            outbox.send("stopped", None if stopped is None else
                        {"stage": stopped.stage, "step": stopped.step, "total": stopped.total,
                         "checkpoint": stopped.checkpoint})
            return
        if rank == 0:
            outbox.send("result", asdict(result))


# --------------------------------------------------------------------------- the driver


def run_on_ray(job: StageJob, timings: dict[str, float] | None = None) -> StageResult:
    """Train `job` on the processes `job.config.compute` asks for (see the module docstring).
    `timings`, when given, receives the seconds spent connecting to Ray (`connect_s`: a local
    instance's start), starting the processes (`start_s`) and training (`train_s`)."""
    cfg = job.config
    timings = {} if timings is None else timings
    began = time.perf_counter()
    with connected(cfg):
        timings["connect_s"] = time.perf_counter() - began
        workers = workers_for(cfg)
        if problems := compute.split_problems(cfg, workers.world):
            raise ConfigError("; ".join(problems))
        job = StageJob(**{**vars(job), "config": compute.worker_config(cfg, workers.world)})
        logger.info("%s: %d training processes (%d per machine x %d, %s, %s) on %s", job.stage, workers.world,
                    workers.processes, workers.machines, workers.strategy, "GPU" if workers.use_gpu else "CPU",
                    compute.where(cfg))
        if job.stage == "rl" and (differs := compute.rl_update_differs(cfg, workers.world)):
            logger.warning("%s", differs)
        stage = _Stage(job, workers)
        try:
            return stage.run()
        finally:
            timings.update(stage.timings)
            if "train_s" in timings:
                logger.info("%s on Ray: connected in %.1f s, %d processes started in %.1f s, trained in %.1f s",
                            job.stage, timings["connect_s"], workers.world, timings["start_s"], timings["train_s"])


class _Stage:
    """One stage's run on Ray, seen from the driver."""

    def __init__(self, job: StageJob, workers: Workers):
        self.job, self.workers = job, workers
        self.ranks: dict[int, dict[str, Any]] = {}
        self.result: dict[str, Any] | None = None
        self.stopped: dict[str, Any] | None = None
        self.shown: dict[int, Any] = {}  # progress loops of the workers, shown here
        # Other ranks' records wait one exchange: what rank 0 says too (a warning every rank logs) shows once.
        self.said: set[tuple[str, str]] = set()
        self.held: list[tuple[int, str, int, str]] = []
        self.channel = StageChannel.remote()
        self.timings: dict[str, float] = {}  # start_s: until every rank started; train_s: after
        self.began = time.perf_counter()

    def run(self) -> StageResult:
        cfg, workers = self.job.config, self.workers
        trainer = TorchTrainer(
            train_worker,
            train_loop_config={"job": self.job, "channel": self.channel, "cwd": os.getcwd()},
            scaling_config=ScalingConfig(
                num_workers=workers.world, use_gpu=workers.use_gpu, resources_per_worker=workers.resources,
                placement_strategy=workers.placement_strategy,
            ),
            run_config=RunConfig(
                name=f"rft-{self.job.stage}-{uuid.uuid4().hex[:8]}",
                storage_path=str(Path(cfg.output_dir) / "ray"),
                # No restarts by Ray: a failed stage fails the task; its retry resumes from the checkpoint.
                failure_config=FailureConfig(max_failures=0),
            ),
        )
        outcome: dict[str, BaseException | None] = {}

        def fit() -> None:
            try:
                trainer.fit()
                outcome["error"] = None
            except BaseException as exc:  # handed to the driver's thread
                outcome["error"] = exc

        thread = threading.Thread(target=fit, name=f"rft-{self.job.stage}-fit", daemon=True)
        started = time.monotonic()
        relayed = False
        with deferring_stops():  # a signal here is a request: the workers stop at their next step
            thread.start()
            while thread.is_alive():
                self.pump(wait_s=POLL_S)
                if not relayed and (reason := stop_requested()) is not None:
                    self.channel.request_stop.remote(reason)
                    relayed = True
                if len(self.ranks) < workers.world and time.monotonic() - started > cfg.compute.start_timeout_s:
                    raise self.start_timeout()
            thread.join()
            self.pump(wait_s=0, last=True)
            if "start_s" in self.timings:
                self.timings["train_s"] = time.perf_counter() - self.began - self.timings["start_s"]
            if outcome.get("error") is not None:
                raise self.failure(outcome["error"])
            if self.stopped is not None:
                raise TrainingStopped(**self.stopped)
            if relayed:  # stopped before training started: nothing to checkpoint
                raise KeyboardInterrupt(stop_requested())
        if self.result is None:
            raise StageProcessFailed(f"{self.job.stage}: the main training process ended without a result")
        return StageResult(**self.result)

    # ---- what the workers said

    def pump(self, wait_s: float, last: bool = False) -> None:
        held, self.held = self.held, []
        for event in ray.get(self.channel.take.remote(wait_s)):
            kind, rank, *payload = event
            if kind == "log":
                name, level, message = payload
                if rank == 0:
                    self.said.add((name, message))
                    logging.getLogger(name).log(level, "%s", message)
                else:
                    self.held.append((rank, name, level, message))
            elif kind == "progress":
                self.show_progress(*payload)
            elif kind == "started":
                self.ranks[rank] = payload[0]
                if len(self.ranks) == self.workers.world:
                    self.timings["start_s"] = time.perf_counter() - self.began
                    self.placed()
            elif kind == "stopped" and rank == 0:
                self.stopped = payload[0]
            elif kind == "result":
                self.result = payload[0]
        if last:
            held, self.held = held + self.held, []
        for rank, name, level, message in held:
            if (name, message) not in self.said:
                logging.getLogger(name).log(level, "rank %d: %s", rank, message)

    def show_progress(self, op: str, handle: int, *args: Any) -> None:
        """A worker's progress loop, replayed into this process's display (`rft_core.progress`)."""
        if op == "start":
            self.shown[handle] = args  # opened at its first update, which says where it starts
        elif op == "update":
            done, latest = args
            entry = self.shown.get(handle)
            if isinstance(entry, tuple):  # its first update: where the loop starts (a resume: past 0)
                task, total, unit = entry
                stack = contextlib.ExitStack()
                self.shown[handle] = [stack, stack.enter_context(progress.progress(task, total, unit, start=done))]
            elif entry is not None:
                entry[1].update(done, **latest)
        elif op == "finish":
            entry = self.shown.pop(handle, None)
            if entry is not None and not isinstance(entry, tuple):
                entry[0].close()

    def placed(self) -> None:
        """Every rank started: say where, in the log and on the stage's MLflow run."""
        lines = [f"rank {rank}: pid {info['pid']} on {info['host']} ({info['address']}, node {info['node'][:8]})"
                 for rank, info in sorted(self.ranks.items())]
        machines = len({info["node"] for info in self.ranks.values()})
        logger.info("%s: %d processes on %d machine(s): %s", self.job.stage, len(self.ranks), machines, "; ".join(lines))
        if self.job.run_id is not None:
            from rft_core import tracking
            from rft_core.tracking import tags

            placement = {str(rank): info for rank, info in sorted(self.ranks.items())}
            tracking.set_tags(self.job.run_id, {tags.TAG_COMPUTE_RANKS: json.dumps(placement),
                                                tags.TAG_COMPUTE_MACHINES: machines},
                              tracking_uri=self.job.tracking_uri)

    # ---- what went wrong

    def where(self, rank: int) -> str:
        info = self.ranks.get(rank)
        return f" (pid {info['pid']} on {info['host']})" if info else ""

    def failure(self, exc: BaseException) -> BaseException:
        """The stage's error for what Ray Train raised: the rank that failed first, and how."""
        from ray.train import WorkerGroupError

        stage, world = self.job.stage, self.workers.world
        if not isinstance(exc, WorkerGroupError):
            return StageProcessFailed(f"{stage} on {world} processes failed in Ray: {type(exc).__name__}: {exc}")
        failure = rank_failure(stage, world, exc.worker_failures, self.where)
        logger.error("%s\n%s", failure, _snippet(exc, failure.rank))
        return failure

    def start_timeout(self) -> StageStartTimeout:
        workers = self.workers
        missing = sorted(set(range(workers.world)) - set(self.ranks))
        return StageStartTimeout(
            f"{self.job.stage}: Ray did not start rank(s) {', '.join(map(str, missing))} of {workers.world} within "
            f"compute.start_timeout_s ({self.job.config.compute.start_timeout_s:g} s): asked for {workers.world} "
            f"processes of {workers.resources} each ({workers.placement_strategy}); the cluster has "
            f"{_resources(ray.cluster_resources())} in all, {_resources(ray.available_resources())} free"
        )


def rank_failure(
    stage: str, world: int, failures: Mapping[int, BaseException], where: Callable[[int], str] = lambda rank: ""
) -> StageProcessFailed:
    """The stage's error for the ranks' errors (`failures`, by rank): the first rank that failed of
    itself (not from losing a peer) with its error, the ranks that failed the same way, the ones
    stopped with it; resumable unless the error is one of rft's guards. `where(rank)` places a rank
    (" (pid 42 on host)")."""
    causes = {rank: error for rank, error in failures.items() if not _lost_peer(error)} or dict(failures)
    rank = min(causes)
    error = causes[rank]
    said = _describe(error)
    message = f"{stage} failed on rank {rank} of {world}{where(rank)}: {said}"
    # Ranks that met the same error at the same step (a guard every rank agrees on, e.g. non-finite
    # weights) failed with it; the others were stopped because of it.
    same = sorted(r for r, e in causes.items() if r != rank and _describe(e) == said)
    stopped = sorted(set(range(world)) - {rank} - set(same))
    for ranks, one, several in ((same, "failed the same way", "failed the same way"),
                                (stopped, "was stopped with it", "were stopped with it")):
        if ranks:
            message += (f"; ranks {', '.join(map(str, ranks))} {several}" if len(ranks) > 1
                        else f"; rank {ranks[0]} {one}")
    failure = StageProcessFailed(message, rank, resumable=not isinstance(error, _GUARDS))
    failure.__cause__ = error
    return failure


def _resources(resources: Mapping[str, float]) -> str:
    return json.dumps({k: v for k, v in sorted(resources.items()) if k in ("CPU", "GPU")})


# rft's own stops on what training met (`guards`): rerunning the same config meets it again.
_GUARDS = (TrainingDiverged, GraderFailing)

# A rank whose peer died fails in its next collective with one of these: a consequence, not a cause.
_LOST_PEER = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "NCCL communicator was aborted",
              "ProcessGroupNCCL", "DistBackendError", "Socket Timeout")


def _lost_peer(error: BaseException) -> bool:
    text = f"{type(error).__name__}: {error}"
    return any(sign in text for sign in _LOST_PEER)


def _describe(error: BaseException) -> str:
    """A rank's error in one line: how its process died, or its exception."""
    from ray.exceptions import ActorDiedError, OutOfMemoryError, RayActorError
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError

    cause = getattr(error, "health_check_failure", error)
    if isinstance(cause, OutOfMemoryError):
        return f"its process ran out of memory (Ray's memory monitor killed it): {cause}"
    if isinstance(error, WorkerHealthCheckFailedError) or isinstance(cause, ActorDiedError | RayActorError):
        return ("its process died without an error of its own (killed, e.g. by kill -9 or the out-of-memory "
                "killer, or crashed)")
    first = str(error).strip().splitlines()
    return f"{type(error).__name__}: {first[0] if first else ''}".rstrip(": ")


def _snippet(exc: BaseException, rank: int) -> str:
    """The failed rank's part of Ray Train's message (its traceback), for the task's log."""
    text = getattr(exc, "_error_message", str(exc))
    head = f"[Rank {rank} Error Snippet]:"
    if head not in text:
        return text
    part = text.split(head, 1)[1]
    return part.split("[Rank ", 1)[0].strip()
