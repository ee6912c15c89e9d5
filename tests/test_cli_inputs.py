"""The files a user names on the command line: every kind is read through the same checks (a
directory, a FIFO, a device, a missing, non-UTF-8 or oversized file is one `error:` line naming it,
exit 2, never a hang or a traceback), no command writes over one of its own inputs (whatever the
spelling of the path: `./x`, absolute, `a/../x`, a symlink, a hard link), and outputs are replaced
atomically (a failure leaves the old file whole)."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rft.cli import app
from rft_core.config import ConfigError, RFTConfig
from rft_core.data import DataError, validate_file
from rft_core.files import (
    DATA_LIMIT,
    TEXT_LIMIT,
    FileProblem,
    atomic_write,
    jsonl_lines,
    read_bytes,
    refuse_inputs,
)

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def invoke(*args: str | Path):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(result, *fragments: str) -> str:
    """Exit 2, one `error:` line on stderr holding every fragment, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def gsm8k_rows(*numbers: int) -> str:
    return "".join(json.dumps({"question": f"Ann has {n} pens. How many?", "answer": f"So {n}.\n#### {n}"}) + "\n"
                   for n in numbers)


@pytest.fixture()
def files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory with a good data file (one bad row), config, grader, items and samples."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.jsonl").write_text(gsm8k_rows(1, 2) + json.dumps({"question": "", "answer": "#### 3"}) + "\n")
    (tmp_path / "config.yaml").write_text("data:\n  val_fraction: 0.2\ngrader:\n  file: grader.yaml\n")
    (tmp_path / "grader.yaml").write_text("type: numeric_match\nname: answer\n")
    (tmp_path / "items.jsonl").write_text('{"reference": "1"}\n{"reference": "2"}\n')
    (tmp_path / "samples.jsonl").write_text('"#### 1"\n"#### 3"\n')
    return tmp_path


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file() and not p.is_symlink()}


# --------------------------------------------------------------------------- no output over an input


def spellings(directory: Path, name: str) -> dict[str, str]:
    """Ways of naming `directory/name` (the cwd) that are all the same file."""
    (directory / "sub").mkdir(exist_ok=True)
    link, hard, linked_dir = directory / f"link-{name}", directory / f"hard-{name}", directory / "linkdir"
    if not link.is_symlink():
        link.symlink_to(name)
    if not hard.exists():
        os.link(directory / name, hard)
    if not linked_dir.is_symlink():
        linked_dir.symlink_to(directory)
    return {
        "same": name,
        "dot": f"./{name}",
        "absolute": str(directory / name),
        "dotdot": f"sub/../{name}",
        "symlink": link.name,
        "hard link": hard.name,
        "symlinked directory": f"linkdir/{name}",
    }


SPELLINGS = ["same", "dot", "absolute", "dotdot", "symlink", "hard link", "symlinked directory"]


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_validate_refuses_a_rejects_file_that_is_the_data_file(files: Path, spelling: str) -> None:
    rejects = spellings(files, "data.jsonl")[spelling]
    before = snapshot(files)
    result = invoke("validate", "data.jsonl", "--rejects", rejects)
    assert_one_line_error(result, "the rejects file is the data file", "give another path")
    assert snapshot(files) == before


@pytest.mark.parametrize(("option", "name"), [("config file", "config.yaml"), ("grader file", "grader.yaml")])
@pytest.mark.parametrize("spelling", ["dot", "symlink", "hard link"])
def test_validate_refuses_a_rejects_file_that_is_its_config_or_grader(files: Path, option: str, name: str,
                                                                       spelling: str) -> None:
    rejects = spellings(files, name)[spelling]
    before = snapshot(files)
    result = invoke("validate", "data.jsonl", "--config", "config.yaml", "--rejects", rejects)
    assert_one_line_error(result, f"is the {option}")
    assert snapshot(files) == before


def test_validate_never_deletes_an_input_as_a_stale_rejects_file(files: Path) -> None:
    """A clean file clears `<file>.rejects.jsonl` beside it: not when that is the config it was given."""
    (files / "clean.jsonl").write_text(gsm8k_rows(1, 2))
    config = files / "clean.jsonl.rejects.jsonl"
    config.write_text("data:\n  val_fraction: 0.2\n")
    result = invoke("validate", "clean.jsonl", "--config", config.name)
    assert result.exit_code == 0, result.output
    assert config.read_text() == "data:\n  val_fraction: 0.2\n"


def test_validate_file_refuses_its_own_input_as_rejects_before_reading(files: Path) -> None:
    with pytest.raises(DataError, match="the rejects file is the data file"):
        validate_file(files / "data.jsonl", rejects_path=files / "sub" / ".." / "data.jsonl")


