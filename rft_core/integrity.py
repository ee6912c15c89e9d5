"""Directories written whole or not at all, and checked before they are trusted.

Checkpoints, the best weights and a stage's final model are directories of several files. Each is
written into a staging directory next to its place, then `publish`ed: every file is hashed
(sha256) and flushed to disk (fsync), the list of files with their sizes and digests is written as
the manifest `rft-manifest.json`, the directories are flushed, and the staging directory is renamed
into place (an atomic exchange on Linux, so a reader sees the old directory or the new one, never
a mix), and the parent directory is flushed so that the rename itself survives a power loss.

Without the fsync calls a crash can leave a renamed directory whose files are empty or cut short
(the rename reached the disk before the data did); without the manifest nothing could tell. Before
a directory is used again (`directory_problem`), every file is checked against the manifest:
present, the recorded size, the recorded sha256. Directories written before manifests existed are
checked for what their files say about themselves (a safetensors file's header gives its length;
JSON files parse).

Why sha256 rather than a cheaper checksum: it is the digest people can check by hand
(`sha256sum`), and it runs at about 0.9 GB/s on a loaded 2-core machine, the order of a disk's
write speed, so it at most doubles the time of writing a checkpoint (zlib's crc32 ran at 2.2 GB/s
there and would catch the same crash damage; the difference did not seem worth a digest nobody can
check with standard tools). A directory is hashed once when written and once when it is resumed
from or reused, never on every step.

`reading(path)` turns any error of a library reading a file (safetensors' "incomplete metadata",
torch's "PytorchStreamReader failed", a JSON error) into a `DamagedFileError` that names the path.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import json
import logging
import os
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MANIFEST = "rft-manifest.json"
_FORMAT = 1
_BLOCK = 1 << 22

logger = logging.getLogger("rft.integrity")


class DamagedFileError(OSError):
    """A file rft wrote (a checkpoint, saved weights) cannot be read back; the message names it."""


@contextlib.contextmanager
def reading(path: str | Path, what: str = "") -> Iterator[None]:
    """Inside the block, an error from reading `path` is re-raised as a `DamagedFileError` naming it
    (and `what` it is), whatever library raised it; errors that name it already pass through."""
    try:
        yield
    except DamagedFileError:
        raise
    except Exception as exc:
        label = f" ({what})" if what else ""
        raise DamagedFileError(
            f"{path}{label} cannot be read: {type(exc).__name__}: {exc}".rstrip(": ")
        ) from exc


# --------------------------------------------------------------------------- writing


def _files(directory: Path) -> list[Path]:
    """The regular files under `directory` (the manifest itself excepted), in a stable order."""
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)


def _hash_and_sync(path: Path) -> str:
    """The sha256 of `path`, read once; the file is flushed to disk on the way (fsync)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            digest.update(block)
        os.fsync(f.fileno())
    return digest.hexdigest()


