"""Read a file's bytes into raw rows, one container at a time: JSON lines, a JSON array, CSV, Parquet.

A reader knows the layout of its container, not what the records mean: each `RawRow` carries
where it was (line, index), its raw text or record, and the problems that kept it from being read
(malformed JSON, invalid UTF-8, nesting too deep, a CSV row of the wrong width, a Parquet cell that
cannot be converted). No input makes a reader crash: a row it cannot read is a row with a problem,
and only a file that is not data at all (missing, empty, binary, not a Parquet file, no header)
raises `DataError`.

Every record that comes out of a reader is safe for what follows: plain Python values nested at
most `MAX_DEPTH` levels (so no later recursion over it can overflow the stack), and a record whose
text is not valid Unicode (undecodable bytes, lone surrogates from `\\ud800` escapes) is flagged,
so that it never reaches Arrow or a UTF-8 writer.
"""

from __future__ import annotations

import csv
import io
import json
import re
import sys
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rft_core.data.schemas import DataError, json_native
from rft_core.files import DATA_LIMIT, FileProblem, read_bytes

BOM = b"\xef\xbb\xbf"
PARQUET_MAGIC = b"PAR1"
# Deeper than any real task record (a tool's JSON schema is a few tens of levels); deep enough
# inputs would otherwise overflow the stack of every recursive walk over the record later on.
MAX_DEPTH = 100
TOO_DEEP = f"nested deeper than {MAX_DEPTH} levels"

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
_SURROGATE = re.compile("[\ud800-\udfff]")
_CSV_LOCK = threading.Lock()


@dataclass
class RawRow:
    """One row as read from the file, before it is judged."""

    line: int | None
    index: int | None
    raw: str | dict | None
    record: dict[str, Any] | None = None
    problems: list[tuple[str | None, str]] = field(default_factory=list)  # (field, reason)
    raw_bytes: bytes | None = None  # the exact bytes, kept when they are not valid UTF-8


# --------------------------------------------------------------------------- bytes and text


def read_file(path: Path) -> bytes:
    """The file's bytes; DataError when it is missing, not a regular file (a directory, a FIFO, a
    device), unreadable, larger than `DATA_LIMIT` or empty (the checks of `rft_core.files`)."""
    try:
        data = read_bytes(path, "data file", DATA_LIMIT)
    except FileProblem as exc:
        raise DataError(str(exc)) from None
    if not data.removeprefix(BOM).strip():
        raise DataError(f"{path}: the file is empty")
    return data


def binary_kind(data: bytes) -> str | None:
    """What a binary file looks like ('a PNG image'), or None for text.

    NUL bytes make a file binary only when most of its first lines hold one: a text file with a
    stray NUL in one line is data with one bad row, not a binary file.
    """
    for magic, kind in _BINARY_MAGIC.items():
        if data.startswith(magic):
            return kind
    sample = data[:8192]
    if b"\x00" in sample:
        lines = [line for line in sample.split(b"\n") if line.strip()]
        if 2 * sum(b"\x00" in line for line in lines) > len(lines):
            return "a binary file"
    return None


def decode(raw: bytes) -> tuple[str, str | None]:
    """Text of `raw` and, when it is not valid UTF-8, the reason (the bytes survive as surrogates)."""
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        bad = raw[exc.start : exc.start + 1].hex()
        return raw.decode("utf-8", "surrogateescape"), f"invalid UTF-8 (byte 0x{bad} at offset {exc.start})"


def printable(text: str) -> str:
    """`text` safe to print and to write as UTF-8: undecodable bytes as \\xNN, lone surrogates as \\uNNNN."""
    if not _SURROGATE.search(text):
        return text

    def escape(match: re.Match[str]) -> str:
        code = ord(match.group())
        return f"\\x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"\\u{code:04x}"

    return _SURROGATE.sub(escape, text)


def printable_bytes(raw: bytes) -> str:
    """Raw bytes as text for reports: undecodable bytes shown as \\xNN (exact bytes kept apart)."""
    return raw.decode("utf-8", "backslashreplace")


