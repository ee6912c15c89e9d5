"""Files a user names: read with the checks every reader shares, written so that no input is ever lost.

Reading (`read_bytes`, `read_text`): the path must name an existing regular file this process can
read, no larger than the caller's bound (configs, grader and deployment files: `TEXT_LIMIT`; data
files, which are read whole into memory: `DATA_LIMIT`); text must be UTF-8. A directory, a FIFO, a
character device (`/dev/zero`), a socket is refused before a byte is read, so nothing hangs on a pipe
without a writer or reads an endless device into memory. Each refusal is a `FileProblem` whose one
line names the file and what to do; each reader turns it into its own error type (ConfigError,
DataError, GraderSpecError, ...).

Writing (`refuse_inputs`, `atomic_write`): an output a user names must not be one of the inputs of
the same command (the same file after symlinks, `./x` and `x`, `..` and hard links), and it is
written to a temporary file in its own directory, then renamed over the old one (`os.replace`,
atomic on POSIX): a crash or a full disk leaves the old file or the new one, never half of one.

>>> refuse_inputs("data.jsonl", {"data file": "./data.jsonl"}, what="rejects file")
Traceback (most recent call last):
...
rft_core.files.OutputIsInput: data.jsonl: the rejects file is the data file ./data.jsonl; writing it would overwrite that input: give another path
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

MiB = 1 << 20
# Far beyond any real config, grader spec or prefect.yaml; a larger "config" is a wrong path.
TEXT_LIMIT = 16 * MiB
# Data files are read whole (bytes, then rows and a frame: several times the size in memory).
DATA_LIMIT = 2048 * MiB

_UTF8_BOM = b"\xef\xbb\xbf"
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


class FileProblem(ValueError):
    """A file a user named that cannot be used; the message names the file and the fix."""


class OutputIsInput(FileProblem):
    """An output path that is one of the command's inputs: writing it would destroy that input."""


def kind_of(mode: int) -> str:
    """What a file of this `st_mode` is, as a person says it ('a directory', 'a FIFO (named pipe)')."""
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _size(n: int) -> str:
    if n < MiB:
        return f"{n} bytes"
    return f"{n / MiB:.1f} MiB" if n < 1024 * MiB else f"{n / (1024 * MiB):.1f} GiB"


def _not_regular(path: Path, mode: int, what: str) -> FileProblem:
    if stat.S_ISDIR(mode):
        return FileProblem(f"{path}: is a directory, not a {what}: give the path of the file in it")
    return FileProblem(f"{path}: is {kind_of(mode)}, not a regular file: give the path of a {what} saved on disk")


