"""The canonical item frame: its columns, the pandera schemas that check it, and what reads it.

Every loader ends in this frame and every later stage starts from it:

    column     dtype             content
    id         string[pyarrow]   unique, non-empty item id (from the file, else a content hash)
    prompt     string[pyarrow]   the task text; for chat data the last user message's content
    messages   object            the chat (list of {"role", "content", ...}) for OpenAI data, else None
    reference  string[pyarrow]   the final answer, non-empty
    solution   object            the worked solution (str) or None; None rather than NaN so that
                                 `if row.solution:` and `is None` both mean what they say
    <extra>    object            every original field of the record, JSON-native, None when absent

`row_checks_schema` and `uniqueness_schema` judge candidate rows before they become items (every
cell an object, so one bad value is one failure case with its row, never a dtype failure of a whole
column); `ITEMS_SCHEMA` is the contract of the finished frame. `item_dict` is what graders see as
`item`, `frame_digest` the content hash stages cache on, `write_items`/`read_items` its Parquet form.
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pandera.pandas as pa
import pyarrow as pa_arrow
import pyarrow.parquet as pq

from rft_core.graders.numeric import extract_number
from rft_core.text import invisible_names, is_blank, is_invisible  # noqa: F401  (re-exported)

STRING = pd.StringDtype("pyarrow")
CANONICAL_COLUMNS = ("id", "prompt", "messages", "reference", "solution")
# Graders never see these: the chat is the prompt itself, tools are the model's, not the item's.
NOT_FOR_GRADERS = ("messages", "tools")
_ITEMS_METADATA_KEY = b"rft.items"


class DataError(ValueError):
    """A data file that cannot be used at all (missing, empty, not data); the message names it.

    `setting` names the configuration that fixes it when there is one (`data.format`,
    `data.columns`), so that a command can point at its own option for it.
    """

    def __init__(self, message: str, *, setting: str | None = None) -> None:
        super().__init__(message)
        self.setting = setting


@dataclass(frozen=True)
class Problem:
    """One reason why one row of a file is not a valid item.

    `line` is the physical line (JSONL, CSV; JSON arrays: where the item starts), `index` the
    position of the item in a JSON array or a Parquet file (None for JSONL and CSV), `field` the
    field as the file names it (None when the row as a whole is bad), `raw` the row's raw text or
    record.
    """

    file: str
    line: int | None
    field: str | None
    reason: str
    raw: str | dict | None = None
    index: int | None = None

    @property
    def where(self) -> str:
        """`line 7`, `item 3 (line 12)`, `row 5`: how a person finds the row."""
        if self.index is not None and self.line is not None:
            return f"item {self.index} (line {self.line})"
        if self.index is not None:
            return f"row {self.index}"
        return f"line {self.line}" if self.line is not None else "file"

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "line": self.line, "index": self.index, "field": self.field,
                "reason": self.reason}

    def __str__(self) -> str:
        field = f" {self.field}:" if self.field else ""
        return f"{self.file}, {self.where}:{field} {self.reason}"


# --------------------------------------------------------------------------- element checks


def is_text(value: Any) -> bool:
    return isinstance(value, str)


# is_invisible, is_blank, invisible_names: in rft_core.text (the served model checks prompts with them).


def is_not_blank(value: Any) -> bool:
    # Non-text values pass here: the text check already reports them, once.
    return not isinstance(value, str) or not is_blank(value)


def has_numeric_answer(value: Any) -> bool:
    return not isinstance(value, str) or extract_number(value) is not None


MUST_BE_TEXT = "must be text"
IS_EMPTY = "is empty"
NO_NUMERIC_ANSWER = "has no numeric final answer"
IS_LIST = "must be a list of messages"


def _text_checks() -> list[pa.Check]:
    return [
        pa.Check(is_text, element_wise=True, error=MUST_BE_TEXT),
        pa.Check(is_not_blank, element_wise=True, error=IS_EMPTY),
    ]


def row_checks_schema(numeric: bool) -> pa.DataFrameSchema:
    """Field rules of candidate rows: id, prompt and reference are non-empty text, solution is
    text or missing, and (when the grader compares numbers) the reference holds a number."""
    reference_checks = _text_checks()
    if numeric:
        reference_checks.append(pa.Check(has_numeric_answer, element_wise=True, error=NO_NUMERIC_ANSWER))
    return pa.DataFrameSchema(
        {
            "id": pa.Column(object, nullable=False, checks=_text_checks()),
            "prompt": pa.Column(object, nullable=False, checks=_text_checks()),
            "reference": pa.Column(object, nullable=False, checks=reference_checks),
            "solution": pa.Column(
                object, nullable=True, checks=[pa.Check(is_text, element_wise=True, error=MUST_BE_TEXT)]
            ),
        },
        strict=False,
        coerce=False,
        name="candidate rows",
    )


def uniqueness_schema(column: str) -> pa.DataFrameSchema:
    """One column's values are unique; every repeat after the first is a failure case."""
    return pa.DataFrameSchema(
        {column: pa.Column(object, unique=True, report_duplicates="exclude_first")},
        strict=False,
        name=f"unique {column}",
    )


