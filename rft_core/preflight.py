"""What can be checked before the first stage runs.

`preflight(cfg)` finds every problem of a config that needs no training to find: data files that
are missing or not files, a grader spec that is invalid or cannot be read, a local model directory
that does not hold a model, an output directory that cannot be written, a `compute` section that
cannot run (Ray missing, a Ray cluster that cannot be reached, settings that do not split over the
processes: `rft_core.compute.problems`). The pipeline calls it
before its first stage and `rft run` before it starts anything, so a mistake costs seconds, not
a training run. (Field values, `inf` and registry names are refused when the config loads; what
needs the data read, such as worked solutions for SFT, is checked by the validate and split
stages, the first two.)
"""

from __future__ import annotations

import os
from pathlib import Path

from rft_core import compute
from rft_core.config import ConfigError, RFTConfig


def preflight(cfg: RFTConfig) -> list[str]:
    """Every problem found in `cfg` without training, one line each (empty: none found)."""
    problems: list[str] = []
    for what, path in (("data file (data.train_path)", cfg.data.train_path),
                       ("validation file (data.val_path)", cfg.data.val_path)):
        if path is not None and (problem := _file_problem(path, what)):
            problems.append(problem)
    problems += _grader_problems(cfg)
    problems += _model_problems(cfg)
    problems += compute.problems(cfg)  # Ray installed where needed, the cluster reachable (by address)
    out = Path(cfg.output_dir)
    existing = next((p for p in (out, *out.resolve().parents) if p.exists()), None)
    if existing is not None and (not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK)):
        problems.append(f"output_dir: {out} cannot be created or written ({existing} is not a writable directory)")
    return problems


def check(cfg: RFTConfig) -> None:
    """Raise `ConfigError` listing every `preflight` problem of `cfg`."""
    problems = preflight(cfg)
    if problems:
        raise ConfigError("; ".join(problems))


def _file_problem(path: str | Path, what: str) -> str | None:
    """Why `path` cannot be read as a file (`files.check_readable`'s one line), or None."""
    from rft_core.files import FileProblem, check_readable

    try:
        check_readable(path, what)
    except FileProblem as exc:
        return str(exc)
    return None


def _grader_problems(cfg: RFTConfig) -> list[str]:
    from rft_core.graders import validate_grader_spec

    if cfg.grader.file is not None and (problem := _file_problem(cfg.grader.file, "grader file (grader.file)")):
        return [problem]
    try:
        spec = cfg.grader.resolved_spec()
    except Exception as exc:  # an unreadable or unparsable grader file: its reader's own words
        return [f"grader: {exc}"]
    where = f"grader.file {cfg.grader.file}" if cfg.grader.file else "grader.spec"
    return [f"{where}: {problem}" for problem in validate_grader_spec(spec)]


def _model_problems(cfg: RFTConfig) -> list[str]:
    """A local directory named as the model must hold one; a hub id is checked when it loads."""
    name = cfg.model.name_or_path
    if name == "tiny":
        return []
    problem = model_path_problem(name, "model.name_or_path")
    return [problem] if problem else []


def model_path_problem(name: str, setting: str) -> str | None:
    """Why `name`, when it names a local directory, holds no saved model (None: it does, or it is a
    hub id, checked when it loads). A name is local when it is absolute, starts with `.` or `~`,
    exists, or has more than one `/` (a hub id is `org/name`)."""
    path = Path(name).expanduser()
    looks_local = path.is_absolute() or name.startswith((".", "~")) or path.exists() or name.count("/") > 1
    if not looks_local:
        return None
    if not path.is_dir():
        return f"{setting}: {name} is not a directory (a local model is a directory with config.json)"
    if not (path / "config.json").is_file():
        return f"{setting}: {name} has no config.json (not a saved model directory)"
    return None