def check_readable(path: str | Path, what: str = "file") -> os.stat_result:
    """The file's `stat` when `path` is an existing regular file (symlinks followed); else FileProblem."""
    path = Path(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise FileProblem(f"{path}: {what} not found (no such file; check the path)") from None
    except NotADirectoryError:
        raise FileProblem(f"{path}: {what} not found (a part of the path is a file, not a directory)") from None
    except PermissionError:
        raise FileProblem(f"{path}: permission denied: cannot reach the {what} (check the permissions)") from None
    except OSError as exc:  # a symlink loop, a name too long, an I/O error
        raise FileProblem(f"{path}: cannot use the {what}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(info.st_mode):
        raise _not_regular(path, info.st_mode, what)
    return info


def read_bytes(path: str | Path, what: str = "file", limit: int = TEXT_LIMIT) -> bytes:
    """The bytes of a regular file of at most `limit` bytes; FileProblem (one line) for anything else.

    The file is checked before it is opened, then opened non-blocking and checked again on the open
    descriptor (a FIFO put in its place in between cannot block the read), and read with a bound.
    """
    path = Path(path)
    check_readable(path, what)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except PermissionError:
        raise FileProblem(f"{path}: permission denied: cannot read the {what} (check its permissions)") from None
    except OSError as exc:
        raise FileProblem(f"{path}: cannot open the {what}: {exc.strerror or exc}") from None
    with open(fd, "rb", closefd=True) as handle:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise _not_regular(path, info.st_mode, what)
        if info.st_size > limit:
            raise _too_large(path, info.st_size, limit, what)
        try:
            data = handle.read(limit + 1)
        except OSError as exc:
            raise FileProblem(f"{path}: cannot read the {what}: {exc.strerror or exc}") from None
    if len(data) > limit:  # a file that grew, or one that reports no size (/proc)
        raise _too_large(path, len(data), limit, what)
    return data


def _too_large(path: Path, size: int, limit: int, what: str) -> FileProblem:
    return FileProblem(
        f"{path}: {'more than ' if size > limit else ''}{_size(size)}, larger than the {_size(limit)} a "
        f"{what} may have (it is read whole into memory): check the path, or use a smaller file"
    )


def decode_utf8(data: bytes, path: str | Path, what: str = "file") -> str:
    """`data` as text (a UTF-8 BOM dropped); FileProblem naming the first bad byte when it is not UTF-8."""
    if data.startswith(_UTF16_BOMS):
        raise FileProblem(f"{path}: the {what} is UTF-16 text: save it as UTF-8")
    try:
        return data.removeprefix(_UTF8_BOM).decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = exc.start + (len(_UTF8_BOM) if data.startswith(_UTF8_BOM) else 0)
        line = data[:offset].count(b"\n") + 1
        raise FileProblem(
            f"{path}: the {what} is not UTF-8 text (byte 0x{data[offset]:02x} at line {line}, offset {offset}): "
            "save it as UTF-8"
        ) from None


def read_text(path: str | Path, what: str = "file", limit: int = TEXT_LIMIT) -> str:
    """The UTF-8 text of a regular file of at most `limit` bytes (see `read_bytes`, `decode_utf8`)."""
    return decode_utf8(read_bytes(path, what, limit), path, what)


def jsonl_lines(text: str) -> list[str]:
    """The lines of a JSON-lines text: split on "\\n" only (a trailing "\\r" dropped).

    Not `str.splitlines()`: it also splits on U+2028, U+2029, U+0085, \\x1c-\\x1e, \\v and \\f,
    which JSON allows unescaped inside strings, and would cut a valid record in two.
    """
    return [line.removesuffix("\r") for line in text.split("\n")]


def yaml_error(exc: Exception) -> str:
    """One line for a PyYAML parse error: 'line 3, column 7: mapping values are not allowed here'."""
    problem = getattr(exc, "problem", None)
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    if problem is None:
        return " ".join(str(exc).split())
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    context = getattr(exc, "context", None)
    return f"{where}{problem}" + (f" ({context})" if context else "")


# --------------------------------------------------------------------------- outputs


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name the same file: the same inode (hard links, symlinks, `./x` vs `x`), or,
    for a path that does not exist yet, the same absolute path once symlinks are resolved."""
    with contextlib.suppress(OSError):
        if os.path.samefile(a, b):
            return True
    return os.path.realpath(a) == os.path.realpath(b)


def inside(path: str | Path, directory: str | Path) -> bool:
    """Whether `path` is `directory` or lies under it, symlinks resolved."""
    if same_file(path, directory):
        return True
    child, parent = os.path.realpath(path), os.path.realpath(directory)
    return child.startswith(parent.rstrip(os.sep) + os.sep)


def refuse_inputs(
    output: str | Path,
    inputs: Mapping[str, str | Path | None],
    *,
    what: str = "output",
    fills_directory: bool = False,
) -> None:
    """Raise OutputIsInput when `output` is one of `inputs` ({"data file": path, ...}; None skipped).

    `fills_directory`: `output` is a directory the command writes into (a stage directory), so an
    input lying anywhere under it is refused too.
    """
    for label, path in inputs.items():
        if path is None:
            continue
        if same_file(output, path):
            raise OutputIsInput(
                f"{output}: the {what} is the {label} {path}; writing it would overwrite that input: "
                "give another path"
            )
        if fills_directory and inside(path, output):
            raise OutputIsInput(
                f"{output}: the {what} holds the {label} {path}; writing into it could overwrite that "
                "input: give another directory"
            )


@contextlib.contextmanager
def atomic_write(
    path: str | Path,
    mode: str = "w",
    *,
    encoding: str | None = "utf-8",
    errors: str | None = None,
    newline: str | None = None,
) -> Iterator[IO[Any]]:
    """Open `path` for writing through a temporary file renamed into place when the block ends.

    The temporary file lies in the directory of the final one (a rename within one file system is
    atomic), created with the permissions `open(path, "w")` would give (the umask), or the old file's.
    If the block raises, the temporary file is removed and the old file is untouched. A symlink is
    followed: its target is replaced, the link stays. A path that is a device or a pipe
    (`/dev/null`, `/dev/stdout`) has nothing to replace and is written directly.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write writes whole files: mode 'w' or 'wb', not {mode!r}")
    path = Path(path)
    text = {} if mode == "wb" else {"encoding": encoding, "errors": errors, "newline": newline}
    try:
        info: os.stat_result | None = os.stat(path)
    except FileNotFoundError:
        info = None
    except OSError as exc:
        raise FileProblem(f"{path}: cannot write here: {exc.strerror or exc}") from None
    if info is not None and stat.S_ISDIR(info.st_mode):
        raise FileProblem(f"{path}: is a directory: give the path of a file to write")
    if info is not None and not stat.S_ISREG(info.st_mode):
        with open(path, mode, **text) as handle:
            yield handle
        return
    target = Path(os.path.realpath(path))
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        if info is not None:
            with contextlib.suppress(OSError):
                os.chmod(fd, stat.S_IMODE(info.st_mode))
        with open(fd, mode, closefd=True, **text) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(partial)
        raise
    _sync_directory(target.parent)


def _sync_directory(directory: Path) -> None:
    # The rename is durable once the directory entry is on disk (best effort: not every FS allows it).
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_text_atomic(path: str | Path, text: str, *, encoding: str = "utf-8") -> Path:
    """Write `text` to `path` atomically (`atomic_write`); return the path."""
    with atomic_write(path, "w", encoding=encoding, newline="") as handle:
        handle.write(text)
    return Path(path)