@pytest.mark.parametrize(("target", "label"), [("samples.jsonl", "--samples file"), ("items.jsonl", "--data file"),
                                               ("grader.yaml", "--grader file")])
@pytest.mark.parametrize("spelling", SPELLINGS)
def test_grade_refuses_an_out_file_that_is_one_of_its_inputs(files: Path, target: str, label: str,
                                                             spelling: str) -> None:
    out = spellings(files, target)[spelling]
    before = snapshot(files)
    result = invoke("grade", "--grader", "grader.yaml", "--data", "items.jsonl", "--samples", "samples.jsonl",
                    "--out", out)
    assert_one_line_error(result, f"the --out file is the {label}")
    assert snapshot(files) == before


def test_grade_writes_a_new_out_file_and_replaces_an_old_one_whole(files: Path) -> None:
    out = files / "graded.jsonl"
    out.write_text("old line 1\nold line 2\nold line 3\nold line 4\n")
    out.chmod(0o640)
    result = invoke("grade", "--data", "items.jsonl", "--samples", "samples.jsonl", "--out", "graded.jsonl")
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["reward"] for line in out.read_text().splitlines()] == [1.0, 0.1]
    assert stat.S_IMODE(out.stat().st_mode) == 0o640  # the old file's permissions carry over
    assert not [p for p in files.iterdir() if p.name.endswith(".partial")]


def test_train_refuses_an_out_directory_that_is_or_holds_an_input(files: Path) -> None:
    assert_one_line_error(invoke("train", "sft", "--config", "config.yaml", "--out", "./config.yaml"),
                          "the --out directory is the config file")
    model = files / "models" / "sft"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    result = invoke("train", "rl", "--config", "config.yaml", "--init-model", str(model), "--out", "models")
    assert_one_line_error(result, "the --out directory holds the --init-model directory")
    result = invoke("train", "rl", "--config", "config.yaml", "--init-model", "models/sft", "--out", "models/sft")
    assert_one_line_error(result, "the --out directory is the --init-model directory")
    assert (model / "config.json").read_text() == "{}"


# --------------------------------------------------------------------------- atomic replacement


def test_a_failed_write_leaves_the_old_file_whole_and_no_temporary_file(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_text("the old content\n")
    for failure in (RuntimeError("grader crashed"), KeyboardInterrupt()):
        with pytest.raises(type(failure)), atomic_write(out) as handle:
            handle.write("half of the new ")
            raise failure
        assert out.read_text() == "the old content\n"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]


def test_atomic_write_follows_symlinks_keeps_modes_and_writes_devices(tmp_path: Path) -> None:
    target = tmp_path / "real.txt"
    target.write_text("old")
    target.chmod(0o600)
    link = tmp_path / "link.txt"
    link.symlink_to(target)
    with atomic_write(link) as handle:
        handle.write("new")
    assert link.is_symlink() and target.read_text() == "new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    fresh = tmp_path / "new" / "dir" / "fresh.txt"  # missing folders are made
    with atomic_write(fresh) as handle:
        handle.write("x")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o666 & ~umask
    with atomic_write("/dev/null") as handle:  # nothing to replace: written through
        handle.write("discarded")
    assert Path("/dev/null").is_char_device()
    with pytest.raises(FileProblem, match="is a directory"), atomic_write(tmp_path) as handle:
        handle.write("x")


def test_refuse_inputs_compares_files_not_spellings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "b.txt").write_text("b")
    for same in spellings(tmp_path, "a.txt").values():
        with pytest.raises(FileProblem, match="is the input"):
            refuse_inputs(same, {"input": "a.txt"})
    refuse_inputs("b.txt", {"input": "a.txt", "missing": None})
    refuse_inputs("c.txt", {"input": "a.txt"})  # a new file is nobody's input


# --------------------------------------------------------------------------- reading: one check per kind


def make_bad(directory: Path, bad: str, suffix: str) -> Path:
    """A file of kind `bad` named with `suffix`."""
    path = directory / f"bad{suffix}"
    if bad == "directory":
        path.mkdir()
    elif bad == "fifo":
        os.mkfifo(path)
    elif bad == "character device":
        return Path("/dev/zero")
    elif bad == "missing":
        pass
    elif bad == "not utf-8":
        path.write_bytes(b"caf\xe9: 1\n")
    elif bad == "utf-16":
        path.write_bytes("a: 1\n".encode("utf-16"))
    elif bad == "too large":
        with path.open("wb") as handle:  # sparse: no disk used, st_size is past the limit
            handle.truncate((DATA_LIMIT if suffix == ".jsonl" else TEXT_LIMIT) + 1)
    return path


