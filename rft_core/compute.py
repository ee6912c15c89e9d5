"""Where a training stage runs: the `compute` section, resolved and checked.

Three places, one rule each:
- this process (the default: one process and no `compute.address`): the stage runs in the caller's
  process, as it always did;
- several processes of this machine (`compute.processes` > 1, no address): a Ray instance of its
  own is started for the stage, and Ray Train runs the processes (`rft_core.launch`);
- a Ray cluster (`compute.address`): Ray Train runs `processes x machines` processes on it.

One mechanism for one machine and many: the same launcher, the same worker code, the same faults
and logs, whether the cluster is a local instance or a KubeRay cluster (see `rft_core.launch` for
why Ray Train rather than torch's elastic launcher).

A stage computes the same update whatever runs it, which is why its cache key leaves this section
out: RL's batch settings are totals over all processes already, and SFT's micro-batch
(`sft.batch_size`, per process under `accelerate launch`) is split over the processes here
(`worker_config`), so that N processes take what one process would. Settings that do not split
evenly are refused before anything starts (`split_problems`). One exception, said when the stage
starts (`rl_update_differs`): RL with several PPO minibatches per epoch, whose composition depends
on the number of processes.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rft_core.config import ConfigError, RFTConfig

# The environment a launcher (`accelerate launch`, torchrun) gives each process it starts: this
# process is one rank of a launch made by hand, and the launch decides where training runs.
_LAUNCHER_VARIABLES = ("WORLD_SIZE", "LOCAL_RANK")

INSTALL_RAY = "pip install 'rft[ray]'"


class ComputeError(RuntimeError):
    """A stage could not train where `compute` says (`rft_core.launch`: the cluster unreachable,
    processes that did not start, one that failed); the message says which and why."""


def launched_by_hand() -> bool:
    """Whether this process is a rank of `accelerate launch` / torchrun (the `compute` section is
    then not what decides where training runs)."""
    return any(name in os.environ for name in _LAUNCHER_VARIABLES)


def visible_gpus(cfg: RFTConfig) -> int:
    """GPUs this machine gives training (0 when `model.device` rules them out)."""
    if cfg.model.device in ("cpu", "mps"):
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def local_processes(cfg: RFTConfig) -> int:
    """`compute.processes` on this machine: `auto` is one per visible GPU, else 1."""
    if cfg.compute.processes == "auto":
        return max(1, visible_gpus(cfg))
    return int(cfg.compute.processes)


def in_process(cfg: RFTConfig) -> bool:
    """Whether training runs in the caller's process (one process, no Ray cluster)."""
    return cfg.compute.address is None and local_processes(cfg) == 1


def where(cfg: RFTConfig) -> str:
    """In words, for log lines and errors."""
    if cfg.compute.address is not None:
        return f"the Ray cluster at {cfg.compute.address}"
    return "this process" if in_process(cfg) else "this machine (a Ray instance of its own)"


# --------------------------------------------------------------------------- the same update


def split_problems(cfg: RFTConfig, world: int) -> list[str]:
    """Settings that cannot be split evenly over `world` processes (the update would differ from
    one process's), one line each."""
    if world <= 1:
        return []
    counts = {
        "sft.batch_size": cfg.sft.batch_size if cfg.sft.enabled else None,
        "rl.prompts_per_iteration": cfg.rl.prompts_per_iteration if cfg.rl.enabled else None,
        "rl.minibatch_size": cfg.rl.minibatch_size if cfg.rl.enabled else None,
        "rl.micro_batch_size": cfg.rl.micro_batch_size if cfg.rl.enabled else None,
    }
    return [
        f"{name} ({value}) does not divide over the {world} training processes of compute "
        f"(processes x machines): set it to a multiple of {world}, so that each process takes an "
        "equal share and the update is the one process's"
        for name, value in counts.items()
        if value and value % world
    ]


def rl_update_differs(cfg: RFTConfig, world: int) -> str | None:
    """Why RL on `world` processes computes other numbers than on one, or None when it computes the
    same update. Each process shuffles its own rows into PPO minibatches (`rl.trainer`): with one
    minibatch per epoch every step sees the whole batch, as one process does; with several, which
    samples share a step differs (the same expected update, other numbers)."""
    rows = cfg.rl.prompts_per_iteration * cfg.rl.samples_per_prompt
    if world <= 1 or not cfg.rl.enabled or cfg.rl.minibatch_size >= rows:
        return None
    return (
        f"rl.minibatch_size ({cfg.rl.minibatch_size}) cuts each PPO epoch's {rows} samples into several "
        f"minibatches: on {world} processes each shuffles its own share, so the minibatches hold other "
        "samples than on one process (the same expected update, not the same numbers; the stage's cache "
        f"key does not say how many processes trained it). rl.minibatch_size >= {rows} trains the same "
        "numbers on any number of processes"
    )