ITEMS_SCHEMA = pa.DataFrameSchema(
    {
        "id": pa.Column(STRING, unique=True, checks=pa.Check(is_not_blank, element_wise=True, error=IS_EMPTY)),
        "prompt": pa.Column(STRING, checks=pa.Check(is_not_blank, element_wise=True, error=IS_EMPTY)),
        "messages": pa.Column(
            object, nullable=True, checks=pa.Check(lambda v: isinstance(v, list), element_wise=True, error=IS_LIST)
        ),
        "reference": pa.Column(STRING, checks=pa.Check(is_not_blank, element_wise=True, error=IS_EMPTY)),
        "solution": pa.Column(
            object, nullable=True, checks=pa.Check(is_text, element_wise=True, error=MUST_BE_TEXT)
        ),
    },
    strict=False,
    name="items",
)


def validate_items(frame: pd.DataFrame, source: str = "items") -> pd.DataFrame:
    """Check the canonical frame's contract (all problems at once); DataError says what broke."""
    try:
        return ITEMS_SCHEMA.validate(frame, lazy=True)
    except pa.errors.SchemaErrors as exc:
        cases = exc.failure_cases
        lines = [
            f"{row.column}: {row.check} (index {row.index}, value {row.failure_case!r})"
            for row in cases.head(10).itertuples(index=False)
        ]
        more = f"\n... and {len(cases) - 10} more" if len(cases) > 10 else ""
        raise DataError(f"{source}: not a valid item frame:\n" + "\n".join(lines) + more) from None


# --------------------------------------------------------------------------- building, reading rows


