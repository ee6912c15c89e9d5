"""Training checkpoints: written atomically, verified before a resume, pruned to the last few.

A checkpoint directory holds `model/` (save_pretrained: the full model, or the LoRA adapter),
optional extra tensors (e.g. the value head), the optimizer state keyed by parameter name, the
scheduler state, `state.json` (step, data position, metric history) and the manifest of all of
them (`rft_core.integrity`: sizes and sha256, every file flushed to disk before the directory is
renamed into place). Every file holds whole tensors, with or without FSDP (the trainers gather a
sharded model's weights and optimizer state first: `training.Processes`), so one format serves
every way of running. Data order and sampling are functions of (seed, step), so the step is the
whole position: resuming replays nothing and skips nothing.

A resume takes the newest checkpoint that is whole (`resumable_checkpoint`): a damaged one (a file
cut short by a crash before it reached the disk, changed or deleted since) is skipped with a
warning that names it and what is wrong, for the one before it; with none left, training starts
from the beginning, again with a warning. Reading a checkpoint's files names the file in any error.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from rft_core.integrity import directory_problem, reading, writing_directory

_PREFIX = "step-"
_NAME = re.compile(r"^step-(\d+)$")

logger = logging.getLogger("rft.checkpoint")


def checkpoint_dirs(root: str | Path) -> list[Path]:
    """Published checkpoints under `root`, oldest first (whole or not: see `checkpoint_problem`).
    A crash mid-write leaves only a hidden staging directory, which is not listed."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _NAME.match(p.name) and p.is_dir()]
    return sorted(found, key=_step_of)


def _step_of(path: Path) -> int:
    return int(_NAME.match(path.name).group(1))


def checkpoint_problem(path: str | Path) -> str | None:
    """What is wrong with a checkpoint, in words, or None when it can be resumed from: every file
    as its manifest recorded it, and a readable `state.json` (the only check a checkpoint written
    before manifests gets besides its files' own headers)."""
    path = Path(path)
    if problem := directory_problem(path):
        return problem
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "state.json is missing"
    except (OSError, ValueError) as exc:
        return f"state.json is unreadable ({exc})"
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        return "state.json has no step"
    return None


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest checkpoint under `root` that is whole (`checkpoint_problem`), or None. Damaged
    ones on the way are skipped with a warning naming them."""
    for path in reversed(checkpoint_dirs(root)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        logger.warning("skipping the damaged checkpoint %s: %s", path, problem)
    return None


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
    """Write checkpoint `step` under `root` (`integrity.writing_directory`: a staging directory,
    hashed, flushed and renamed when complete), keep the last `keep`.

    `model_state`: the full weights of `model` when its own parameters are shards (FSDP);
    `optimizer_state`: `Processes.optimizer_state`. The main process calls this."""
    root = Path(root)
    final = root / f"{_PREFIX}{step}"
    with writing_directory(final) as staging:
        model.save_pretrained(str(staging / "model"), state_dict=model_state, safe_serialization=True)
        tokenizer.save_pretrained(str(staging / "model"))
        torch.save(optimizer_state, staging / "optimizer.pt")
        if scheduler is not None:
            torch.save(scheduler.state_dict(), staging / "scheduler.pt")
        if extra:
            torch.save(extra, staging / "extra.pt")
        torch.save({"torch": torch.get_rng_state()}, staging / "rng.pt")
        (staging / "state.json").write_text(json.dumps({"step": step, **state}, indent=1))
    prune_checkpoints(root, step, keep)
    return final


def prune_checkpoints(root: Path, step: int, keep: int) -> None:
    """After checkpoint `step` is written: keep the last `keep` up to it. Checkpoints past `step`
    are stale (the run went back to an earlier one because they were damaged) and go, as do
    staging directories that a crash left behind."""
    dirs = checkpoint_dirs(root)
    stale = [p for p in dirs if _step_of(p) > step]
    kept = [p for p in dirs if _step_of(p) <= step]
    leftovers = [p for p in root.iterdir() if p.name.startswith(f".{_PREFIX}") and p.name.endswith((".partial", ".old"))]
    for old in stale + kept[:-keep] + leftovers:
        shutil.rmtree(old, ignore_errors=True)


def load_state(path: str | Path) -> dict[str, Any]:
    state_file = Path(path) / "state.json"
    with reading(state_file, "checkpoint state"):
        return json.loads(state_file.read_text())


def load_extra(path: str | Path) -> dict[str, torch.Tensor]:
    """The extra tensors of a checkpoint (e.g. the value head), {} when it has none."""
    extra = Path(path) / "extra.pt"
    if not extra.exists():
        return {}
    with reading(extra, "checkpoint tensors"):
        return torch.load(extra, map_location="cpu", weights_only=True)


def load_training_state(path: str | Path, scheduler: Any | None = None) -> dict[str, Any]:
    """Restore the scheduler and the RNG from a checkpoint; return its optimizer state (for
    `Processes.load_optimizer_state`)."""
    path = Path(path)
    if scheduler is not None and (path / "scheduler.pt").exists():
        with reading(path / "scheduler.pt", "scheduler state"):
            scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    with reading(path / "rng.pt", "random state"):
        rng = torch.load(path / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    with reading(path / "optimizer.pt", "optimizer state"):
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
    """The checkpoint under `root` to resume from, or None to start fresh.

    The newest whole one (`latest_checkpoint`: damaged ones are skipped with a warning naming
    them); when every checkpoint is damaged, None with a warning that training starts over.
    Refuses one written with other settings: its weights, optimizer and position belong to another
    run, and continuing from them would mix two runs without a word. Checkpoints older than this
    check carry no settings and are accepted."""
    checkpoint = latest_checkpoint(root)
    if checkpoint is None:
        if checkpoint_dirs(root):
            logger.warning("no usable checkpoint in %s (every one is damaged): training starts from the beginning", root)
        return None
    saved = load_state(checkpoint).get("settings")
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
