"""Read a task file into the canonical item frame: OpenAI RFT chat JSONL, GSM8K JSONL, ReFT JSON,
CSV and Parquet, the format detected from the extension and the fields (or forced).

Loading never crashes on a bad row and never drops one silently: a row that cannot become an item
is kept as a `Reject` with its raw text and every `Problem` (file, line, field, reason) that keeps it
out, so `rows == valid + rejected` always. Only a file that holds no data at all (missing, empty,
binary, no parseable row, a CSV without the configured columns) raises `DataError`.

Where a problem points:
- JSONL and CSV: `line` is the physical line of the file, 1-based (a CSV header is line 1; a CSV
  record spanning lines points at its first line); `index` is None. Blank lines are skipped, not rows.
- JSON arrays: `line` is the line where the item starts and `index` its position in the array.
- Parquet: `line` is None and `index` is the row position (0-based).
`field` is the field as the file names it (`answer`, `question`, `messages`, a CSV column).

Field rules per format:
- openai: `messages` (last one from the user: its content is the prompt); the reference is the field
  `columns.reference` names if present, else the first of `OPENAI_REFERENCE_FIELDS`; `id` and
  `columns.solution` are used when present. Every key but messages/tools stays for graders.
- gsm8k: `question`; `answer` must end in `#### <number>`: the number is the reference, the text
  before it the solution (None when there is none), calculator annotations `<<48/2=24>>` removed
  when `strip_calculator_annotations`.
- reft: `item_id`, `question`, `answer_value` (reference), `answer_cot` (solution).
- csv / parquet: the columns `DataConfig.columns` names. A CSV or Parquet file without them is read
  by the record rules its columns match (a GSM8K Parquet file has question/answer columns).
Ids given as numbers become text; items without an id get a hash of their prompt.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pandera.pandas as pa

from rft_core.config import DataConfig
from rft_core.data.schemas import (
    CANONICAL_COLUMNS,
    IS_EMPTY,
    MUST_BE_TEXT,
    NO_NUMERIC_ANSWER,
    DataError,
    Problem,
    canonical_frame,
    json_native,
    row_checks_schema,
    uniqueness_schema,
    validate_items,
)
from rft_core.graders.numeric import parse_number

FORMATS = ("openai", "gsm8k", "reft", "csv", "parquet")
OPENAI_REFERENCE_FIELDS = ("reference_answer", "answer", "correct_answer", "label", "ground_truth", "reference")
JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
CSV_SUFFIXES = (".csv", ".tsv")
PARQUET_SUFFIXES = (".parquet", ".pq")

_BOM = b"\xef\xbb\xbf"
_PARQUET_MAGIC = b"PAR1"
_BINARY_MAGIC = {
    b"\x89PNG": "a PNG image",
    b"\xff\xd8\xff": "a JPEG image",
    b"GIF8": "a GIF image",
    b"%PDF": "a PDF document",
    b"PK\x03\x04": "a ZIP archive (xlsx, docx, zip)",
    b"\x1f\x8b": "a gzip archive",
    b"\xff\xfe": "UTF-16 text (save it as UTF-8)",
    b"\xfe\xff": "UTF-16 text (save it as UTF-8)",
}
_CALCULATOR_ANNOTATION = re.compile(r"<<[^<>\n]*>>")
_GSM8K_FINAL = re.compile(r"####[ \t]*(?P<value>[^\n]*?)\s*$")


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


# --------------------------------------------------------------------------- raw rows of a file


@dataclass
class _Row:
    """One row as read from the file, before it is judged."""

    line: int | None
    index: int | None
    raw: str | dict | None
    record: dict[str, Any] | None = None
    problems: list[tuple[str | None, str]] = field(default_factory=list)  # (field, reason)
    raw_bytes: bytes | None = None


def _read_file(path: Path) -> bytes:
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, not a data file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot be read: {exc.strerror or exc}") from None
    if not data.removeprefix(_BOM).strip():
        raise DataError(f"{path}: the file is empty")
    return data


def _binary_kind(data: bytes) -> str | None:
    for magic, kind in _BINARY_MAGIC.items():
        if data.startswith(magic):
            return kind
    if b"\x00" in data[:8192]:
        return "a binary file"
    return None


def _json_type(value: Any) -> str:
    """JSON's name for the type of a value, as a user reading their file would say it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _fields_with_bad_bytes(record: dict[str, Any]) -> list[str]:
    """Top-level keys whose value holds undecodable bytes (kept as lone surrogates)."""

    def bad(value: Any) -> bool:
        if isinstance(value, str):
            return any("\udc80" <= ch <= "\udcff" for ch in value)
        if isinstance(value, dict):
            return any(bad(k) or bad(v) for k, v in value.items())
        if isinstance(value, list):
            return any(bad(v) for v in value)
        return False

    return [key for key, value in record.items() if bad(key) or bad(value)]