def json_native(value: Any) -> Any:
    """`value` as plain JSON types: numpy scalars and arrays, NaN/NA, timestamps, bytes, decimals."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, np.integer)) and not isinstance(value, np.bool_):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, (float, np.floating)):
        return None if math.isnan(value) else float(value)
    if isinstance(value, Mapping):
        return {str(k): json_native(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [json_native(v) for v in value]
    if value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, (pd.Timestamp, dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return base64.b64encode(value).decode("ascii")
    return str(value)


def canonical_frame(rows: list[dict[str, Any]], extra_columns: list[str] | None = None) -> pd.DataFrame:
    """Build the canonical frame from item dicts (canonical keys plus extras), dtypes as documented.

    Extras missing from a row are None; `extra_columns` fixes their order (else first seen).
    """
    if extra_columns is None:
        seen: dict[str, None] = {}
        for row in rows:
            for key in row:
                if key not in CANONICAL_COLUMNS:
                    seen.setdefault(key, None)
        extra_columns = list(seen)
    data: dict[str, pd.Series] = {
        "id": pd.Series([row["id"] for row in rows], dtype=STRING),
        "prompt": pd.Series([row["prompt"] for row in rows], dtype=STRING),
        "messages": _object_series([row.get("messages") for row in rows]),
        "reference": pd.Series([row["reference"] for row in rows], dtype=STRING),
        "solution": _object_series([row.get("solution") or None for row in rows]),
    }
    for column in extra_columns:
        data[column] = _object_series([json_native(row.get(column)) for row in rows])
    return pd.DataFrame(data)


def _object_series(values: list[Any]) -> pd.Series:
    # Filled element by element so that list values stay one cell each, never a 2-D array.
    cells = np.empty(len(values), dtype=object)
    for i, value in enumerate(values):
        cells[i] = value
    return pd.Series(cells, dtype=object)


def extra_columns(frame: pd.DataFrame) -> list[str]:
    """The columns kept from the original records (everything but the canonical five)."""
    return [c for c in frame.columns if c not in CANONICAL_COLUMNS]


def item_dict(row: pd.Series | Mapping[str, Any]) -> dict[str, Any]:
    """What a grader sees as `item`: every column but messages/tools, JSON-native values.

    >>> item_dict({"id": "a1", "prompt": "2+2?", "messages": None, "reference": "4",
    ...            "solution": None, "answer": "#### 4"})
    {'id': 'a1', 'prompt': '2+2?', 'reference': '4', 'solution': None, 'answer': '#### 4'}
    """
    items = row.items() if isinstance(row, (pd.Series, Mapping)) else row._asdict().items()
    return {str(key): json_native(value) for key, value in items if key not in NOT_FOR_GRADERS}


def _row_fingerprint(row: tuple[Any, ...]) -> str:
    text = json.dumps([json_native(v) for v in row], ensure_ascii=False, separators=(",", ":"))
    # surrogatepass: a lone surrogate in a hand-built frame hashes instead of crashing.
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def frame_digest(frame: pd.DataFrame) -> str:
    """A short stable hash of the canonical columns, independent of row order.

    Extras are left out: they are grader inputs, not the items themselves. Row order is left out
    so that a reordered file is the same data (splits are order-independent too).
    """
    columns = [c for c in CANONICAL_COLUMNS if c in frame.columns]
    fingerprints = sorted(_row_fingerprint(row) for row in frame[columns].itertuples(index=False, name=None))
    digest = hashlib.sha256(("|".join(columns) + "\n" + "\n".join(fingerprints)).encode("ascii"))
    return digest.hexdigest()[:16]


def write_items(frame: pd.DataFrame, path: str | Path) -> Path:
    """Save the canonical frame as Parquet; `read_items` gives back an equal frame.

    Messages and extras are stored as JSON text (their shapes vary from row to row, which Arrow's
    typed columns cannot hold); the schema metadata says which columns to decode.
    """
    path = Path(path)
    validate_items(frame, source=str(path))
    odd_names = [repr(c) for c in frame.columns if not isinstance(c, str)]
    if odd_names:
        raise DataError(f"{path}: column names must be text, got {', '.join(odd_names[:5])}")
    json_columns = ["messages", *extra_columns(frame)]
    table_data: dict[str, pa_arrow.Array] = {}
    for column in frame.columns:
        values = frame[column].tolist()
        if column in json_columns:
            encoded = [None if v is None else _json_text(v) for v in values]
            table_data[column] = pa_arrow.array(encoded, type=pa_arrow.string())
        else:
            table_data[column] = pa_arrow.array(
                [None if (v is None or v is pd.NA) else str(v) for v in values], type=pa_arrow.string()
            )
    table = pa_arrow.table(table_data)
    meta = {"version": 1, "columns": list(frame.columns), "json_columns": json_columns}
    table = table.replace_schema_metadata({_ITEMS_METADATA_KEY: json.dumps(meta).encode("utf-8")})
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename: a reader (another flow run of the same config) never sees half a file.
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    pq.write_table(table, partial)
    os.replace(partial, path)
    return path


def _json_text(value: Any) -> str:
    text = json.dumps(json_native(value), ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: Arrow strings are UTF-8, JSON escapes keep it
        text = json.dumps(json_native(value))
    return text


def read_items(path: str | Path) -> pd.DataFrame:
    """Read a frame saved by `write_items` (DataError if the file is not one)."""
    path = Path(path)
    try:
        table = pq.read_table(path)
    except (OSError, pa_arrow.ArrowException, ValueError) as exc:
        raise DataError(f"{path}: not a readable Parquet file: {exc}") from None
    raw_meta = (table.schema.metadata or {}).get(_ITEMS_METADATA_KEY)
    if raw_meta is None:
        raise DataError(f"{path}: not an items file written by write_items (no {_ITEMS_METADATA_KEY.decode()} metadata)")
    try:
        meta = json.loads(raw_meta)
        columns = table.to_pydict()
        rows: list[dict[str, Any]] = []
        for i in range(table.num_rows):
            row = {}
            for column in meta["columns"]:
                value = columns[column][i]
                if column in meta["json_columns"] and value is not None:
                    value = json.loads(value)
                row[column] = value
            rows.append(row)
        extras = [c for c in meta["columns"] if c not in CANONICAL_COLUMNS]
        frame = canonical_frame(rows, extras)
    except (KeyError, IndexError, TypeError, ValueError, RecursionError, pa_arrow.ArrowException) as exc:
        # Metadata or cells that write_items would not have written: a damaged or foreign file.
        raise DataError(f"{path}: not a valid items file ({type(exc).__name__}: {exc})") from None
    return validate_items(frame, source=str(path))