def sync_directory(path: Path) -> None:
    """Flush a directory's entries (new names, renames) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(directory: Path, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Hash and fsync every file of `directory`, then write (and fsync) its manifest; returns it.
    `meta`: facts about the contents kept with the manifest (e.g. the step the weights are from)."""
    files = {
        p.relative_to(directory).as_posix(): {"size": p.stat().st_size, "sha256": _hash_and_sync(p)}
        for p in _files(directory)
    }
    manifest = {"format": _FORMAT, "files": files, **({"meta": meta} if meta else {})}
    path = directory / MANIFEST
    with open(path, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    for sub in sorted({p.parent for p in directory.rglob("*")} | {directory}, key=lambda p: -len(p.parts)):
        sync_directory(sub)
    return manifest


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one step (Linux renameat2 RENAME_EXCHANGE); False where the system
    or the filesystem cannot."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def publish(staging: Path, final: Path, meta: dict[str, Any] | None = None) -> Path:
    """Make the finished `staging` directory `final`: manifest and fsync (`write_manifest`), then
    one rename (an exchange when `final` exists, so that it is never missing), then the parent
    flushed. Whatever `final` held before is removed."""
    write_manifest(staging, meta)
    if final.exists() and _exchange(staging, final):
        shutil.rmtree(staging, ignore_errors=True)  # now the old contents
    else:
        # No exchange here: for a moment between the two renames `final` is missing, never partial.
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    sync_directory(final.parent)
    return final


def staging_path(final: Path) -> Path:
    """Where `final` is written before it is published: a hidden sibling."""
    return final.with_name(f".{final.name}.partial")


@contextlib.contextmanager
def writing_directory(final: str | Path, meta: dict[str, Any] | None = None) -> Iterator[Path]:
    """Yield an empty staging directory; when the block ends without an error it becomes `final`
    (`publish`), and when it raises, `final` is left as it was and the staging directory removed."""
    final = Path(final)
    staging = staging_path(final)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    publish(staging, final, meta)


def write_file(path: str | Path, text: str) -> None:
    """Write a small text file whole or not at all (temporary file, fsync, rename)."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    with open(partial, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)


# --------------------------------------------------------------------------- checking


def read_manifest(directory: str | Path) -> dict[str, Any] | None:
    """The manifest of `directory`, None when it has none; `DamagedFileError` when unreadable."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    with reading(path, "manifest"):
        manifest = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
            raise ValueError("not a manifest (no 'files' table)")
    return manifest


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def _manifest_problem(directory: Path, manifest: dict[str, Any], contents: bool) -> str | None:
    for name, entry in sorted(manifest["files"].items()):
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != entry.get("size"):
            return f"{name} has {size} bytes, the manifest says {entry.get('size')} (cut short or overwritten)"
        if contents and _sha256(path) != entry.get("sha256"):
            return f"{name} does not match its sha256 in the manifest (its contents changed)"
    return None


def safetensors_problem(path: Path) -> str | None:
    """What is wrong with a safetensors file by its own header (cut short, unreadable), or None."""
    size = path.stat().st_size
    if size < 8:
        return f"{path.name} has {size} bytes, too short for a safetensors file"
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if 8 + length > size:
            return f"{path.name} is cut short: its header needs {8 + length} bytes, the file has {size}"
        try:
            header = json.loads(f.read(length))
        except ValueError as exc:
            return f"{path.name}: unreadable safetensors header ({exc})"
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__" and "data_offsets" in t]
    needed = 8 + length + max(ends, default=0)
    if needed > size:
        return f"{path.name} is cut short: its header describes {needed} bytes, the file has {size}"
    return None


def file_problem(path: str | Path) -> str | None:
    """What is wrong with a single file rft wrote, or None: missing, empty, or (Parquet) without
    the `PAR1` marks that begin and end every whole Parquet file."""
    path = Path(path)
    if not path.is_file():
        return "it is missing" if not path.exists() else "it is not a file"
    size = path.stat().st_size
    if size == 0:
        return "it is empty"
    if path.suffix == ".parquet":
        with open(path, "rb") as f:
            head = f.read(4)
            f.seek(max(0, size - 4))
            tail = f.read(4)
        if head != b"PAR1" or tail != b"PAR1" or size < 12:
            return "it is not a whole Parquet file (cut short or overwritten)"
    return None


def _unmanifested_problem(directory: Path) -> str | None:
    """Checks for a directory written before manifests: what its files say about themselves."""
    for path in _files(directory):
        if path.suffix == ".safetensors":
            if problem := safetensors_problem(path):
                return problem
        elif path.suffix == ".json":
            try:
                json.loads(path.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as exc:
                return f"{path.relative_to(directory)} is not readable JSON ({exc})"
    return None


def directory_problem(directory: str | Path, *, contents: bool = True) -> str | None:
    """What is wrong with a directory `publish` wrote, in words, or None when it is whole.

    Missing, a file missing, another size, or (with `contents`) other bytes than the manifest
    recorded; without a manifest (written by an older rft), files that contradict their own
    headers. `contents=False` skips the hashing (sizes and headers only)."""
    directory = Path(directory)
    if not directory.is_dir():
        return "it is missing" if not directory.exists() else "it is not a directory"
    try:
        manifest = read_manifest(directory)
    except DamagedFileError as exc:
        return f"its manifest {MANIFEST} is unreadable ({exc.__cause__ or exc})"
    if manifest is None:
        return _unmanifested_problem(directory)
    return _manifest_problem(directory, manifest, contents)


def manifest_meta(directory: str | Path) -> dict[str, Any]:
    """The `meta` a directory was published with ({} without a manifest or meta)."""
    try:
        manifest = read_manifest(directory)
    except DamagedFileError:
        return {}
    return dict((manifest or {}).get("meta") or {})
