"""`rft grade`: one sample, files of items and samples, --validate, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from rft.grade import grade_cmd

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "graders"
runner = CliRunner()


def invoke(*args: str):
    app = typer.Typer()
    app.command()(grade_cmd)
    return runner.invoke(app, list(args))


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_one_sample_prints_the_result_json():
    result = invoke("--grader", str(EXAMPLES / "numeric_match.yaml"), "--item", '{"reference": "18"}',
                    "--sample", "9 * 2 = 18\n#### 17")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"reward": 0.1, "sub_rewards": {}, "errors": []}


def test_one_sample_with_the_default_grader_and_a_multi_grader():
    assert json.loads(invoke("--item", '{"reference": 18}', "--sample", "#### 18").stdout)["reward"] == 1.0
    result = invoke("--grader", str(EXAMPLES / "multi.yaml"), "--item", '{"reference": 18}', "--sample", "It is 18")
    assert json.loads(result.stdout) == {"reward": 0.9, "sub_rewards": {"answer": 1.0, "format": 0.0}, "errors": []}


def test_an_error_result_is_printed_with_its_reason_and_exits_1():
    result = invoke("--item", '{"answer": 18}', "--sample", "#### 18")
    assert result.exit_code == 1
    output = json.loads(result.stdout)
    assert output["reward"] is None and "template field 'item.reference' not found" in output["errors"][0]


def test_a_judge_endpoint_that_cannot_be_reached_is_an_error_grade_and_exit_1(tmp_path):
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    spec = json.loads((EXAMPLES / "score_model.json").read_text())
    grader = tmp_path / "judge.json"
    grader.write_text(json.dumps({**spec, "base_url": f"http://127.0.0.1:{port}/v1"}))
    result = invoke("--grader", str(grader), "--item", '{"reference": "18"}', "--sample", "#### 18")
    assert result.exit_code == 1, result.output
    output = json.loads(result.stdout)
    assert output["reward"] is None and f"127.0.0.1:{port}" in output["errors"][0]


def test_files_print_a_summary_and_write_rows(tmp_path):
    grader = tmp_path / "g.json"
    grader.write_text(json.dumps({"type": "numeric_match", "name": "n", "partial_credit": 0.1}))
    data = write_jsonl(tmp_path / "items.jsonl", [{"reference": 1}, {"reference": 2}, {"reference": "x"}])
    samples = write_jsonl(tmp_path / "samples.jsonl", [{"output_text": "#### 1"}, "#### 3", "#### 5"])
    out = tmp_path / "out" / "graded.jsonl"
    result = invoke("--grader", str(grader), "--data", str(data), "--samples", str(samples), "--out", str(out))
    assert result.exit_code == 1, result.output  # one grade of three is an error
    assert "graded: 3" in result.stdout and "mean reward: 0.5500" in result.stdout
    assert "errors: 1 (33.3%)" in result.stdout and "holds no number" in result.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["index"], r["reward"]) for r in rows] == [(0, 1.0), (1, 0.1), (2, None)]
    assert rows[2]["errors"][0].startswith("n: the reference 'x' holds no number")


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\u0085", "\x1c", "\x1d", "\x1e", "\x0b", "\x0c"])
def test_files_split_lines_on_newline_only(tmp_path, separator):
    """str.splitlines() also splits on these; JSON allows the first three unescaped inside strings, and
    the rest escaped as \\u001c etc. A line is a record however its strings read."""
    raw = separator if separator in "\u2028\u2029\u0085" else json.dumps(separator)[1:-1]
    data = tmp_path / "items.jsonl"
    data.write_text(f'{{"reference": "1", "note": "a{raw}b"}}\n{{"reference": "2"}}\n', encoding="utf-8")
    samples = tmp_path / "samples.jsonl"
    samples.write_text(f'"line one{raw}#### 1"\n{{"output_text": "x{raw}#### 2"}}\n', encoding="utf-8")
    out = tmp_path / "graded.jsonl"
    result = invoke("--data", str(data), "--samples", str(samples), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "graded: 2" in result.stdout and "mean reward: 1.0000" in result.stdout
    assert [json.loads(line)["index"] for line in out.read_text(encoding="utf-8").split("\n") if line] == [0, 1]


def test_files_through_the_data_layer_for_csv(tmp_path):
    data = tmp_path / "items.csv"
    data.write_text("prompt,reference\nWhat is 2+2?,4\nWhat is 3+3?,6\n")
    samples = write_jsonl(tmp_path / "samples.jsonl", ["#### 4", "#### 7"])
    result = invoke("--data", str(data), "--samples", str(samples))
    assert result.exit_code == 0, result.output
    # No --grader: the default grader, numeric_match with ReFT's partial credit 0.1 (1.0 and 0.1).
    assert "mean reward: 0.5500" in result.stdout


def test_validate_exit_codes(tmp_path):
    ok = invoke("--validate", str(EXAMPLES / "multi.yaml"))
    assert ok.exit_code == 0 and "valid:" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("type: multi\ngraders:\n  a: {type: rank}\ncalculate_output: 'a + b'\n")
    invalid = invoke("--validate", str(bad))
    assert invalid.exit_code == 1
    assert "unknown sub-grader(s) b" in invalid.stdout
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    assert invoke("--validate", str(broken)).exit_code == 1
    assert invoke("--validate", str(tmp_path / "missing.yaml")).exit_code == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sample", "x", "--item", "{bad"], "--item is not valid JSON"),
        (["--sample", "x", "--item", "[1]"], "--item should be a JSON object"),
        (["--item", "{}"], "--item needs --sample"),
        ([], "give either --sample"),
        (["--grader", "missing.yaml", "--sample", "x"], "grader file not found"),
        (["--data", "items.jsonl"], "--data and --samples go together"),
        (["--data", "items.jsonl", "--samples", "two.jsonl"], "has 1 items but"),
        (["--data", "items.jsonl", "--samples", "nope.jsonl"], "samples file"),
        (["--data", "bad.jsonl", "--samples", "two.jsonl"], "bad.jsonl:2: not valid JSON"),
        (["--grader", "invalid.json", "--sample", "x"], "operation 'is' is not one of"),
        (["--validate", "invalid.json", "--sample", "x"], "--validate checks a spec"),
    ],
)
def test_unusable_input_exits_2_with_a_message_and_no_traceback(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "items.jsonl", [{"reference": 1}])
    write_jsonl(tmp_path / "two.jsonl", ["a", "b"])
    (tmp_path / "bad.jsonl").write_text('{"reference": 1}\n{oops\n')
    (tmp_path / "invalid.json").write_text(json.dumps({"type": "string_check", "input": "a", "reference": "b",
                                                       "operation": "is"}))
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert "Traceback" not in result.output


def test_rft_grade_runs_as_a_real_command(tmp_path):
    rft = Path(sys.executable).with_name("rft")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    completed = subprocess.run(
        [str(rft), "grade", "--grader", str(EXAMPLES / "python.json"), "--item", '{"reference": "100"}',
         "--sample", "The total is 102"],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path,
    )
    assert completed.returncode == 0, completed.stderr
    result = json.loads(completed.stdout)
    assert result == {"reward": pytest.approx(0.6), "sub_rewards": {}, "errors": []}  # 2% off, 5% allowed


@pytest.mark.parametrize(
    ("sample", "reference", "reward"),
    [
        ("#### 1e5", "1", 0.1),  # was read as 1
        ("#### 1e5", "100000", 1.0),
        ("#### 2^{10}", "2", 0.1),  # was read as 2
        ("#### 2^{10}", "1024", 1.0),
        ("#### 1e5e5", "1", 0.0),  # unreadable: no answer, no partial credit
    ],
)
def test_the_default_grader_reads_answers_whole(sample, reference, reward):
    result = invoke("--item", json.dumps({"reference": reference}), "--sample", sample)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"reward": reward, "sub_rewards": {}, "errors": []}


SLOW_IMPORT_GRADERS = {
    "sleep": "import time\ntime.sleep(1000)\ndef grade(sample, item):\n    return 1.0\n",
    "loop": "while True:\n    pass\ndef grade(sample, item):\n    return 1.0\n",
}


def _can_isolate() -> bool:
    """Whether the kernel isolates python graders here (their default sandbox mode)."""
    from rft_core.graders import build_grader
    from rft_core.graders.python_grader import SandboxUnavailable

    try:
        build_grader({"type": "python", "source": "def grade(s, i):\n    return 1.0\n"}).close()
    except SandboxUnavailable:
        return False
    return True


@pytest.mark.parametrize("slow", sorted(SLOW_IMPORT_GRADERS))
def test_timeout_s_bounds_a_grader_whose_import_never_ends(tmp_path, slow):
    if not _can_isolate():
        pytest.skip("no kernel isolation here; the library tests cover sandbox 'none'")
    grader = tmp_path / "slow.json"
    grader.write_text(json.dumps({"type": "python", "name": "slow", "source": SLOW_IMPORT_GRADERS[slow]}))
    data = write_jsonl(tmp_path / "items.jsonl", [{"reference": 1}] * 3)
    samples = write_jsonl(tmp_path / "samples.jsonl", ["#### 1"] * 3)
    runs = [
        ["--grader", str(grader), "--timeout-s", "1", "--item", "{}", "--sample", "x"],
        ["--grader", str(grader), "--timeout-s", "1", "--item", "{}", "--sample", "y"],
        ["--grader", str(grader), "--timeout-s", "1", "--data", str(data), "--samples", str(samples)],
    ]
    for args in runs:  # three calls, as a user would make them
        result = invoke(*args)
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output
        assert result.stderr.count("\n") == 1  # one line
        assert "did not load within the 1 s time limit (grader.timeout_s, --timeout-s)" in result.stderr
        assert "module-level code (imports, set-up)" in result.stderr


def test_timeout_s_bounds_a_slow_import_through_the_real_command(tmp_path):
    rft = Path(sys.executable).with_name("rft")
    grader = tmp_path / "slow.json"
    grader.write_text(json.dumps({"type": "python", "name": "slow", "source": SLOW_IMPORT_GRADERS["sleep"]}))
    data = write_jsonl(tmp_path / "items.jsonl", [{"reference": 1}] * 3)
    samples = write_jsonl(tmp_path / "samples.jsonl", ["#### 1"] * 3)
    args = [str(rft), "grade", "--grader", str(grader), "--timeout-s", "2", "--data", str(data),
            "--samples", str(samples)]
    if not _can_isolate():
        pytest.skip("no kernel isolation here; the library tests cover sandbox 'none'")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    # The bound is the 1000 s the grader would sleep, three times over; it stops after one 2 s limit.
    completed = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert completed.returncode == 2, completed.stderr
    assert completed.stdout == ""
    assert completed.stderr.startswith("error: ") and completed.stderr.count("\n") == 1
    assert "did not load within the 2 s time limit" in completed.stderr


def _deep_multi_json(levels: int) -> str:
    return '{"type": "multi", "calculate_output": "inner", "graders": {"inner": ' * levels + '{"type": "rank"}' + "}}" * levels


@pytest.mark.parametrize(
    ("name", "text", "problem"),
    [
        ("deep-formula.yaml", "type: multi\ngraders:\n  a: {type: rank}\ncalculate_output: '" + "(" * 4000 + "a"
         + ")" * 4000 + "'\n", "nested deeper than the limit of 64 levels"),
        ("long-formula.yaml", "type: multi\ngraders:\n  a: {type: rank}\ncalculate_output: '" + "(" * 5000 + "a"
         + ")" * 5000 + "'\n", "longer than the limit of 10000 characters"),
        ("deep-multi.json", _deep_multi_json(100), "nests deeper than the limit of 32 levels"),
        ("deeper-multi.json", _deep_multi_json(5000), "nested too deeply to read"),
        ("big-template.yaml", "type: string_check\noperation: eq\nreference: x\ninput: '" + "x" * 200_000 + "'\n",
         "over the limit of 100000"),
    ],
)
def test_validate_refuses_specs_over_the_limits_in_one_line(tmp_path, name, text, problem):
    path = tmp_path / name
    path.write_text(text)
    result = invoke("--validate", str(path))
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert result.stdout.count("\n") == 1 and result.stdout.startswith("invalid: ")
    assert problem in result.stdout and len(result.stdout) < 400
    ran = invoke("--grader", str(path), "--sample", "x")  # running it: unusable input, exit 2, one line
    assert ran.exit_code == 2 and "Traceback" not in ran.output
    assert ran.stderr.count("\n") == 1 and problem in ran.stderr
