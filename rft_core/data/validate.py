"""Validate a data file: load it, write its rejected rows aside, and report what was found.

The report is what `rft validate` prints and what the pipeline's `validate` stage logs: counts
that add up (`rows == valid + rejected`), every problem with its file, line, field and reason, and
where the rejects file went. Each line of the rejects file is one rejected row:
`{"file", "line", "index", "problems": [{"field", "reason"}...], "raw"}` plus `raw_base64` when the
row's bytes are not valid UTF-8, so nothing of the input is lost.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from rft_core.config import DataConfig
from rft_core.data.load import Reject, load_items
from rft_core.data.schemas import DataError, Problem
from rft_core.files import FileProblem, atomic_write, refuse_inputs, same_file

REJECTS_SUFFIX = ".rejects.jsonl"


@dataclass
class ValidationReport:
    """What validating one file found."""

    path: Path
    format: str
    rows: int
    valid: int
    rejected: int
    problems: list[Problem]
    rejects_path: Path | None
    frame: pd.DataFrame

    @property
    def ok(self) -> bool:
        return self.rejected == 0

    def reason_counts(self) -> dict[str, int]:
        """How often each kind of problem occurred (field + reason without its details)."""
        counts: Counter[str] = Counter()
        for p in self.problems:
            kind = p.reason.split(":")[0].split(" (")[0]
            counts[f"{p.field}: {kind}" if p.field else kind] += 1
        return dict(counts.most_common())

    def to_dict(self, max_problems: int | None = None) -> dict[str, Any]:
        """JSON-ready: file, format, counts, problems (all, or the first `max_problems`), rejects path."""
        shown = self.problems if max_problems is None else self.problems[:max_problems]
        return {
            "file": str(self.path),
            "format": self.format,
            "rows": self.rows,
            "valid": self.valid,
            "rejected": self.rejected,
            "problem_count": len(self.problems),
            "problem_kinds": self.reason_counts(),
            "problems": [
                {"line": p.line, "index": p.index, "field": p.field, "reason": p.reason} for p in shown
            ],
            "rejects_path": str(self.rejects_path) if self.rejects_path else None,
        }


def default_rejects_path(path: str | Path) -> Path:
    """`<file>.rejects.jsonl` beside the file, or in the working directory when that is read-only."""
    path = Path(path)
    beside = path.with_name(path.name + REJECTS_SUFFIX)
    if os.access(beside.parent, os.W_OK) and (not beside.exists() or os.access(beside, os.W_OK)):
        return beside
    return Path.cwd() / beside.name


def write_rejects(rejects: list[Reject], path: str | Path) -> Path:
    """One JSON line per rejected row, its raw text and every problem.

    Every line is strict JSON whatever the row held: NaN and infinities (a Parquet float column)
    are written as the strings "NaN", "Infinity", "-Infinity", and a lone surrogate as its
    `\\udXXX` escape (the file stays valid UTF-8).
    """
    path = Path(path)
    try:
        # Written whole or not at all: an interrupted run leaves the previous rejects file.
        # backslashreplace turns a lone surrogate inside a JSON string into its JSON escape.
        with atomic_write(path, encoding="utf-8", errors="backslashreplace", newline="\n") as out:
            for reject in rejects:
                out.write(_json_line(reject.to_dict()) + "\n")
    except FileProblem as exc:
        raise DataError(str(exc)) from None
    except OSError as exc:
        raise DataError(f"{path}: cannot write the rejects file: {exc.strerror or exc}") from None
    return path


def _refuse_inputs(rejects_path: str | Path, inputs: Mapping[str, str | Path | None]) -> None:
    try:
        refuse_inputs(rejects_path, inputs, what="rejects file")
    except FileProblem as exc:
        raise DataError(str(exc)) from None


def _json_line(record: dict[str, Any]) -> str:
    try:
        return json.dumps(record, ensure_ascii=False, allow_nan=False)
    except ValueError:  # a non-finite float somewhere in the raw record
        return json.dumps(_finite(record), ensure_ascii=False, allow_nan=False)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {key: _finite(inner) for key, inner in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(inner) for inner in value]
    return value


def validate_file(
    path: str | Path,
    cfg: DataConfig | None = None,
    *,
    rejects_path: str | Path | None = None,
    rejects_dir: str | Path | None = None,
    numeric: bool = False,
    format: str | None = None,
    inputs: Mapping[str, str | Path | None] | None = None,
) -> ValidationReport:
    """Load `path`, write its rejected rows, and report.

    Rejects go to `rejects_path` if given (written even when empty, so a caller who names it always
    finds it), else, when some row was rejected, to `<rejects_dir>/<file name>.rejects.jsonl` (the
    place of the caller's outputs: `rft validate` gives `<output_dir>/rejects`), or without
    `rejects_dir` to `default_rejects_path`. A clean file leaves no rejects file, and removes a
    stale one where it would have gone (it would describe other data).
    The rejects file is never the data file nor one of the caller's other `inputs`
    ({"config file": path, ...}): that is refused (DataError) before the file is read.
    Raises DataError when the file is unusable as a whole.
    """
    protected = {"data file": path, **(inputs or {})}
    if rejects_path is not None:
        _refuse_inputs(rejects_path, protected)
    result = load_items(path, cfg, format=format, numeric=numeric)
    if rejects_path is not None:
        written: Path | None = write_rejects(result.rejects, rejects_path)
    elif result.rejects:
        default = Path(rejects_dir) / (Path(path).name + REJECTS_SUFFIX) if rejects_dir else default_rejects_path(path)
        _refuse_inputs(default, protected)
        written = write_rejects(result.rejects, default)
    else:
        written = None
        # Only the file where this call writes is ours to clear (beside the data, or in
        # `rejects_dir`); a same-named one in the cwd may not be, and neither is an input of this call.
        where = Path(rejects_dir) if rejects_dir else Path(path).parent
        stale = where / (Path(path).name + REJECTS_SUFFIX)
        ours = not any(p is not None and same_file(stale, p) for p in protected.values())
        if ours and stale.is_file() and os.access(stale.parent, os.W_OK):
            stale.unlink(missing_ok=True)
    return ValidationReport(
        path=Path(path),
        format=result.format,
        rows=result.rows,
        valid=result.valid,
        rejected=result.rejected,
        problems=result.problems,
        rejects_path=written,
        frame=result.frame,
    )