EXPECTED = {
    "directory": "is a directory",
    "fifo": "is a FIFO (named pipe), not a regular file",
    "character device": "is a character device, not a regular file",
    "missing": "not found",
    "not utf-8": "is not UTF-8 text (byte 0xe9 at line 1, offset 3): save it as UTF-8",
    "utf-16": "is UTF-16 text: save it as UTF-8",
    "too large": "larger than the",
}

# Each kind of user-named file, the command that reads it, and whether undecodable bytes make the
# whole file unusable (in a data file they are a problem of their row only).
KINDS = {
    "config": (".yaml", lambda bad: ["validate", "data.jsonl", "--config", bad], True),
    "data": (".jsonl", lambda bad: ["validate", bad], False),
    "grader": (".yaml", lambda bad: ["grade", "--grader", bad, "--sample", "#### 1"], True),
    "grader to validate": (".yaml", lambda bad: ["grade", "--validate", bad], True),
    "items": (".jsonl", lambda bad: ["grade", "--data", bad, "--samples", "samples.jsonl"], True),
    "samples": (".jsonl", lambda bad: ["grade", "--data", "items.jsonl", "--samples", bad], True),
    "deployments": (".yaml", lambda bad: ["serve", "--prefect-file", bad], True),
}


@pytest.mark.timeout(120)  # a FIFO read without the check would block forever
@pytest.mark.parametrize("bad", list(EXPECTED))
@pytest.mark.parametrize("kind", list(KINDS))
def test_every_user_named_file_is_checked_before_it_is_read(files: Path, kind: str, bad: str) -> None:
    suffix, command, text_only_checks = KINDS[kind]
    if bad in ("not utf-8", "utf-16") and not text_only_checks:
        pytest.skip("undecodable bytes in a data file are a problem of their row (tests/test_data_validate.py)")
    path = make_bad(files, bad, suffix)
    line = assert_one_line_error(invoke(*command(str(path))), EXPECTED[bad])
    assert str(path) in line


@pytest.mark.timeout(120)
@pytest.mark.parametrize("command", ["run", "train"])
@pytest.mark.parametrize(
    ("key", "bad", "what"),
    [
        ("data.train_path", "fifo", "data file (data.train_path)"),
        ("data.train_path", "character device", "data file (data.train_path)"),
        ("data.val_path", "missing", "validation file (data.val_path)"),
        ("data.val_path", "directory", "validation file (data.val_path)"),
        ("grader.file", "fifo", "grader file (grader.file)"),
    ],
)
def test_run_and_train_check_the_files_the_config_names_before_any_stage(
    files: Path, command: str, key: str, bad: str, what: str
) -> None:
    path = make_bad(files, bad, ".jsonl")
    args = ["run"] if command == "run" else ["train", "sft"]
    result = invoke(*args, "--set", f"output_dir={files / 'out'}", "--set", f"{key}={path}")
    assert_one_line_error(result, str(path), what, EXPECTED[bad])
    assert not (files / "out").exists()  # refused before anything ran


@pytest.mark.timeout(60)
@pytest.mark.parametrize("reader", ["read_bytes", "load_items", "config", "grader", "split manifest"])
def test_library_readers_refuse_a_fifo_with_a_writer_waiting_too(tmp_path: Path, reader: str) -> None:
    """Even with a writer on the other end (a read would not block), a pipe is not a file to read whole."""
    from rft_core.data import SplitManifest, load_items
    from rft_core.graders import GraderSpecError, load_grader_spec

    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    writer = subprocess.Popen([sys.executable, "-c", f"open({str(fifo)!r}, 'w').write('{{}}\\n' * 10)"])
    try:
        call = {"read_bytes": lambda: read_bytes(fifo), "load_items": lambda: load_items(fifo),
                "config": lambda: RFTConfig.from_yaml(fifo), "grader": lambda: load_grader_spec(fifo),
                "split manifest": lambda: SplitManifest.load(fifo)}[reader]
        with pytest.raises((FileProblem, DataError, ConfigError, GraderSpecError), match="FIFO"):
            call()
    finally:
        with open(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK), "rb") as drain:  # let the writer finish
            writer.wait(timeout=30)
            drain.read()


