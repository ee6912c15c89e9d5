"""A multipart/form-data upload streamed to disk: the file part goes straight into a file, chunk by
chunk, and stops at the size limit; the small text fields (`purpose`) are kept in memory.

Built on python-multipart's streaming `MultipartParser` (the parser starlette uses), driven by the
request's body stream, so an upload of any size holds one network chunk in memory at a time.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from python_multipart.multipart import MultipartParser, parse_options_header

from rft.api.errors import APIError, invalid

MAX_FIELD_BYTES = 64 * 1024  # a text field (purpose) is a word; anything larger is not one


@dataclass
class Upload:
    """What a form held: its text fields, and the file part's name and size (written to `path`)."""

    fields: dict[str, str] = field(default_factory=dict)
    filename: str | None = None
    size: int = 0


class _Part:
    def __init__(self) -> None:
        self.headers: dict[str, str] = {}
        self.name: str | None = None
        self.filename: str | None = None
        self.buffer = bytearray()


def _disposition(headers: dict[str, str]) -> tuple[str | None, str | None]:
    _, params = parse_options_header(headers.get("content-disposition", ""))
    name = params.get(b"name")
    filename = params.get(b"filename")
    decode = lambda v: v.decode("utf-8", "replace") if v is not None else None  # noqa: E731
    return decode(name), decode(filename)


async def receive_upload(
    content_type: str | None, body: AsyncIterator[bytes], path: Path, max_bytes: int, file_field: str = "file"
) -> Upload:
    """Parse a multipart body from `body`, writing the part named `file_field` to `path`.

    400 when the body is not multipart or has no such part; 413 when the file exceeds `max_bytes`
    (the partial file is removed). `path` is the caller's, made from a generated id."""
    mime, params = parse_options_header(content_type or "")
    boundary = params.get(b"boundary")
    if mime != b"multipart/form-data" or not boundary:
        raise invalid("an upload is a multipart/form-data body with a 'file' part and a 'purpose' field", param="file")
    upload = Upload()
    state: dict[str, object] = {"part": None, "header_field": bytearray(), "header_value": bytearray(), "error": None}
    out = open(path, "wb")  # noqa: SIM115 - closed in the finally below, whatever the parser does

    def on_part_begin() -> None:
        state["part"] = _Part()

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["header_field"] += data[start:end]  # type: ignore[operator]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["header_value"] += data[start:end]  # type: ignore[operator]

    def on_header_end() -> None:
        part: _Part = state["part"]  # type: ignore[assignment]
        name = bytes(state["header_field"]).decode("latin-1").strip().lower()  # type: ignore[arg-type]
        part.headers[name] = bytes(state["header_value"]).decode("latin-1").strip()  # type: ignore[arg-type]
        state["header_field"], state["header_value"] = bytearray(), bytearray()

    def on_headers_finished() -> None:
        part: _Part = state["part"]  # type: ignore[assignment]
        part.name, part.filename = _disposition(part.headers)

    def on_part_data(data: bytes, start: int, end: int) -> None:
        part: _Part = state["part"]  # type: ignore[assignment]
        if state["error"] is not None:
            return
        if part.name == file_field:
            upload.size += end - start
            if upload.size > max_bytes:
                state["error"] = APIError(
                    413, f"the file is larger than this server's upload limit ({max_bytes} bytes; rft api "
                    "--max-upload-mb)", param="file", code="file_too_large",
                )
                return
            out.write(data[start:end])
        else:
            part.buffer += data[start:end]
            if len(part.buffer) > MAX_FIELD_BYTES:
                state["error"] = invalid(f"the form field {part.name!r} is too long for a text field", param=part.name)

    def on_part_end() -> None:
        part: _Part = state["part"]  # type: ignore[assignment]
        if part.name == file_field:
            upload.filename = part.filename or "upload"
        elif part.name is not None:
            upload.fields[part.name] = part.buffer.decode("utf-8", "replace")

    parser = MultipartParser(boundary, {
        "on_part_begin": on_part_begin, "on_part_data": on_part_data, "on_part_end": on_part_end,
        "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_headers_finished": on_headers_finished,
    })
    try:
        async for chunk in body:
            parser.write(chunk)
            if state["error"] is not None:
                raise state["error"]  # type: ignore[misc]
        parser.finalize()
    except APIError:
        _discard(out, path)
        raise
    except Exception as exc:  # python-multipart's parse errors: a body that is not the multipart it says
        _discard(out, path)
        raise invalid(f"the multipart body cannot be read: {exc}", param="file") from None
    out.close()
    if upload.filename is None:
        path.unlink(missing_ok=True)
        raise invalid(f"missing required parameter: '{file_field}' (the file part of the form)", param=file_field)
    return upload


def _discard(out, path: Path) -> None:
    out.close()
    with contextlib.suppress(OSError):
        os.unlink(path)
