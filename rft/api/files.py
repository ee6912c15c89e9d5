"""`/v1/files`: upload (multipart, streamed to disk, size-limited), list, retrieve, content, delete.

A file is stored as `<data_dir>/files/<file id>` under an id generated here: nothing from the
request (its filename included, kept only as a label) ever reaches a path. Jobs read their files
through hard links in their own directories, so deleting a file never breaks a job that uses it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse

from rft.api.errors import invalid, not_found
from rft.api.pagination import page
from rft.api.store import new_id, now
from rft.api.uploads import receive_upload

router = APIRouter()

# Purposes an upload may have here: fine-tuning data (training and validation files). Result files
# (`fine-tune-results`) are written by the server itself.
UPLOAD_PURPOSES = ("fine-tune",)
RESULTS_PURPOSE = "fine-tune-results"


def file_object(file_id: str, size: int, filename: str, purpose: str, created_at: int | None = None) -> dict[str, Any]:
    """A `file` object as OpenAI's API returns it."""
    return {
        "id": file_id,
        "object": "file",
        "bytes": size,
        "created_at": created_at if created_at is not None else now(),
        "filename": filename,
        "purpose": purpose,
        "status": "processed",
        "status_details": None,
        "expires_at": None,
    }


def add_result_file(state: Any, source: Path, filename: str) -> dict[str, Any]:
    """Register a file the server wrote (a job's metrics CSV) as a `fine-tune-results` file."""
    file_id = new_id("file")
    target = state.settings.file_path(file_id)
    os.replace(source, target) if source.parent == target.parent else target.write_bytes(source.read_bytes())
    record = file_object(file_id, target.stat().st_size, filename, RESULTS_PURPOSE)
    state.store.add_file(record)
    return record


def existing_file(state: Any, file_id: str, param: str = "file_id") -> dict[str, Any]:
    record = state.store.get_file(file_id)
    if record is None:
        raise not_found(f"No such File object: {file_id}", param=param, code="file_not_found")
    return record


@router.post("/v1/files")
async def create_file(request: Request) -> dict[str, Any]:
    state = request.app.state.rft
    file_id = new_id("file")
    path = state.settings.file_path(file_id)
    partial = path.with_name(f".{file_id}.partial")
    upload = await receive_upload(
        request.headers.get("content-type"), request.stream(), partial, state.settings.max_upload_bytes
    )
    purpose = upload.fields.get("purpose")
    if purpose is None:
        partial.unlink(missing_ok=True)
        raise invalid("missing required parameter: 'purpose'", param="purpose")
    if purpose not in UPLOAD_PURPOSES:
        partial.unlink(missing_ok=True)
        raise invalid(
            f"purpose {purpose!r} is not served here: this server takes files for fine-tuning "
            f"(purpose one of: {', '.join(UPLOAD_PURPOSES)})",
            param="purpose",
        )
    if upload.size == 0:
        partial.unlink(missing_ok=True)
        raise invalid("the file is empty", param="file")
    os.replace(partial, path)
    record = file_object(file_id, upload.size, upload.filename or "upload", purpose)
    state.store.add_file(record)
    return record


@router.get("/v1/files")
def list_files(
    request: Request, purpose: str | None = None, limit: int | None = None, after: str | None = None,
    order: str = "desc",
) -> dict[str, Any]:
    if order not in ("asc", "desc"):
        raise invalid(f"order must be 'asc' or 'desc', got {order!r}", param="order")
    files = request.app.state.rft.store.list_files(purpose, order)
    return page(files, after, limit, default=10000, max_limit=10000)  # OpenAI's default and bound


@router.get("/v1/files/{file_id}")
def retrieve_file(request: Request, file_id: str) -> dict[str, Any]:
    return existing_file(request.app.state.rft, file_id)


@router.get("/v1/files/{file_id}/content")
def file_content(request: Request, file_id: str) -> FileResponse:
    state = request.app.state.rft
    record = existing_file(state, file_id)
    return FileResponse(state.settings.file_path(file_id), media_type="application/octet-stream",
                        filename=record["filename"])


@router.delete("/v1/files/{file_id}")
def delete_file(request: Request, file_id: str) -> dict[str, Any]:
    state = request.app.state.rft
    existing_file(state, file_id)
    if state.store.delete_file(file_id):
        state.settings.file_path(file_id).unlink(missing_ok=True)
    return {"id": file_id, "object": "file", "deleted": True}