def test_reads_are_bounded_even_when_the_size_is_not_known(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_bytes(b"a" * 2000)
    assert read_bytes(big, limit=2000) == b"a" * 2000
    with pytest.raises(FileProblem, match="larger than the"):
        read_bytes(big, limit=1999)
    # /proc files report a size of 0 whatever they hold: the bound still holds.
    with pytest.raises(FileProblem, match="more than"):
        read_bytes("/proc/self/maps", limit=10)


def test_a_config_that_is_not_a_mapping_or_not_yaml_is_one_line(files: Path) -> None:
    for text, fragment in [("- a\n- b\n", "a config is a mapping of sections, got list"),
                           ("just words\n", "a config is a mapping of sections, got str"),
                           ("data: [1\nrl: 2\n", "not valid YAML: line 2, column 3")]:
        (files / "odd.yaml").write_text(text)
        assert_one_line_error(invoke("validate", "data.jsonl", "--config", "odd.yaml"), "odd.yaml", fragment)


# --------------------------------------------------------------------------- rft serve


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("- a\n- b\n", "a deployments file is a mapping with a 'deployments:' list"),
        ("42\n", "got a YAML number"),
        ("deployments: [1\n", "not valid YAML: line 2, column 1"),
        ("deployments: 3\n", "'deployments' must be a list, got a YAML number"),
        ("deployments:\n- just-a-name\n", "deployment 1 must be a mapping with a 'name'"),
        ("deployments:\n- name: x\n", "deployment 'x' has no 'entrypoint'"),
        ("deployments:\n- name: x\n  entrypoint: a.py:f\n  schedules: [daily]\n", "'schedules' must be a list of mappings"),
        ("", "no deployments to serve"),
    ],
)
def test_serve_refuses_a_deployments_file_of_the_wrong_shape(files: Path, text: str, fragment: str) -> None:
    (files / "prefect.yaml").write_text(text)
    assert_one_line_error(invoke("serve", "--prefect-file", "prefect.yaml"), fragment)


def test_serve_names_an_entrypoint_that_cannot_be_loaded(files: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Called as a function, not through CliRunner: loading flows imports Prefect, whose log handlers
    would keep CliRunner's stderr, closed after the call (tests/test_hub_models.py says more)."""
    from flows.serve import ServeError, serve_deployments

    # A Prefect API that answers, so that no server is started.
    monkeypatch.setenv("PREFECT_API_URL", f"http://127.0.0.1:{serve_http(200, b'true')}/api")
    (files / "prefect.yaml").write_text("deployments:\n- name: x\n  entrypoint: nowhere.py:flow\n")
    with pytest.raises(ServeError, match="deployment x: cannot load its entrypoint 'nowhere.py:flow'"):
        serve_deployments(files / "prefect.yaml", say=lambda line: None)


def serve_http(status: int, body: bytes) -> int:
    """An HTTP server on a free port answering every GET with `status` and `body` (a daemon thread)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            self.send_response(status)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server.server_address[1]


def silent_listener(reply: bytes | None) -> int:
    """A TCP port that accepts connections and then says `reply` (not HTTP) or nothing at all."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)

    def serve() -> None:
        while True:
            connection, _ = sock.accept()
            if reply is not None:
                connection.sendall(reply)
                connection.close()

    threading.Thread(target=serve, daemon=True).start()
    return sock.getsockname()[1]


@pytest.mark.timeout(120)
def test_serve_refuses_a_port_taken_by_another_program(tmp_path: Path) -> None:
    """Another HTTP server, a program that answers something else, and one that never answers:
    each is named, and no Prefect server is started over it."""
    ports = {
        "answered HTTP 404": serve_http(404, b"not here"),
        "not a Prefect API's 200 true": serve_http(200, b"<html>hello</html>"),
        "no HTTP answer": silent_listener(b"SSH-2.0-OpenSSH\r\n"),
        "got no answer within": silent_listener(None),
    }
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PYTHONPATH=str(ROOT))
    for fragment, port in ports.items():
        completed = subprocess.run(
            [sys.executable, "-m", "rft", "serve", "--port", str(port)],
            capture_output=True, text=True, timeout=90, env=env, cwd=ROOT,
        )
        assert completed.returncode == 2, completed.stderr
        assert "Traceback" not in completed.stderr and "Starting a Prefect server" not in completed.stdout
        assert completed.stderr.startswith(f"error: port {port} of 127.0.0.1 is taken by a program that is not "
                                           "a Prefect server"), completed.stderr
        assert fragment in completed.stderr and "--port" in completed.stderr


def test_jsonl_lines_split_on_newline_only() -> None:
    text = '{"a": "x\u2028y"}\r\n{"b": "p\u0085q\u2029r"}\n'
    assert [json.loads(line) for line in jsonl_lines(text) if line] == [{"a": "x\u2028y"}, {"b": "p\u0085q\u2029r"}]
    # Every other separator str.splitlines() knows stays inside its line.
    assert jsonl_lines("a\x1cb\x1dc\x1ed\x0be\x0cf\rg\nh") == ["a\x1cb\x1dc\x1ed\x0be\x0cf\rg", "h"]


def test_the_doctests_of_the_files_module() -> None:
    import doctest

    import rft_core.files

    assert doctest.testmod(rft_core.files).failed == 0
