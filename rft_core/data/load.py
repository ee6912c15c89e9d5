"""Load a task file into the canonical item frame, every row judged: an item or a `Reject`.

Loading never crashes on a bad row and never drops one silently: a row that cannot become an item
is kept as a `Reject` with its raw text and every `Problem` (file, line, field, reason) that keeps it
out, so `rows == valid + rejected` always. Only a file that holds no data at all (missing, empty,
binary, no parseable row, a CSV without the configured columns) raises `DataError`.

A row is judged in three passes: what the reader and the record builder saw (malformed JSON, a
chat without a user message), the pandera field rules of `row_checks_schema` (non-empty text, a
number in the reference when asked), then duplicates among the rows still standing (prompt, id).

Where a problem points:
- JSONL and CSV: `line` is the physical line of the file, 1-based (a CSV header is line 1; a CSV
  record spanning lines points at its first line); `index` is None. Blank lines are skipped, not rows.
- JSON arrays: `line` is the line where the item starts and `index` its position in the array.
- Parquet: `line` is None and `index` is the row position (0-based).
`field` is the field as the file names it (`answer`, `question`, `messages`, a CSV column).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pandera.pandas as pa

from rft_core.config import DataConfig
from rft_core.data.detect import read_rows
from rft_core.data.readers import RawRow, json_type, printable, read_file
from rft_core.data.records import CANDIDATE_BUILDERS, FORMATS, Candidate, content_id, shown
from rft_core.data.schemas import (
    IS_EMPTY,
    MUST_BE_TEXT,
    NO_NUMERIC_ANSWER,
    DataError,
    Problem,
    canonical_frame,
    invisible_names,
    row_checks_schema,
    uniqueness_schema,
    validate_items,
)


@dataclass
class Reject:
    """A row left out of the clean set: where it was, every problem, and its raw text or record."""

    file: str
    line: int | None
    index: int | None
    problems: list[Problem]
    raw: str | dict | None
    raw_bytes: bytes | None = None  # the exact bytes, kept when they are not valid UTF-8

    def to_dict(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "file": self.file,
            "line": self.line,
            "index": self.index,
            "problems": [{"field": p.field, "reason": p.reason} for p in self.problems],
            "raw": self.raw,
        }
        if self.raw_bytes is not None:
            record["raw_base64"] = base64.b64encode(self.raw_bytes).decode("ascii")
        return record


@dataclass
class LoadResult:
    """The clean items of a file, and everything that was left out and why."""

    frame: pd.DataFrame
    problems: list[Problem]
    rows: int
    format: str
    path: Path
    rejects: list[Reject] = field(default_factory=list)

    @property
    def valid(self) -> int:
        return len(self.frame)

    @property
    def rejected(self) -> int:
        return len(self.rejects)


def load_items(
    path: str | Path,
    cfg: DataConfig | None = None,
    *,
    format: str | None = None,
    numeric: bool = False,
) -> LoadResult:
    """Read `path` into the canonical frame, every bad row reported and kept aside.

    `format` (else `cfg.format`) forces one of FORMATS; "auto"/None detects it. `numeric` requires
    a number in every reference (what a numeric grader needs); GSM8K answers always need one.
    Raises DataError only when the file as a whole is unusable.
    """
    cfg = cfg or DataConfig()
    path = Path(path)
    requested = format if format is not None else cfg.format
    if requested == "auto":
        requested = None
    if requested is not None and requested not in FORMATS:
        raise DataError(f"{path}: unknown format {requested!r}; use one of {', '.join(FORMATS)} or auto",
                        setting="data.format")
    fmt, rows = read_rows(path, read_file(path), requested, cfg)
    return _judge(path, fmt, rows, cfg, numeric)


def _judge(path: Path, fmt: str, rows: list[RawRow], cfg: DataConfig, numeric: bool) -> LoadResult:
    """Turn raw rows into items: structural problems, pandera field rules, then duplicates."""
    build = CANDIDATE_BUILDERS[fmt]
    candidates: dict[int, Candidate] = {}
    # Problems per row position, keyed by canonical column so one field is never reported twice.
    found: dict[int, dict[str | None, list[tuple[str | None, str]]]] = {}

    def report(pos: int, column: str | None, field_name: str | None, reason: str) -> None:
        found.setdefault(pos, {}).setdefault(column, []).append((field_name, reason))

    for pos, row in enumerate(rows):
        for field_name, reason in row.problems:
            report(pos, f"@{field_name}", field_name, reason)
        if row.record is not None:
            cand = build(row.record, cfg)
            for column, field_name, reason in cand.problems:
                report(pos, column, field_name, reason)
            if not cand.id_given:
                cand.values["id"] = content_id(cand.prompt_key) if cand.prompt_key else f"row-{pos}"
            candidates[pos] = cand

    if candidates:
        # Text that is not valid Unicode (only in rows the reader already faulted) is escaped for
        # pandera: its failure cases become an Arrow string series, which cannot hold a lone surrogate.
        table = pd.DataFrame(
            {col: pd.Series([_escaped(c.values[col]) if rows[pos].problems else c.values[col]
                             for pos, c in candidates.items()], index=list(candidates), dtype=object)
             for col in ("id", "prompt", "reference", "solution")}
        )
        # GSM8K references come out of the answer parser already numeric.
        for pos, column, check, value in _failures(row_checks_schema(numeric and fmt != "gsm8k"), table):
            source = candidates[pos].sources[column]
            if column in found.get(pos, {}) or f"@{source}" in found.get(pos, {}):
                continue  # that field's problem is already said (unreadable text, a missing column)
            report(pos, column, source, _reason(check, value))

        # Duplicates are judged among rows that are otherwise fine, so a bad first copy does not
        # take a good second one down with it.
        survivors = [pos for pos in candidates if pos not in found]
        keys = pd.DataFrame(
            {"_prompt_key": pd.Series([candidates[p].prompt_key for p in survivors], index=survivors, dtype=object)}
        )
        first_line: dict[str, int] = {}
        for pos in survivors:
            first_line.setdefault(candidates[pos].prompt_key, pos)
        for pos, _, _, value in _failures(uniqueness_schema("_prompt_key"), keys):
            first = rows[first_line[value]]
            report(pos, "prompt", candidates[pos].sources["prompt"], f"duplicate prompt (first at {_where(first)})")
        survivors = [pos for pos in survivors if pos not in found]
        ids = pd.DataFrame({"id": pd.Series([candidates[p].values["id"] for p in survivors], index=survivors, dtype=object)})
        first_id: dict[str, int] = {}
        for pos in survivors:
            first_id.setdefault(candidates[pos].values["id"], pos)
        for pos, _, _, value in _failures(uniqueness_schema("id"), ids):
            report(pos, "id", candidates[pos].sources["id"], f"duplicate id {shown(value)} (first at {_where(rows[first_id[value]])})")

    file = str(path)
    problems: list[Problem] = []
    rejects: list[Reject] = []
    items: list[dict[str, Any]] = []
    for pos, row in enumerate(rows):
        if pos in found:
            # Field names and reasons quote the file: escaped so that they print and write as UTF-8.
            row_problems = [
                Problem(file=file, line=row.line, field=None if field_name is None else printable(field_name),
                        reason=printable(reason), raw=row.raw, index=row.index)
                for per_column in found[pos].values()
                for field_name, reason in per_column
            ]
            problems.extend(row_problems)
            rejects.append(Reject(file=file, line=row.line, index=row.index, problems=row_problems,
                                  raw=row.raw, raw_bytes=row.raw_bytes))
        else:
            cand = candidates[pos]
            items.append({**cand.values, **cand.extras})
    frame = validate_items(canonical_frame(items), source=file)
    result = LoadResult(frame=frame, problems=problems, rows=len(rows), format=fmt, path=path, rejects=rejects)
    assert result.valid + result.rejected == result.rows, "every row is either an item or a reject"
    return result


def _failures(schema: pa.DataFrameSchema, table: pd.DataFrame) -> list[tuple[int, str, str, Any]]:
    """(row position, column, check, value) of every failure of a lazy validation."""
    if table.empty:
        return []
    try:
        schema.validate(table, lazy=True)
    except pa.errors.SchemaErrors as exc:
        cases = exc.failure_cases
        if cases["index"].isna().any():
            # Row-less failures would mean a column is missing: the table is built here, so a bug.
            raise RuntimeError(f"unexpected column-level schema failure:\n{cases}") from None
        return [(int(r.index), str(r.column), str(r.check), r.failure_case) for r in cases.itertuples(index=False)]
    return []


def _escaped(value: Any) -> Any:
    return printable(value) if isinstance(value, str) else value


def _reason(check: str, value: Any) -> str:
    if check == "not_nullable":
        return "missing"
    if check == MUST_BE_TEXT:
        return f"{MUST_BE_TEXT}, got {json_type(value)}"
    if check == IS_EMPTY and isinstance(value, str) and value.strip():
        return f"{IS_EMPTY}: only invisible characters ({invisible_names(value)})"
    if check == NO_NUMERIC_ANSWER:
        return f"{NO_NUMERIC_ANSWER}: {shown(value)} (numeric=False accepts it when the grader compares text)"
    return check


def _where(row: RawRow) -> str:
    if row.index is not None and row.line is not None:
        return f"item {row.index} (line {row.line})"
    if row.index is not None:
        return f"row {row.index}"
    return f"line {row.line}"
