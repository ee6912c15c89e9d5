"""Tell a file's format: its container from the extension and the content, its record format from
the fields; then read its raw rows with the right reader.

The container (Parquet, CSV, JSON array, JSON lines) comes from the extension and the content
(Parquet's magic bytes, a leading `[` or `{`); forcing csv or parquet forces the container,
forcing a record format (openai, gsm8k, reft) leaves it to the extension and the content.
The record format of JSON comes from the fields most of the first records have. CSV and Parquet
files use `data.columns` when they have those columns, and otherwise the fields decide (a GSM8K
Parquet file has question/answer columns).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from rft_core.config import DataConfig
from rft_core.data.readers import (
    BOM,
    CSV_DELIMITERS,
    PARQUET_MAGIC,
    RawRow,
    binary_kind,
    csv_rows,
    json_array_rows,
    jsonl_rows,
    parquet_rows,
    printable,
    read_file,
)
from rft_core.data.records import FORMATS
from rft_core.data.schemas import DataError

JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
CSV_SUFFIXES = (".csv", ".tsv")
PARQUET_SUFFIXES = (".parquet", ".pq")


def record_format(records: list[dict[str, Any]]) -> str | None:
    """The record format most of the first records match (a few bad rows do not mislead it)."""
    votes: Counter[str] = Counter()
    for record in records[:50]:
        if "messages" in record:
            votes["openai"] += 1
        elif {"answer_cot", "answer_value", "item_id"} & record.keys():
            votes["reft"] += 1
        elif {"question", "answer"} <= record.keys():
            votes["gsm8k"] += 1
    return max(("openai", "reft", "gsm8k"), key=lambda name: votes[name]) if votes else None


def _format_from_fields(path: Path, records: list[dict[str, Any]]) -> str:
    found = record_format(records)
    if found is not None:
        return found
    keys = sorted({printable(k) for record in records[:50] for k in record})
    shown = repr(keys[:20])[:-1] + (f", ... {len(keys) - 20} more]" if len(keys) > 20 else "]")
    raise DataError(
        f"{path}: cannot tell the format from the fields {shown}: expected 'messages' (openai), "
        "'question' + 'answer' (gsm8k) or 'item_id'/'question'/'answer_cot'/'answer_value' (reft); "
        "set data.format (the format argument of load_items).",
        setting="data.format",
    )


def detect_format(path: str | Path, cfg: DataConfig | None = None) -> str:
    """The format `load_items` would read `path` as (one of FORMATS); DataError when unclear."""
    path = Path(path)
    return read_rows(path, read_file(path), None, cfg or DataConfig())[0]


def read_rows(path: Path, data: bytes, requested: str | None, cfg: DataConfig) -> tuple[str, list[RawRow]]:
    """The file's format (`requested`, else detected) and its raw rows."""
    container = _container(path, data, requested)
    if container in ("csv", "parquet"):
        if container == "parquet":
            columns, rows = parquet_rows(path)
        else:
            wanted = (cfg.columns.prompt, cfg.columns.reference)
            columns, rows = csv_rows(path, data, cfg.csv_delimiter, wanted)
        if not rows:
            raise DataError(f"{path}: the CSV file has a header but no rows")
        missing = _missing_columns(columns, cfg)
        if requested in (None, container) and not missing:
            return container, rows
        if requested is None:
            found = record_format([{name: None for name in columns}])
            if found is not None:
                return found, rows
        if requested in (None, container):
            raise _columns_error(path, missing, columns, container)
        return requested, rows
    rows = _json_rows(path, data, container)
    return requested or _format_from_fields(path, [r.record for r in rows if r.record is not None]), rows


def _container(path: Path, data: bytes, requested: str | None) -> str:
    """How the file is laid out: parquet, csv, json-array or json-lines."""
    suffix = path.suffix.lower()
    by_content = requested not in ("csv", "parquet")
    if requested == "parquet" or (by_content and (suffix in PARQUET_SUFFIXES or data.startswith(PARQUET_MAGIC))):
        return "parquet"
    kind = binary_kind(data)
    if kind:
        raise DataError(f"{path}: not a data file: it looks like {kind}")
    if requested == "csv" or (by_content and suffix in CSV_SUFFIXES):
        return "csv"
    first = _first_char(data)
    if requested is None and suffix not in JSON_SUFFIXES and first not in "[{":
        raise DataError(
            f"{path}: cannot tell the format from the extension '{printable(suffix)}' or the content; "
            f"set data.format (the format argument of load_items) to one of {', '.join(FORMATS)}.",
            setting="data.format",
        )
    return "json-array" if first == "[" else "json-lines"


def _first_char(data: bytes) -> str:
    stripped = data.removeprefix(BOM).lstrip()
    return chr(stripped[0]) if stripped else ""


def _json_rows(path: Path, data: bytes, container: str) -> list[RawRow]:
    rows = json_array_rows(path, data) if container == "json-array" else jsonl_rows(data)
    if not rows:
        raise DataError(f"{path}: no rows (the JSON array is empty)")
    if not any(r.record is not None for r in rows):
        first = rows[0].problems[0][1] if rows and rows[0].problems else "no rows"
        what = "item" if container == "json-array" else "line"
        raise DataError(f"{path}: not a data file: no {what} is a JSON object (first {what}: {first})")
    return rows


def _missing_columns(columns: list[str], cfg: DataConfig) -> list[str]:
    required = {"prompt": cfg.columns.prompt, "reference": cfg.columns.reference}
    if cfg.columns.id is not None:
        required["id"] = cfg.columns.id
    return [f"'{name}' (data.columns.{key})" for key, name in required.items() if name not in columns]


def _columns_error(path: Path, missing: list[str], columns: list[str], container: str) -> DataError:
    shown = ", ".join(printable(str(c)) for c in columns[:50]) + (f", ... {len(columns) - 50} more" if len(columns) > 50 else "")
    if container == "csv" and len(columns) == 1 and (split := [d for d in CSV_DELIMITERS if d in columns[0]]):
        # One column whose name holds a delimiter: the file is split by another character.
        return DataError(
            f"{path}: no column {', '.join(missing)}; the header is one column {shown!r}, which looks "
            f"{split[0]!r}-separated: set data.csv_delimiter to {split[0]!r} (or auto).",
            setting="data.csv_delimiter",
        )
    return DataError(
        f"{path}: no column {', '.join(missing)}; the file has columns: {shown}. "
        "Set data.columns.<key> to the file's column names.",
        setting="data.columns",
    )