def _decode(raw: bytes) -> tuple[str, str | None]:
    """Text of `raw` and, when it is not valid UTF-8, the reason (the bytes survive as surrogates)."""
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        bad = raw[exc.start : exc.start + 1].hex()
        return raw.decode("utf-8", "surrogateescape"), f"invalid UTF-8 (byte 0x{bad} at offset {exc.start})"


def _judge_record(row: _Row, value: Any, utf8_error: str | None) -> None:
    if not isinstance(value, dict):
        row.problems.append((None, f"not a JSON object (got {_json_type(value)})"))
        return
    row.record = value
    if utf8_error:
        fields = _fields_with_bad_bytes(value) or [None]
        row.problems.extend((name, utf8_error) for name in fields)


def _jsonl_rows(path: Path, data: bytes) -> list[_Row]:
    rows = []
    for number, raw_line in enumerate(data.removeprefix(_BOM).split(b"\n"), start=1):
        raw_line = raw_line.rstrip(b"\r")
        if not raw_line.strip():
            continue
        text, utf8_error = _decode(raw_line)
        row = _Row(line=number, index=None, raw=_printable(raw_line) if utf8_error else text,
                   raw_bytes=raw_line if utf8_error else None)
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            row.problems.append((None, utf8_error or f"malformed JSON: {exc.msg} (column {exc.colno})"))
        else:
            _judge_record(row, value, utf8_error)
        rows.append(row)
    return rows


def _json_array_rows(path: Path, data: bytes) -> list[_Row]:
    """Items of a JSON array, one by one, so that one malformed item costs only itself.

    After a malformed item, reading resumes at the next line that opens an object at the same
    indentation as the bad one (how pretty-printed arrays are laid out); if there is none, the rest
    of the file is one rejected row, its text kept.
    """
    body = data.removeprefix(_BOM)
    text, utf8_error = _decode(body)
    decoder = json.JSONDecoder()
    pos = _skip_ws(text, 0)
    if pos >= len(text) or text[pos] != "[":
        raise DataError(f"{path}: not a JSON array")
    pos += 1
    rows: list[_Row] = []
    while True:
        pos = _skip_ws(text, pos)
        # A missing closing ']' loses nothing (every item before it was read), so it is let pass.
        if pos >= len(text) or text[pos] == "]":
            break
        line = _line_of(text, pos)
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            resume = _resume_point(text, pos)
            raw = (text[pos:resume] if resume is not None else text[pos:]).rstrip().rstrip(",")
            rows.append(_Row(line=line, index=len(rows), raw=_printable(raw.encode("utf-8", "surrogateescape")),
                             problems=[(None, f"malformed JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})")]))
            if resume is None:
                break
            pos = resume
            continue
        raw = text[pos:end]
        item_error = None
        if utf8_error and any("\udc80" <= ch <= "\udcff" for ch in raw):
            item_error = "invalid UTF-8 bytes"
        raw_bytes = raw.encode("utf-8", "surrogateescape") if item_error else None
        row = _Row(line=line, index=len(rows), raw=_printable(raw_bytes) if raw_bytes else raw, raw_bytes=raw_bytes)
        _judge_record(row, value, item_error)
        rows.append(row)
        pos = _skip_ws(text, end)
        if pos < len(text) and text[pos] == ",":
            pos += 1
        elif pos < len(text) and text[pos] != "]":
            # Two items without a comma between them: the item before the gap is the one reported.
            rows[-1].problems.append((None, "malformed JSON: missing ',' after this item"))
    return rows


def _printable(raw: bytes) -> str:
    """Raw bytes as text for reports: undecodable bytes shown as \\xNN (exact bytes kept apart)."""
    return raw.decode("utf-8", "backslashreplace")


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _resume_point(text: str, pos: int) -> int | None:
    line_start = text.rfind("\n", 0, pos) + 1
    indent = text[line_start:pos]
    if indent.strip():
        indent = ""
    match = re.compile(r"\n" + re.escape(indent) + r"\{").search(text, pos)
    return match.start() + 1 + len(indent) if match else None