def worker_config(cfg: RFTConfig, world: int) -> RFTConfig:
    """The config each of `world` processes trains with: `sft.batch_size` split over them (the same
    step as one process; `rft_core.sft` takes it per process), and the paths a process may read
    made absolute (workers run in another directory, maybe on another machine)."""
    if problems := split_problems(cfg, world):
        raise ConfigError("; ".join(problems))
    update: dict[str, Any] = {"output_dir": str(Path(cfg.output_dir).resolve())}
    changed = cfg.model_copy(update=update)
    if world > 1 and cfg.sft.enabled:
        changed.sft = cfg.sft.model_copy(update={"batch_size": cfg.sft.batch_size // world})
    if cfg.grader.file is not None:
        changed.grader = cfg.grader.model_copy(update={"file": str(Path(cfg.grader.file).resolve())})
    name = Path(cfg.model.name_or_path).expanduser()
    if cfg.model.name_or_path != "tiny" and name.exists():
        changed.model = cfg.model.model_copy(update={"name_or_path": str(name.resolve())})
    return changed


# --------------------------------------------------------------------------- before anything runs


def problems(cfg: RFTConfig) -> list[str]:
    """What is wrong with the `compute` section before any stage runs, one line each: Ray missing
    where it is needed, a cluster that cannot be reached (named by its address), settings that do
    not split over the processes, FSDP asked for a LoRA model. Nothing when this process is a rank
    of a launch made by hand (`accelerate launch`: the launch decides)."""
    if launched_by_hand() or in_process(cfg):
        return []
    compute = cfg.compute
    found: list[str] = []
    try:
        import ray  # noqa: F401
    except ImportError:
        found.append(
            f"compute: training on {where(cfg)} ({compute.processes} processes x {compute.machines} machines) "
            f"runs on Ray, which is not installed here: {INSTALL_RAY}"
        )
    if compute.address is not None and not found:
        problem = cluster_problem(compute.address)
        if problem is not None:
            found.append(problem)
    if compute.processes != "auto":
        found += split_problems(cfg, int(compute.processes) * compute.machines)
    if compute.strategy == "fsdp" and cfg.model.lora.enabled:
        found.append(
            "compute.strategy=fsdp shards fully trained models only; model.lora.enabled trains LoRA "
            "adapters on frozen weights: use compute.strategy=ddp, or turn LoRA off"
        )
    return found


def cluster_problem(address: str, timeout_s: float = 5.0) -> str | None:
    """Why the Ray cluster at `address` (compute.address) cannot be reached, or None: its head's
    port must accept a connection within `timeout_s` (Ray's own client would retry for minutes)."""
    try:
        host, port, found = head_endpoint(address)
    except ValueError as exc:
        return f"compute.address {address}: {exc}"
    named = address if found == address else f"{address} ({found})"
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return None
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        return (
            f"compute.address {named}: the Ray cluster cannot be reached ({host}:{port}: {reason}); "
            "start it (ray start --head), or correct compute.address"
        )


def head_endpoint(address: str) -> tuple[str, int, str]:
    """(host, port, where found) of the head a Ray address names: host:port, ray://host:port, or
    auto (the RAY_ADDRESS variable, else the cluster `ray start` last started on this machine)."""
    if address == "auto":
        if os.environ.get("RAY_ADDRESS"):
            address = f"RAY_ADDRESS={os.environ['RAY_ADDRESS']}"
        else:
            from ray._private.services import canonicalize_bootstrap_address_or_die

            try:
                address = f"found on this machine: {canonicalize_bootstrap_address_or_die('auto')}"
            except ConnectionError:
                raise ValueError(
                    "no running Ray cluster found (RAY_ADDRESS is not set and `ray start` started none on "
                    "this machine)"
                ) from None
    found = address
    text = address.rsplit("=", 1)[-1].rsplit(": ", 1)[-1]
    text = text.split("://", 1)[1] if "://" in text else text
    host, sep, port = text.rstrip("/").rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError("expected host:port (the head's GCS port, usually 6379), ray://host:port or auto")
    return host.strip("[]"), int(port), found


# --------------------------------------------------------------------------- a stage's job


@dataclass
class StageJob:
    """What one training stage needs, wherever it runs: only paths, ids and the config (no models,
    no open connections), so that it travels to processes on other machines.

    Metrics and samples go to MLflow from the main process: it makes its own `log` from
    `run_id` and `tracking_uri` (an open MLflow client does not travel between processes)."""

    stage: str  # "sft" or "rl"
    config: RFTConfig
    train_items: str
    val_items: str
    start_model: str  # sft: the base model; rl: the model RL starts from
    out_dir: str
    run_id: str | None = None
    tracking_uri: str | None = None
    samples_table: str | None = None  # rl: the MLflow table rollout samples go to

    def run(self, *, is_main: bool = True) -> Any:
        """Train the stage in this process (one of several, or the only one); the `StageResult`."""
        from rft_core import tracking
        from rft_core.data import read_items

        train, val = read_items(self.train_items), read_items(self.val_items)
        tracked = is_main and self.run_id is not None
        log = tracking.metrics_logger(self.run_id, self.stage, tracking_uri=self.tracking_uri) if tracked else None
        if self.stage == "sft":
            from rft_core.sft import run_sft

            return run_sft(self.config, train, val, self.start_model, self.out_dir, log=log)
        if self.stage == "rl":
            from rft_core.rl.trainer import run_rl

            samples = None
            if tracked and self.samples_table:
                samples = tracking.table_logger(self.run_id, self.samples_table, tracking_uri=self.tracking_uri)
            return run_rl(self.config, train, val, self.start_model, self.out_dir, log=log, log_samples=samples)
        raise ValueError(f"stage {self.stage!r}: expected sft or rl")


def run_stage(job: StageJob, timings: dict[str, float] | None = None) -> Any:
    """Train `job` where `job.config.compute` says: in this process, or on Ray
    (`rft_core.launch.run_on_ray`, which fills `timings` when given). Returns the stage's
    `training.StageResult`."""
    cfg = job.config
    if in_process(cfg):
        return job.run()
    from rft_core.launch import run_on_ray

    return run_on_ray(job, timings)
