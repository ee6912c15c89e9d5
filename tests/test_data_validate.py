"""Bad input is reported by file, line, field and reason, kept in the rejects file, and never crashes."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rft.cli import app
from rft_core.config import ColumnsConfig, DataConfig
from rft_core.data import DataError, load_items, validate_file
from rft_core.data import validate as validate_module

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"
runner = CliRunner()

# (line, field, reason) of every problem in examples/data/bad_rows.jsonl, one row per case.
BAD_ROWS_PROBLEMS = [
    (2, None, "malformed JSON: Expecting ',' delimiter (column 132)"),
    (3, "answer", "missing"),
    (4, "question", "is empty"),
    (5, "question", "must be text, got number"),
    (6, "question", "invalid UTF-8 (byte 0xff at offset 58)"),
    (7, "answer", "does not end in '#### <number>'"),
    (8, "question", "duplicate prompt (first at line 1)"),
]


@pytest.fixture()
def bad_rows(tmp_path) -> Path:
    return Path(shutil.copy(EXAMPLES / "bad_rows.jsonl", tmp_path / "bad_rows.jsonl"))


def jsonl_bytes(*records: dict | bytes) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in records)


def good(i: int) -> dict:
    return {"question": f"Ann has {i} pens. How many pens does Ann have?", "answer": f"Ann: {i}.\n#### {i}"}


# --------------------------------------------------------------------------- each bad-input case


def test_each_bad_row_case_is_reported_with_file_line_field_and_reason(bad_rows):
    report = validate_file(bad_rows)
    assert (report.rows, report.valid, report.rejected) == (9, 2, 7)
    assert report.valid + report.rejected == report.rows
    assert [(p.line, p.field, p.reason) for p in report.problems] == BAD_ROWS_PROBLEMS
    assert {p.file for p in report.problems} == {str(bad_rows)}
    assert report.frame["prompt"].str.startswith(("Ann has 3", "Kim has 7")).all()


def test_rejects_file_keeps_every_rejected_row_raw(bad_rows):
    report = validate_file(bad_rows)
    assert report.rejects_path == bad_rows.with_name("bad_rows.jsonl.rejects.jsonl")
    lines = report.rejects_path.read_text(encoding="utf-8").splitlines()
    rejects = [json.loads(line) for line in lines]
    assert len(rejects) == report.rejected == 7
    assert [r["line"] for r in rejects] == [2, 3, 4, 5, 6, 7, 8]
    assert rejects[1]["problems"] == [{"field": "answer", "reason": "missing"}]
    original = bad_rows.read_bytes().split(b"\n")
    assert rejects[0]["raw"] == original[1].decode()  # the malformed line, verbatim
    # Invalid UTF-8: shown with \xff for people, exact bytes in raw_base64 so nothing is lost.
    assert "\\xff" in rejects[4]["raw"]
    assert base64.b64decode(rejects[4]["raw_base64"]) == original[5]


def test_every_problem_of_a_row_is_reported_in_one_run(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(jsonl_bytes({"question": "  "}, {"question": 7, "answer": ["#### 1"]}, good(1)))
    result = load_items(path)
    assert (result.rows, result.valid, result.rejected) == (3, 1, 2)
    assert sorted((p.line, p.field, p.reason) for p in result.problems) == [
        (1, "answer", "missing"),
        (1, "question", "is empty"),
        (2, "answer", "must be text, got array"),
        (2, "question", "must be text, got number"),
    ]
    assert [len(r.problems) for r in result.rejects] == [2, 2]


def test_bom_crlf_and_blank_lines_are_accepted_and_lines_stay_physical(tmp_path):
    path = tmp_path / "d.jsonl"
    body = jsonl_bytes(good(1), good(2)).replace(b"\n", b"\r\n")
    path.write_bytes(b"\xef\xbb\xbf" + body + b"\r\n   \r\n" + jsonl_bytes({"question": "q?"}).replace(b"\n", b"\r\n"))
    result = load_items(path)
    assert (result.rows, result.valid, result.rejected) == (3, 2, 1)
    assert [(p.line, p.field) for p in result.problems] == [(5, "answer")]
    assert result.frame.iloc[0]["reference"] == "1"


def test_a_bad_first_copy_does_not_take_a_good_duplicate_down(tmp_path):
    path = tmp_path / "d.jsonl"
    bad_first = {**good(1), "answer": "no number here"}
    path.write_bytes(jsonl_bytes(bad_first, good(1), good(1)))
    result = load_items(path)
    assert (result.valid, result.rejected) == (1, 2)
    assert [(p.line, p.reason) for p in result.problems] == [
        (1, "does not end in '#### <number>'"),
        (3, "duplicate prompt (first at line 2)"),
    ]


def test_duplicate_ids_are_rejected_after_the_first(tmp_path):
    path = tmp_path / "r.json"
    items = [{"item_id": "x", "question": f"q{i}?", "answer_value": str(i)} for i in range(3)]
    items[2]["item_id"] = "x"
    items[1]["item_id"] = "y"
    path.write_text(json.dumps(items, indent=1), encoding="utf-8")
    result = load_items(path)
    [problem] = result.problems
    assert (problem.index, problem.field, problem.reason) == (2, "item_id", "duplicate id 'x' (first at item 0 (line 2))")


def test_numeric_references_are_required_only_when_asked(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_bytes(jsonl_bytes(
        {"messages": [{"role": "user", "content": "Colour of the sky?"}], "answer": "blue"},
        {"messages": [{"role": "user", "content": "Legs of a cat?"}], "answer": "It has 4 legs."},
    ))
    assert load_items(path).valid == 2
    numeric = load_items(path, numeric=True)
    assert (numeric.valid, numeric.rejected) == (1, 1)
    [problem] = numeric.problems
    assert (problem.line, problem.field) == (1, "answer")
    assert problem.reason.startswith("has no numeric final answer: 'blue'")


def test_csv_invalid_utf8_and_ragged_rows_name_line_and_column(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b"prompt,reference\nfine?,1\nbad \xe9 byte?,2\nshort\nok?,3,extra\n")
    result = load_items(path)
    assert (result.rows, result.valid, result.rejected) == (4, 1, 3)
    assert [(p.line, p.field, p.reason) for p in result.problems] == [
        (3, "prompt", "invalid UTF-8 bytes"),
        (4, None, "row has 1 fields, the header has 2"),
        (4, "reference", "missing"),
        (5, None, "row has 3 fields, the header has 2"),
    ]
    assert result.rejects[0].raw_bytes == b"bad \xe9 byte?,2"


def test_counts_add_up_on_a_mix_of_everything(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(jsonl_bytes(good(1), b"{", b"[1, 2]", b"\xff\xfe{}", good(2), good(2), {"question": "q", "answer": 5}))
    result = load_items(path)
    assert (result.rows, result.valid, result.rejected) == (7, 2, 5)
    assert [p.reason for p in result.problems][:3] == [
        "malformed JSON: Expecting property name enclosed in double quotes (column 2)",
        "not a JSON object (got array)",
        "invalid UTF-8 (byte 0xff at offset 0)",
    ]


# --------------------------------------------------------------------------- invisible text

INVISIBLE = {
    "zero-width space": "\u200b",
    "zero-width joiners": "\u200c\u200d",
    "word joiner and BOM": "\u2060\ufeff",
    "bidi marks and spaces": " \u200e\u200f\u202a\u2066 ",
    "soft hyphen, no-break space": "\u00ad\u00a0",
    "Hangul fillers": "\u3164\u115f\uffa0",
    "variation selectors": "\ufe0f\U000e0100",
    "tag characters": "\U000e0041\U000e007f",
    "line and paragraph separators": "\u2028\u2029\u0085",
    "control characters": "\x07\x1b",
}


def rows_with(text: str) -> dict[str, tuple[str, bytes, str]]:
    """Per field and format: (file name, content whose row 1 has `text` in that field, field reported)."""
    q, a = "Ann has 2 pens. How many?", "So 2.\n#### 2"
    user = lambda content: [{"role": "user", "content": content}]  # noqa: E731
    return {
        "gsm8k question": ("g.jsonl", jsonl_bytes({"question": text, "answer": a}, good(3)), "question"),
        "gsm8k answer": ("g.jsonl", jsonl_bytes({"question": q, "answer": text}, good(3)), "answer"),
        "openai message": ("o.jsonl", jsonl_bytes({"messages": user(text), "reference": "2"},
                                                  {"messages": user(q), "reference": "2"}), "messages"),
        "openai content parts": ("o.jsonl", jsonl_bytes({"messages": user([{"type": "text", "text": text}]),
                                                         "reference": "2"},
                                                        {"messages": user(q), "reference": "2"}), "messages"),
        "openai reference": ("o.jsonl", jsonl_bytes({"messages": user(q), "reference": text},
                                                    {"messages": user("Bo has 3?"), "reference": "3"}), "reference"),
        "openai id": ("o.jsonl", jsonl_bytes({"id": text, "messages": user(q), "reference": "2"},
                                             {"id": "b", "messages": user("Bo has 3?"), "reference": "3"}), "id"),
        "reft question": ("r.json", json.dumps([{"item_id": "a", "question": text, "answer_cot": "x",
                                                 "answer_value": 2},
                                                {"item_id": "b", "question": q, "answer_cot": "x",
                                                 "answer_value": 2}]).encode(), "question"),
        "csv prompt": ("c.csv", f"prompt,reference\n\"{text}\",2\n{q},2\n".encode(), "prompt"),
    }


@pytest.mark.parametrize("field", list(rows_with("x")))
@pytest.mark.parametrize("invisible", list(INVISIBLE))
def test_text_of_only_invisible_characters_is_empty_named_by_file_row_and_field(tmp_path, invisible, field):
    text = INVISIBLE[invisible]
    if field.startswith("csv") and any(c in text for c in "\u2028\u2029\u0085\r\n"):
        text = text.replace("\u2028", "").replace("\u2029", "").replace("\u0085", "") or "\u200b"
    name, content, reported = rows_with(text)[field]
    path = tmp_path / name
    path.write_bytes(content)
    result = load_items(path, numeric=False)
    assert (result.rows, result.valid, result.rejected) == (2, 1, 1), [str(p) for p in result.problems]
    [problem] = result.problems
    assert (problem.file, problem.field) == (str(path), reported)
    assert problem.line == (2 if name.endswith(".csv") else 1) and "empty" in problem.reason
    if text.strip():
        assert "only invisible characters (U+" in problem.reason


def test_visible_text_with_invisible_characters_in_it_is_kept_and_an_invisible_solution_is_none(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(jsonl_bytes({"question": "Ann\u200b has 2 pens?", "answer": "#### 2"},
                                 {"question": "Bo has 3 pens?", "answer": "\u200b\u2060\n#### 3"}))
    frame = load_items(path).frame
    assert list(frame["prompt"]) == ["Ann\u200b has 2 pens?", "Bo has 3 pens?"]
    assert list(frame["solution"]) == [None, None]  # an invisible worked solution is no solution


def test_the_item_frame_contract_refuses_an_invisible_prompt():
    from rft_core.data import canonical_frame, validate_items

    frame = canonical_frame([{"id": "a", "prompt": "\u200b\ufeff", "reference": "1"}])
    with pytest.raises(DataError, match="prompt: is empty"):
        validate_items(frame)


# --------------------------------------------------------------------------- fatal errors


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.jsonl", b"", "the file is empty"),
        ("blank.jsonl", b"\xef\xbb\xbf \r\n\n", "the file is empty"),
        ("image.jsonl", b"\x89PNG\r\n\x1a\n" + bytes(range(256)), "not a data file: it looks like a PNG image"),
        ("prose.jsonl", b"Dear reader,\nthis is a letter.\n", "not a data file: no line is a JSON object"),
        ("numbers.jsonl", b"1\n2\n", "not a data file: no line is a JSON object"),
        ("empty.json", b"[]", "no rows (the JSON array is empty)"),
        ("header.csv", b"prompt,reference\n", "the CSV file has a header but no rows"),
        ("wide.json", "[{}]".encode("utf-16"), "UTF-16 text"),
        ("fake.parquet", b"not parquet at all", "not a readable Parquet file"),
    ],
)
def test_a_file_that_is_not_data_is_one_clear_error_naming_it(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as err:
        load_items(path)
    assert str(path) in str(err.value)
    assert message in str(err.value)


def test_missing_file_and_directory_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_items(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="is a directory"):
        load_items(tmp_path)


# --------------------------------------------------------------------------- rejects location


def test_rejects_go_to_the_cwd_when_the_data_folder_is_read_only(bad_rows, tmp_path, monkeypatch):
    cwd = tmp_path / "work"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    real_access = validate_module.os.access
    monkeypatch.setattr(
        validate_module.os, "access", lambda p, mode: False if Path(p) == bad_rows.parent else real_access(p, mode)
    )
    report = validate_file(bad_rows)
    assert report.rejects_path == cwd / "bad_rows.jsonl.rejects.jsonl"
    assert len(report.rejects_path.read_text().splitlines()) == 7


def test_a_clean_file_leaves_no_rejects_and_clears_a_stale_one(tmp_path):
    path = tmp_path / "clean.jsonl"
    path.write_bytes(jsonl_bytes(good(1), good(2)))
    stale = tmp_path / "clean.jsonl.rejects.jsonl"
    stale.write_text('{"old": true}\n')
    report = validate_file(path)
    assert report.ok and report.rejects_path is None and not stale.exists()
    explicit = validate_file(path, rejects_path=tmp_path / "out" / "r.jsonl")
    assert explicit.rejects_path.read_text() == ""  # asked for by name: written, empty


# --------------------------------------------------------------------------- the CLI


def test_cli_exit_0_when_every_row_is_valid():
    result = runner.invoke(app, ["validate", str(EXAMPLES / "sample_openai.jsonl")])
    assert result.exit_code == 0, result.output
    assert "10 rows, 10 valid, all rows valid" in result.stdout


def test_cli_exit_1_and_readable_report_when_rows_are_rejected(bad_rows, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["validate", str(bad_rows)])
    assert result.exit_code == 1
    assert "9 rows, 2 valid, 7 rejected" in result.stdout
    assert "does not end in '#### <number>'" in result.stdout
    assert "rejected rows written to" in result.stdout and "bad_rows.jsonl.rejects.jsonl" in result.stdout


def test_cli_writes_rejects_where_outputs_go_not_beside_the_data_and_says_where(bad_rows, tmp_path, monkeypatch):
    """Default: `<output_dir>/rejects/` (rft_runs under the working directory, or the config's
    output_dir), printed whole; the data's directory (a clone of a repository, a shared data set)
    gets nothing; a clean file clears a stale rejects file there."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    before = sorted(p.name for p in bad_rows.parent.iterdir())
    result = runner.invoke(app, ["validate", str(bad_rows)])
    expected = work / "rft_runs" / "rejects" / "bad_rows.jsonl.rejects.jsonl"
    assert result.exit_code == 1 and f"rejected rows written to {expected}\n" in result.stdout
    assert len(expected.read_text().splitlines()) == 7
    assert sorted(p.name for p in bad_rows.parent.iterdir()) == before
    config = tmp_path / "config.yaml"
    config.write_text(f"output_dir: {tmp_path / 'elsewhere'}\n")
    result = runner.invoke(app, ["validate", str(bad_rows), "--config", str(config)])
    assert f"rejected rows written to {tmp_path / 'elsewhere' / 'rejects' / 'bad_rows.jsonl.rejects.jsonl'}" in result.stdout
    clean = tmp_path / "bad_rows.jsonl"  # the same name, now clean: the old rejects would mislead
    clean.write_bytes(jsonl_bytes(good(1), good(2)))
    assert runner.invoke(app, ["validate", str(clean)]).exit_code == 0
    assert not expected.exists()