def _csv_rows(path: Path, data: bytes) -> tuple[list[str], list[_Row]]:
    """Records of a CSV (TSV for .tsv) file, keyed by the header, with their physical lines."""
    text, _ = _decode(data.removeprefix(_BOM))
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    physical: list[str] = []

    def lines():
        for line in io.StringIO(text, newline=""):
            physical.append(line)
            yield line

    reader = csv.reader(lines(), delimiter=delimiter)
    header: list[str] | None = None
    rows: list[_Row] = []
    start = 1
    try:
        for cells in reader:
            end = reader.line_num
            if not cells or (len(cells) == 1 and not cells[0].strip()):
                start = end + 1
                continue
            raw_text = "".join(physical[start - 1 : end]).rstrip("\r\n")
            if header is None:
                header = [h.strip() for h in cells]
                duplicates = [name for name, n in Counter(header).items() if n > 1]
                if duplicates:
                    raise DataError(f"{path}: duplicate column names in the header: {', '.join(duplicates)}")
                start = end + 1
                continue
            raw_bytes = raw_text.encode("utf-8", "surrogateescape")
            row = _Row(line=start, index=None, raw=raw_bytes.decode("utf-8", "backslashreplace"))
            if len(cells) != len(header):
                row.problems.append((None, f"row has {len(cells)} fields, the header has {len(header)}"))
            record = dict(zip(header, cells, strict=False))
            row.record = record
            bad_fields = _fields_with_bad_bytes(record)
            if bad_fields:
                row.raw_bytes = raw_bytes
                row.problems.extend((name, "invalid UTF-8 bytes") for name in bad_fields)
            rows.append(row)
            start = end + 1
    except csv.Error as exc:
        raise DataError(f"{path}: not readable as CSV near line {reader.line_num}: {exc}") from None
    if header is None:
        raise DataError(f"{path}: the file is empty")
    return header, rows


def _missing_columns(columns: list[str], cfg: DataConfig) -> list[str]:
    required = {"prompt": cfg.columns.prompt, "reference": cfg.columns.reference}
    if cfg.columns.id is not None:
        required["id"] = cfg.columns.id
    return [f"'{name}' (data.columns.{key})" for key, name in required.items() if name not in columns]


def _columns_error(path: Path, missing: list[str], columns: list[str]) -> DataError:
    return DataError(
        f"{path}: no column {', '.join(missing)}; the file has columns: {', '.join(map(str, columns))}. "
        "Set data.columns.<key> to the file's column names."
    )


def _parquet_rows(path: Path) -> tuple[list[str], list[_Row]]:
    import pyarrow as pa_arrow
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, pa_arrow.ArrowException) as exc:
        raise DataError(f"{path}: not a readable Parquet file: {exc}") from None
    if table.num_rows == 0:
        raise DataError(f"{path}: the Parquet file has no rows")
    rows = [
        _Row(line=None, index=i, raw=json_native(record), record=record)
        for i, record in enumerate(table.to_pylist())
    ]
    return table.column_names, rows


# --------------------------------------------------------------------------- format detection


def _record_format(records: list[dict[str, Any]]) -> str | None:
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
    found = _record_format(records)
    if found is not None:
        return found
    keys = sorted({k for record in records[:50] for k in record})
    raise DataError(
        f"{path}: cannot tell the format from the fields {keys}: expected 'messages' (openai), "
        "'question' + 'answer' (gsm8k) or 'item_id'/'question'/'answer_cot'/'answer_value' (reft); "
        "pass --format (data.format)"
    )


def _first_char(data: bytes) -> str:
    stripped = data.removeprefix(_BOM).lstrip()
    return chr(stripped[0]) if stripped else ""


def detect_format(path: str | Path, cfg: DataConfig | None = None) -> str:
    """The format `load_items` would read `path` as (one of FORMATS); DataError when unclear."""
    path = Path(path)
    return _read_rows(path, _read_file(path), None, cfg or DataConfig())[0]