def json_type(value: Any) -> str:
    """JSON's name for the type of a value, as a user reading their file would say it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


# --------------------------------------------------------------------------- records


def _walk(value: Any, depth: int) -> tuple[bool, str | None]:
    """(nested deeper than MAX_DEPTH, first lone surrogate) of a value at `depth`, without recursion."""
    surrogate = None
    stack = [(value, depth)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, str):
            if surrogate is None and (match := _SURROGATE.search(item)):
                surrogate = match.group()
        elif isinstance(item, (dict, list, tuple)):
            if level > MAX_DEPTH:
                return True, surrogate
            if isinstance(item, dict):
                for key, inner in item.items():
                    stack.append((key, level))
                    stack.append((inner, level + 1))
            else:
                stack.extend((inner, level + 1) for inner in item)
    return False, surrogate


def record_problems(record: dict[str, Any], utf8_error: str | None = None) -> tuple[bool, list[tuple[str | None, str]]]:
    """(too deep, problems) of a record's fields: nesting beyond MAX_DEPTH, text that is not Unicode.

    `utf8_error` is the reason to give for undecodable bytes when the row's bytes were not UTF-8;
    a lone surrogate that came from a JSON escape (`"\\ud800"`) gets its own reason.
    """
    problems: list[tuple[str | None, str]] = []
    too_deep = False
    for key, value in record.items():
        deep, surrogate = _walk(value, 2)  # the record is level 1, its fields' containers level 2
        if surrogate is None and _SURROGATE.search(key):
            surrogate = _SURROGATE.search(key).group()
        if deep:
            too_deep = True
            problems.append((key, TOO_DEEP))
        elif surrogate is not None:
            if utf8_error and "\udc80" <= surrogate <= "\udcff":
                problems.append((key, utf8_error))
            else:
                problems.append((key, f"holds the lone surrogate {ascii(surrogate)}, which is not valid Unicode"))
    if utf8_error and not problems:
        problems.append((None, utf8_error))
    return too_deep, problems


def parse_json(text: str) -> tuple[Any, str | None]:
    """(value, None) of a JSON text, or (None, reason) when it cannot be read."""
    try:
        return json.loads(text), None
    except json.JSONDecodeError as exc:
        return None, f"malformed JSON: {exc.msg} (column {exc.colno})"
    except RecursionError:
        return None, TOO_DEEP
    except ValueError as exc:  # an integer beyond Python's digit limit
        return None, _value_error_reason(exc)


def _value_error_reason(exc: ValueError) -> str:
    if "integer string conversion" in str(exc):
        return f"a number has more than {sys.get_int_max_str_digits()} digits"
    return f"unreadable JSON: {exc}"


def judge_record(row: RawRow, value: Any, utf8_error: str | None) -> None:
    """Attach a parsed JSON value to its row: a record if it is a readable object, else a problem."""
    if not isinstance(value, dict):
        row.problems.append((None, f"not a JSON object (got {json_type(value)})"))
        return
    too_deep, problems = record_problems(value, utf8_error)
    row.problems.extend(problems)
    if not too_deep:
        row.record = value


# --------------------------------------------------------------------------- JSON lines, JSON arrays


def jsonl_rows(data: bytes) -> list[RawRow]:
    """One row per non-blank line; `line` is the physical line, 1-based."""
    rows = []
    for number, raw_line in enumerate(data.removeprefix(BOM).split(b"\n"), start=1):
        raw_line = raw_line.rstrip(b"\r")
        if not raw_line.strip():
            continue
        text, utf8_error = decode(raw_line)
        row = RawRow(line=number, index=None, raw=printable_bytes(raw_line) if utf8_error else text,
                     raw_bytes=raw_line if utf8_error else None)
        value, reason = parse_json(text)
        if reason is not None:
            row.problems.append((None, utf8_error if utf8_error and reason.startswith("malformed") else reason))
        else:
            judge_record(row, value, utf8_error)
        rows.append(row)
    return rows


def json_array_rows(path: Path, data: bytes) -> list[RawRow]:
    """Items of a JSON array, one by one, so that one malformed item costs only itself.

    After a malformed item, reading resumes at the next line that opens an object at the same
    indentation as the bad one (how pretty-printed arrays are laid out); if there is none, the rest
    of the file is one rejected row, its text kept.
    """
    body = data.removeprefix(BOM)
    text, utf8_error = decode(body)
    decoder = json.JSONDecoder()
    pos = _skip_ws(text, 0)
    if pos >= len(text) or text[pos] != "[":
        raise DataError(f"{path}: not a JSON array")
    pos += 1
    lines = _LineCounter(text)
    rows: list[RawRow] = []
    while True:
        pos = _skip_ws(text, pos)
        # A missing closing ']' loses nothing (every item before it was read), so it is let pass.
        if pos >= len(text) or text[pos] == "]":
            break
        line = lines.line_of(pos)
        try:
            value, end = decoder.raw_decode(text, pos)
        except (ValueError, RecursionError) as exc:
            if isinstance(exc, json.JSONDecodeError):
                reason = f"malformed JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
            elif isinstance(exc, RecursionError):
                reason = TOO_DEEP
            else:
                reason = _value_error_reason(exc)
            resume = _resume_point(text, pos)
            raw = (text[pos:resume] if resume is not None else text[pos:]).rstrip().rstrip(",")
            rows.append(RawRow(line=line, index=len(rows), raw=printable_bytes(raw.encode("utf-8", "surrogateescape")),
                               problems=[(None, reason)]))
            if resume is None:
                break
            pos = resume
            continue
        raw = text[pos:end]
        item_error = None
        if utf8_error and any("\udc80" <= ch <= "\udcff" for ch in raw):
            item_error = "invalid UTF-8 bytes"
        raw_bytes = raw.encode("utf-8", "surrogateescape") if item_error else None
        row = RawRow(line=line, index=len(rows), raw=printable_bytes(raw_bytes) if raw_bytes else printable(raw),
                     raw_bytes=raw_bytes)
        judge_record(row, value, item_error)
        rows.append(row)
        pos = _skip_ws(text, end)
        if pos < len(text) and text[pos] == ",":
            pos += 1
        elif pos < len(text) and text[pos] != "]":
            # Two items without a comma between them: the item before the gap is the one reported.
            rows[-1].problems.append((None, "malformed JSON: missing ',' after this item"))
    return rows


class _LineCounter:
    """Line numbers of increasing positions in a text, counted once (a long array stays linear)."""

    def __init__(self, text: str) -> None:
        self.text, self.pos, self.line = text, 0, 1

    def line_of(self, pos: int) -> int:
        if pos < self.pos:
            return self.text.count("\n", 0, pos) + 1
        self.line += self.text.count("\n", self.pos, pos)
        self.pos = pos
        return self.line


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _resume_point(text: str, pos: int) -> int | None:
    line_start = text.rfind("\n", 0, pos) + 1
    indent = text[line_start:pos]
    if indent.strip():
        indent = ""
    match = re.compile(r"\n" + re.escape(indent) + r"\{").search(text, pos)
    return match.start() + 1 + len(indent) if match else None


# --------------------------------------------------------------------------- CSV


CSV_DELIMITERS = ",;\t|"
_SNIFF_LINES, _SNIFF_CHARS = 50, 64 * 1024


def csv_delimiter(path: Path, text: str, wanted: tuple[str, ...] = ()) -> str:
    """The delimiter of a CSV text, among `CSV_DELIMITERS`: the one that splits the header into
    fields holding every `wanted` column name, else what `csv.Sniffer` finds in the first lines,
    else ',' (tab for a .tsv file)."""
    lines = text[:_SNIFF_CHARS].splitlines(keepends=True)[:_SNIFF_LINES]
    sample = "".join(lines)
    if wanted:
        fits = [d for d in CSV_DELIMITERS if set(wanted) <= set(_header_fields(sample, d))]
        if len(fits) == 1:
            return fits[0]
    if len(lines) > 1:  # the last line of a sample cut in the middle of a file could mislead it
        sample = "".join(lines[:-1]) if len(text) > len(sample) else sample
    try:
        return csv.Sniffer().sniff(sample, delimiters=CSV_DELIMITERS).delimiter
    except csv.Error:  # one column, or no delimiter used consistently
        return "\t" if path.suffix.lower() == ".tsv" else ","


def _header_fields(sample: str, delimiter: str) -> list[str]:
    try:
        return [name.strip() for name in next(csv.reader(io.StringIO(sample, newline=""), delimiter=delimiter), [])]
    except csv.Error:
        return []


def csv_rows(path: Path, data: bytes, delimiter: str = "auto", wanted: tuple[str, ...] = ()) -> tuple[list[str], list[RawRow]]:
    """Records of a CSV file, keyed by the header, with their physical lines.

    `delimiter` is one character, or "auto" (`csv_delimiter`: the one whose header holds the
    `wanted` columns, else sniffed, else ',' or tab for .tsv). A record the csv module cannot parse,
    a row of the wrong width, a cell with a NUL byte or undecodable bytes, or a cell longer than
    `csv.field_size_limit()` is a rejected row; a header that cannot be read (or has duplicate
    names) makes the file unusable.
    """
    text, _ = decode(data.removeprefix(BOM))
    if delimiter == "auto":
        delimiter = csv_delimiter(path, text, wanted)
    physical: list[str] = []

    def lines():
        for line in io.StringIO(text, newline=""):
            physical.append(line)
            yield line

    header: list[str] | None = None
    header_bytes_bad = False
    rows: list[RawRow] = []
    start = 1
    # Read with the limit lifted (no field can be longer than the file, already in memory) so that
    # a long field costs its own row only; the caller's limit then judges the cells.
    with _CSV_LOCK:
        field_limit = csv.field_size_limit()
        csv.field_size_limit(max(field_limit, len(text) + 1))
        try:
            reader = csv.reader(lines(), delimiter=delimiter)
            while True:
                try:
                    cells = next(reader)
                except StopIteration:
                    break
                except csv.Error as exc:
                    if header is None:
                        raise DataError(f"{path}: not readable as CSV near line {reader.line_num}: {exc}") from None
                    raw = printable("".join(physical[start - 1 : reader.line_num]).rstrip("\r\n"))
                    rows.append(RawRow(line=start, index=None, raw=raw, problems=[(None, f"not readable as CSV: {exc}")]))
                    start = reader.line_num + 1
                    continue
                end = reader.line_num
                if not cells or (len(cells) == 1 and not cells[0].strip()):
                    start = end + 1
                    continue
                raw_text = "".join(physical[start - 1 : end]).rstrip("\r\n")
                if header is None:
                    header = [h.strip() for h in cells]
                    duplicates = [name for name, n in Counter(header).items() if n > 1]
                    if duplicates:
                        shown = ", ".join(printable(name) for name in duplicates)
                        raise DataError(f"{path}: duplicate column names in the header: {shown}")
                    header_bytes_bad = any(_SURROGATE.search(name) for name in header)
                    start = end + 1
                    continue
                rows.append(_csv_row(start, raw_text, cells, header, field_limit, header_bytes_bad))
                start = end + 1
        finally:
            csv.field_size_limit(field_limit)
    if header is None:
        raise DataError(f"{path}: the file is empty")
    return header, rows


def _csv_row(line: int, raw_text: str, cells: list[str], header: list[str], field_limit: int,
             header_bytes_bad: bool) -> RawRow:
    raw_bytes = raw_text.encode("utf-8", "surrogateescape")
    row = RawRow(line=line, index=None, raw=printable_bytes(raw_bytes))
    if len(cells) != len(header):
        row.problems.append((None, f"row has {len(cells)} fields, the header has {len(header)}"))
    record = dict(zip(header, cells, strict=False))
    for name, cell in record.items():
        if len(cell) > field_limit:
            row.problems.append((name, f"longer than the CSV field size limit ({field_limit} characters)"))
        elif "\x00" in cell:
            row.problems.append((name, "holds a NUL byte"))
    # CSV has no escapes: surrogates are undecodable bytes, in the row or in a column's name.
    if header_bytes_bad or _SURROGATE.search(raw_text):
        if _SURROGATE.search(raw_text):
            row.raw_bytes = raw_bytes
        _, problems = record_problems(record)
        row.problems.extend((name, "invalid UTF-8 bytes") for name, _ in problems)
    row.record = record
    return row


# --------------------------------------------------------------------------- Parquet


def parquet_rows(path: Path) -> tuple[list[str], list[RawRow]]:
    """Rows of a Parquet file as records; a cell Python cannot hold (a date beyond year 9999) is a
    problem of its row, any column type is read (nested ones become lists and dicts)."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises many kinds (OSError, ArrowException, ValueError) for a bad file
        raise DataError(f"{path}: not a readable Parquet file: {exc}") from None
    if table.num_rows == 0:
        raise DataError(f"{path}: the Parquet file has no rows")
    columns = table.column_names
    duplicates = [name for name, n in Counter(columns).items() if n > 1]
    if duplicates:
        raise DataError(f"{path}: duplicate column names: {', '.join(printable(n) for n in duplicates)}")
    try:
        records: list[tuple[dict[str, Any], list[tuple[str, str]]]] = [(r, []) for r in table.to_pylist()]
    except Exception:  # one cell cannot become a Python value: find it, row by row
        records = [_parquet_record(table, i) for i in range(table.num_rows)]
    rows = []
    for i, (record, problems) in enumerate(records):
        too_deep, record_issues = record_problems(record)
        row = RawRow(line=None, index=i, raw=None, problems=[*problems, *record_issues])
        if too_deep:
            row.raw = {key: ("<nested too deeply to show>" if (key, TOO_DEEP) in record_issues else json_native(value))
                       for key, value in record.items()}
        else:
            row.raw = json_native(record)
            row.record = record
        rows.append(row)
    return columns, rows


def _parquet_record(table: Any, i: int) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    record: dict[str, Any] = {}
    problems: list[tuple[str, str]] = []
    for name, column in zip(table.column_names, table.columns, strict=True):
        try:
            record[name] = column[i].as_py()
        except Exception as exc:  # overflow of dates/times, undecodable strings, ...
            record[name] = None
            problems.append((name, f"cannot be read: {exc}"))
    return record, problems