def test_cli_json_report(bad_rows, tmp_path):
    rejects = tmp_path / "r.jsonl"
    result = runner.invoke(app, ["validate", str(bad_rows), "--json", "--rejects", str(rejects)])
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert {k: report[k] for k in ("file", "format", "rows", "valid", "rejected", "rejects_path", "numeric")} == {
        "file": str(bad_rows), "format": "gsm8k", "rows": 9, "valid": 2, "rejected": 7,
        "rejects_path": str(rejects), "numeric": True,
    }
    assert [(p["line"], p["field"], p["reason"]) for p in report["problems"]] == BAD_ROWS_PROBLEMS
    assert len(rejects.read_text().splitlines()) == 7


def test_cli_exit_2_on_a_fatal_error_with_the_message_on_stderr(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    result = runner.invoke(app, ["validate", str(empty), "--json"])
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr == f"error: {empty}: the file is empty\n"
    unknown = runner.invoke(app, ["validate", str(EXAMPLES / "sample_gsm8k.jsonl"), "--format", "xml"])
    assert unknown.exit_code == 2 and "unknown format 'xml'" in unknown.stderr


def test_cli_numeric_switch_and_forced_format(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_bytes(jsonl_bytes({"messages": [{"role": "user", "content": "Sky?"}], "label": "blue"}))
    numeric = runner.invoke(app, ["validate", str(path), "--format", "openai", "--json"])
    assert numeric.exit_code == 1  # the default grader is numeric_match: "blue" cannot score
    text = runner.invoke(app, ["validate", str(path), "--format", "openai", "--no-numeric", "--json"])
    assert text.exit_code == 0 and json.loads(text.stdout)["valid"] == 1


def test_cli_config_sets_csv_columns(tmp_path):
    data = tmp_path / "d.csv"
    data.write_text("q,a\nWhat is 1+1?,2\n", encoding="utf-8")
    config = tmp_path / "cfg.yaml"
    config.write_text("data:\n  columns:\n    prompt: q\n    reference: a\n", encoding="utf-8")
    assert runner.invoke(app, ["validate", str(data)]).exit_code == 2
    result = runner.invoke(app, ["validate", str(data), "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert load_items(data, DataConfig(columns=ColumnsConfig(prompt="q", reference="a"))).valid == 1


def test_rft_validate_as_a_real_command(bad_rows):
    rft = Path(sys.executable).with_name("rft")
    command = [str(rft)] if rft.exists() else [sys.executable, "-m", "rft"]
    proc = subprocess.run([*command, "validate", str(bad_rows), "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    report = json.loads(proc.stdout)
    assert (report["rows"], report["valid"], report["rejected"]) == (9, 2, 7)
    assert "Traceback" not in proc.stderr


def test_cli_adds_its_own_option_to_a_library_error_that_names_a_setting(tmp_path):
    path = tmp_path / "items.txt"
    path.write_text("prompt,reference\nWhat is 1+1?,2\n", encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_items(path)
    assert err.value.setting == "data.format" and "--format" not in str(err.value)
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    assert "set data.format" in result.stderr and "On the command line: --format FORMAT." in result.stderr