def _read_rows(path: Path, data: bytes, requested: str | None, cfg: DataConfig) -> tuple[str, list[_Row]]:
    """The file's format and its raw rows.

    The container (Parquet, CSV, JSON array, JSON lines) comes from the extension and the content;
    the record rules from `requested`, else: CSV and Parquet use `data.columns` when the file has
    those columns and otherwise the fields decide (a GSM8K Parquet file has question/answer), as
    they always do for JSON.
    """
    container = _container(path, data, requested)
    if container in ("csv", "parquet"):
        columns, rows = _parquet_rows(path) if container == "parquet" else _csv_rows(path, data)
        if not rows:
            raise DataError(f"{path}: the CSV file has a header but no rows")
        missing = _missing_columns(columns, cfg)
        if requested in (None, container) and not missing:
            return container, rows
        if requested is None:
            found = _record_format([{name: None for name in columns}])
            if found is not None:
                return found, rows
        if requested in (None, container):
            raise _columns_error(path, missing, columns)
        return requested, rows
    rows = _json_rows(path, data, container)
    return requested or _format_from_fields(path, [r.record for r in rows if r.record is not None]), rows


def _container(path: Path, data: bytes, requested: str | None) -> str:
    """How the file is laid out: parquet, csv, json-array or json-lines.

    Forcing csv or parquet forces the container; forcing a record format (openai, gsm8k, reft)
    leaves the container to the extension and the content.
    """
    suffix = path.suffix.lower()
    by_content = requested not in ("csv", "parquet")
    if requested == "parquet" or (by_content and (suffix in PARQUET_SUFFIXES or data.startswith(_PARQUET_MAGIC))):
        return "parquet"
    kind = _binary_kind(data)
    if kind:
        raise DataError(f"{path}: not a data file: it looks like {kind}")
    if requested == "csv" or (by_content and suffix in CSV_SUFFIXES):
        return "csv"
    first = _first_char(data)
    if requested is None and suffix not in JSON_SUFFIXES and first not in "[{":
        raise DataError(
            f"{path}: cannot tell the format from the extension '{suffix}' or the content; "
            f"pass --format (one of {', '.join(FORMATS)})"
        )
    return "json-array" if first == "[" else "json-lines"


def _json_rows(path: Path, data: bytes, container: str) -> list[_Row]:
    rows = _json_array_rows(path, data) if container == "json-array" else _jsonl_rows(path, data)
    if not rows:
        raise DataError(f"{path}: no rows (the JSON array is empty)")
    if not any(r.record is not None for r in rows):
        first = rows[0].problems[0][1] if rows and rows[0].problems else "no rows"
        what = "item" if container == "json-array" else "line"
        raise DataError(f"{path}: not a data file: no {what} is a JSON object (first {what}: {first})")
    return rows


# --------------------------------------------------------------------------- records -> candidate items


@dataclass
class _Candidate:
    """A record mapped onto the canonical columns, values not yet judged."""

    values: dict[str, Any]  # id, prompt, messages, reference, solution
    extras: dict[str, Any]
    sources: dict[str, str]  # canonical column -> the field name in the file
    prompt_key: str | None = None  # what "duplicate prompt" compares
    id_given: bool = False
    problems: list[tuple[str, str, str]] = field(default_factory=list)  # (column, field, reason)


def _as_id(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str):
        return value.strip()
    return value


def _as_reference(value: Any) -> Any:
    """Numbers are fine references (JSON and Parquet hold them as numbers); text is kept as is."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and value == value and value not in (float("inf"), float("-inf")):
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, str):
        return value.strip()
    return value


def _as_solution(value: Any) -> Any:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return value.strip() if isinstance(value, str) else value


def _extras(record: dict[str, Any], sources: dict[str, str], skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """Original fields for graders; one named like a canonical column it does not feed is kept
    as `original_<name>` so that it neither overwrites nor is overwritten by the canonical value."""
    extras = {}
    for key, value in record.items():
        if key in skip:
            continue
        if key in CANONICAL_COLUMNS:
            if sources.get(key) == key:
                continue
            extras[f"original_{key}"] = value
        else:
            extras[key] = value
    return extras


def _message_text(content: Any) -> str | None:
    """Text of a message's content: a string, or the text parts of a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [p.get("text") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
        return "\n".join(texts) if texts else None
    return None


