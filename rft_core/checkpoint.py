"""Training checkpoints: written atomically, found again after a crash, pruned to the last few.

A checkpoint directory holds `model/` (save_pretrained: the full model, or the LoRA adapter),
optional extra tensors (e.g. the value head), the optimizer state keyed by parameter name, the
scheduler state, and `state.json` (step, data position, metric history). Every file holds whole
tensors, with or without FSDP (the trainers gather a sharded model's weights and optimizer state
first: `training.Processes`), so one format serves every way of running. Data order and sampling
are functions of (seed, step), so the step is the whole position: resuming replays nothing and
skips nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

_PREFIX = "step-"


def checkpoint_dirs(root: str | Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first (a crash mid-write leaves no `state.json`)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(_PREFIX) and (p / "state.json").exists()]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX):]))


def latest_checkpoint(root: str | Path) -> Path | None:
    dirs = checkpoint_dirs(root)
    return dirs[-1] if dirs else None


def hash_of(*parts: Any) -> str:
    """A short stable digest of JSON-able parts."""
    text = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def save_checkpoint(
    root: str | Path,
    step: int,
    *,
    model: torch.nn.Module,
    tokenizer: Any,
    optimizer_state: dict[str, Any],
    scheduler: Any,
    state: dict[str, Any],
    extra: dict[str, torch.Tensor] | None = None,
    keep: int = 2,
    model_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write checkpoint `step` under `root` (rename of a finished staging dir), keep the last `keep`.

    `model_state`: the full weights of `model` when its own parameters are shards (FSDP);
    `optimizer_state`: `Processes.optimizer_state`. The main process calls this."""
    root = Path(root)
    final = root / f"{_PREFIX}{step}"
    staging = root / f".{_PREFIX}{step}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    model.save_pretrained(str(staging / "model"), state_dict=model_state, safe_serialization=True)
    tokenizer.save_pretrained(str(staging / "model"))
    torch.save(optimizer_state, staging / "optimizer.pt")
    if scheduler is not None:
        torch.save(scheduler.state_dict(), staging / "scheduler.pt")
    if extra:
        torch.save(extra, staging / "extra.pt")
    torch.save({"torch": torch.get_rng_state()}, staging / "rng.pt")
    # state.json last: its presence marks the checkpoint complete.
    (staging / "state.json").write_text(json.dumps({"step": step, **state}, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    for old in checkpoint_dirs(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_state(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / "state.json").read_text())


def load_extra(path: str | Path) -> dict[str, torch.Tensor]:
    """The extra tensors of a checkpoint (e.g. the value head), {} when it has none."""
    extra = Path(path) / "extra.pt"
    return torch.load(extra, map_location="cpu", weights_only=True) if extra.exists() else {}


def load_training_state(path: str | Path, scheduler: Any | None = None) -> dict[str, Any]:
    """Restore the scheduler and the RNG from a checkpoint; return its optimizer state (for
    `Processes.load_optimizer_state`)."""
    path = Path(path)
    if scheduler is not None and (path / "scheduler.pt").exists():
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng = torch.load(path / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    return torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)


class CheckpointMismatchError(ValueError):
    """A checkpoint found in the output directory was written by a run with other settings."""


def run_settings(section: Any, *, ignore: set[str], **extra: Any) -> dict[str, Any]:
    """What a checkpoint must agree on to be resumed: a config section's fields (less `ignore`, the
    ones that change no computation, such as intervals and lengths of the run) and `extra` facts
    (the starting model, a `hash_of` the data). JSON values, so it compares with `state.json`."""
    settings = {**section.model_dump(mode="json", exclude=ignore), **extra}
    return json.loads(json.dumps(settings, sort_keys=True, default=str))


def resumable_checkpoint(root: str | Path, settings: dict[str, Any], prefix: str) -> Path | None:
    """The latest checkpoint under `root` to resume from, or None to start fresh.

    Refuses one written with other settings: its weights, optimizer and position belong to another
    run, and continuing from them would mix two runs without a word. Checkpoints older than this
    check carry no settings and are accepted."""
    checkpoint = latest_checkpoint(root)
    saved = load_state(checkpoint).get("settings") if checkpoint is not None else None
    if saved is None:
        return checkpoint
    changed = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
    if changed:
        details = ", ".join(f"{prefix}{k}: {saved.get(k)!r} -> {settings.get(k)!r}" for k in changed)
        raise CheckpointMismatchError(
            f"the checkpoint {checkpoint} was written by a run with other settings ({details}); "
            f"delete {Path(root)} (or use another output directory) to start over, "
            "or restore those settings to resume it"
        )
    return checkpoint