def _openai_candidate(record: dict[str, Any], cfg: DataConfig) -> _Candidate:
    ref_field = cfg.columns.reference if cfg.columns.reference in record else next(
        (name for name in OPENAI_REFERENCE_FIELDS if name in record), None
    )
    sol_field = cfg.columns.solution if cfg.columns.solution and cfg.columns.solution in record else None
    sources = {"id": "id", "prompt": "messages", "messages": "messages",
               "reference": ref_field or "reference", "solution": sol_field or "solution"}
    cand = _Candidate(values={}, extras={}, sources=sources)
    messages = record.get("messages")
    prompt = None
    if messages is None:
        cand.problems.append(("prompt", "messages", "missing"))
    elif not isinstance(messages, list):
        cand.problems.append(("prompt", "messages", f"must be an array of messages, got {_json_type(messages)}"))
    elif not messages:
        cand.problems.append(("prompt", "messages", "is empty"))
    elif not all(isinstance(m, dict) for m in messages):
        bad = next(i for i, m in enumerate(messages) if not isinstance(m, dict))
        cand.problems.append(("prompt", "messages", f"message {bad} is not an object"))
    elif messages[-1].get("role") != "user":
        cand.problems.append(
            ("prompt", "messages", f"the last message is from {messages[-1].get('role')!r}; it must be from the user")
        )
    else:
        prompt = _message_text(messages[-1].get("content"))
        if prompt is None:
            cand.problems.append(("prompt", "messages", "the last user message has no text content"))
        elif not prompt.strip():
            cand.problems.append(("prompt", "messages", "the last user message is empty"))
    if ref_field is None:
        looked = [cfg.columns.reference, *[n for n in OPENAI_REFERENCE_FIELDS if n != cfg.columns.reference]]
        cand.problems.append(("reference", "reference", f"no reference field (looked for: {', '.join(looked)})"))
    cand.values = {
        "id": _as_id(record["id"]) if "id" in record else None,
        "prompt": prompt,
        "messages": messages if isinstance(messages, list) else None,
        "reference": _as_reference(record.get(ref_field)) if ref_field else None,
        "solution": _as_solution(record.get(sol_field)) if sol_field else None,
    }
    cand.id_given = "id" in record
    if isinstance(messages, list):
        cand.prompt_key = json.dumps(json_native(messages), sort_keys=True, ensure_ascii=False)
    cand.extras = _extras(record, sources, skip=("messages", "tools"))
    if "tools" in record:
        cand.extras["tools"] = record["tools"]
    return cand


def split_gsm8k_answer(answer: str, strip_annotations: bool = True) -> tuple[str | None, str | None, str | None]:
    """(solution, reference, reason) of a GSM8K answer; reason is None when it is well formed.

    >>> split_gsm8k_answer("Natalia sold 48/2 = <<48/2=24>>24 clips.\\n#### 24")
    ('Natalia sold 48/2 = 24 clips.', '24', None)
    >>> split_gsm8k_answer("#### 7")
    (None, '7', None)
    """
    match = _GSM8K_FINAL.search(answer)
    if match is None or "\n" in answer[match.end():].strip():
        return None, None, "does not end in '#### <number>'"
    value = match.group("value").strip()
    if not value:
        return None, None, "nothing after '####'; it must end in '#### <number>'"
    if parse_number(value) is None:
        return None, None, f"the final answer after '####' is not a number: {value!r}"
    solution = answer[: match.start()].strip()
    if strip_annotations:
        solution = _CALCULATOR_ANNOTATION.sub("", solution)
    return solution or None, value, None


def _gsm8k_candidate(record: dict[str, Any], cfg: DataConfig) -> _Candidate:
    sources = {"id": "id", "prompt": "question", "reference": "answer", "solution": "answer"}
    # GSM8K has no ids; a record that brings an `id` field keeps it as the item's id.
    cand = _Candidate(values={}, extras=_extras(record, {"id": "id"}), sources=sources, id_given="id" in record)
    answer = record.get("answer")
    solution = reference = None
    if answer is None:
        cand.problems.append(("reference", "answer", "missing"))
    elif not isinstance(answer, str):
        cand.problems.append(("reference", "answer", f"{MUST_BE_TEXT}, got {_json_type(answer)}"))
    elif not answer.strip():
        cand.problems.append(("reference", "answer", IS_EMPTY))
    else:
        solution, reference, reason = split_gsm8k_answer(answer, cfg.strip_calculator_annotations)
        if reason:
            cand.problems.append(("reference", "answer", reason))
    question = record.get("question")
    cand.values = {"id": _as_id(record.get("id")), "prompt": question, "messages": None,
                   "reference": reference, "solution": solution}
    cand.prompt_key = question if isinstance(question, str) else None
    return cand


def _reft_candidate(record: dict[str, Any], cfg: DataConfig) -> _Candidate:
    sources = {"id": "item_id", "prompt": "question", "reference": "answer_value", "solution": "answer_cot"}
    cand = _Candidate(values={}, extras=_extras(record, {}), sources=sources)
    cand.id_given = "item_id" in record
    question = record.get("question")
    cand.values = {
        "id": _as_id(record.get("item_id")) if cand.id_given else None,
        "prompt": question,
        "messages": None,
        "reference": _as_reference(record.get("answer_value")),
        "solution": _as_solution(record.get("answer_cot")),
    }
    cand.prompt_key = question if isinstance(question, str) else None
    return cand


def _columns_candidate(record: dict[str, Any], cfg: DataConfig) -> _Candidate:
    cols = cfg.columns
    sources = {"prompt": cols.prompt, "reference": cols.reference}
    if cols.id:
        sources["id"] = cols.id
    if cols.solution:
        sources["solution"] = cols.solution
    cand = _Candidate(values={}, extras=_extras(record, sources), sources={"id": "id", "solution": "solution", **sources})
    cand.id_given = cols.id is not None
    prompt = record.get(cols.prompt)
    cand.values = {
        "id": _as_id(record.get(cols.id)) if cols.id else None,
        "prompt": prompt,
        "messages": None,
        "reference": _as_reference(record.get(cols.reference)),
        "solution": _as_solution(record.get(cols.solution)) if cols.solution else None,
    }
    cand.prompt_key = prompt if isinstance(prompt, str) else None
    return cand


_CANDIDATE_BUILDERS = {
    "openai": _openai_candidate,
    "gsm8k": _gsm8k_candidate,
    "reft": _reft_candidate,
    "csv": _columns_candidate,
    "parquet": _columns_candidate,
}


def content_id(prompt_key: str) -> str:
    """The id of an item whose file gives none: a hash of its prompt, stable across reorderings."""
    return hashlib.sha256(prompt_key.encode("utf-8", "surrogatepass")).hexdigest()[:12]


# --------------------------------------------------------------------------- loading


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
        raise DataError(f"{path}: unknown format {requested!r}; use one of {', '.join(FORMATS)} or auto")
    fmt, rows = _read_rows(path, _read_file(path), requested, cfg)
    return _judge(path, fmt, rows, cfg, numeric)


def _judge(path: Path, fmt: str, rows: list[_Row], cfg: DataConfig, numeric: bool) -> LoadResult:
    """Turn raw rows into items: structural problems, pandera field rules, then duplicates."""
    build = _CANDIDATE_BUILDERS[fmt]
    candidates: dict[int, _Candidate] = {}
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
        table = pd.DataFrame(
            {col: pd.Series([c.values[col] for c in candidates.values()], index=list(candidates), dtype=object)
             for col in ("id", "prompt", "reference", "solution")}
        )
        # GSM8K references come out of the answer parser already numeric.
        for pos, column, check, value in _failures(row_checks_schema(numeric and fmt != "gsm8k"), table):
            if column in found.get(pos, {}):
                continue
            report(pos, column, candidates[pos].sources[column], _reason(check, value))

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
            report(pos, "id", candidates[pos].sources["id"], f"duplicate id {value!r} (first at {_where(rows[first_id[value]])})")

    file = str(path)
    problems: list[Problem] = []
    rejects: list[Reject] = []
    items: list[dict[str, Any]] = []
    for pos, row in enumerate(rows):
        if pos in found:
            row_problems = [
                Problem(file=file, line=row.line, field=field_name, reason=reason, raw=row.raw, index=row.index)
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


def _reason(check: str, value: Any) -> str:
    if check == "not_nullable":
        return "missing"
    if check == MUST_BE_TEXT:
        return f"{MUST_BE_TEXT}, got {_json_type(value)}"
    if check == NO_NUMERIC_ANSWER:
        shown = value if len(value) <= 60 else value[:57] + "..."
        return f"{NO_NUMERIC_ANSWER}: {shown!r} (pass --no-numeric / numeric=False if the grader compares text)"
    return check


def _where(row: _Row) -> str:
    if row.index is not None and row.line is not None:
        return f"item {row.index} (line {row.line})"
    if row.index is not None:
        return f"row {row.index}"
    return f"line {row.line}"
