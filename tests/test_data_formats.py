"""Loaders, format detection and the canonical frame: every format reads into the same columns."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rft_core.config import ColumnsConfig, DataConfig
from rft_core.data import (
    CANONICAL_COLUMNS,
    DataError,
    detect_format,
    frame_digest,
    item_dict,
    load_items,
    read_items,
    split_gsm8k_answer,
    write_items,
)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


NATALIA = {
    "question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
    "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72",
}


def chat(*turns: tuple[str, str]) -> list[dict]:
    return [{"role": role, "content": content} for role, content in turns]


# --------------------------------------------------------------------------- GSM8K


def test_gsm8k_jsonl_becomes_canonical_frame_with_solution_and_reference(tmp_path):
    path = write_jsonl(tmp_path / "gsm.jsonl", [NATALIA, {"question": "What is 2+3?", "answer": "#### 5"}])
    result = load_items(path)
    frame = result.frame
    assert result.format == "gsm8k" and result.rows == 2 and result.valid == 2 and result.rejected == 0
    assert list(frame.columns[:5]) == list(CANONICAL_COLUMNS)
    assert [str(frame[c].dtype) for c in CANONICAL_COLUMNS] == ["string", "string", "object", "string", "object"]
    assert frame["id"].dtype == pd.StringDtype("pyarrow")
    first = frame.iloc[0]
    assert first["prompt"] == NATALIA["question"]
    assert first["reference"] == "72"
    assert first["solution"] == (
        "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether in April and May."
    )
    assert first["messages"] is None
    assert first["answer"] == NATALIA["answer"]  # original fields stay for graders
    # An answer that is only "#### v" has no worked solution: None, not NaN or "".
    assert frame.iloc[1]["solution"] is None and frame.iloc[1]["reference"] == "5"
    # Ids without an id field are a hash of the prompt: stable across reorderings of the file.
    assert len(first["id"]) == 12
    reordered = load_items(write_jsonl(tmp_path / "rev.jsonl", [{"question": "What is 2+3?", "answer": "#### 5"}, NATALIA]))
    assert set(reordered.frame["id"]) == set(frame["id"])


def test_calculator_annotations_are_kept_when_stripping_is_off(tmp_path):
    path = write_jsonl(tmp_path / "gsm.jsonl", [NATALIA])
    kept = load_items(path, DataConfig(strip_calculator_annotations=False)).frame
    assert "<<48/2=24>>24" in kept.iloc[0]["solution"]


def test_split_gsm8k_answer_explains_malformed_answers():
    assert split_gsm8k_answer("It is 7.\n#### 7") == ("It is 7.", "7", None)
    assert split_gsm8k_answer("#### 1,450,000") == (None, "1,450,000", None)
    assert split_gsm8k_answer("It is seven.")[2] == "does not end in '#### <number>'"
    assert split_gsm8k_answer("#### seven")[2] == "the final answer after '####' is not a number: 'seven'"
    assert split_gsm8k_answer("#### 7\nthen more text")[2] == "does not end in '#### <number>'"


# --------------------------------------------------------------------------- OpenAI chat


def test_openai_prompt_is_last_user_message_and_other_keys_stay_for_graders(tmp_path):
    records = [
        {
            "id": "a",
            "messages": chat(("system", "Be brief."), ("user", "How many legs has a cat?")),
            "reference_answer": "4",
            "difficulty": "easy",
            "tools": [{"type": "function", "function": {"name": "calc"}}],
        },
        {
            "messages": [{"role": "user", "content": [{"type": "text", "text": "Two plus two?"}]}],
            "label": 4,
        },
    ]
    result = load_items(write_jsonl(tmp_path / "chat.jsonl", records))
    frame = result.frame
    assert result.format == "openai" and result.valid == 2
    assert frame.iloc[0]["prompt"] == "How many legs has a cat?"
    assert frame.iloc[0]["messages"] == records[0]["messages"]
    assert frame.iloc[0]["reference"] == "4" and frame.iloc[0]["id"] == "a"
    assert frame.iloc[1]["prompt"] == "Two plus two?"  # text parts of a content list
    assert frame.iloc[1]["reference"] == "4"  # a number is a fine reference, kept as text
    item = item_dict(frame.iloc[0])
    assert item == {
        "id": "a",
        "prompt": "How many legs has a cat?",
        "reference": "4",
        "solution": None,
        "reference_answer": "4",
        "difficulty": "easy",
        "label": None,
    }
    assert "messages" not in item and "tools" not in item
    assert frame.iloc[0]["tools"] == records[0]["tools"]  # kept in the frame, hidden from graders


def test_openai_reference_field_follows_columns_reference_then_the_known_names(tmp_path):
    record = {"messages": chat(("user", "q?")), "label": "B", "answer": "A", "gold": "C"}
    path = write_jsonl(tmp_path / "chat.jsonl", [record])
    assert load_items(path).frame.iloc[0]["reference"] == "A"  # answer comes before label
    configured = DataConfig(columns=ColumnsConfig(reference="gold"))
    frame = load_items(path, configured).frame
    assert frame.iloc[0]["reference"] == "C"
    assert item_dict(frame.iloc[0])["gold"] == "C"  # the source field is still there for graders


def test_openai_field_named_like_a_canonical_column_is_kept_as_original(tmp_path):
    record = {"messages": chat(("user", "Real question?")), "reference_answer": "1", "prompt": "old prompt"}
    frame = load_items(write_jsonl(tmp_path / "chat.jsonl", [record])).frame
    assert frame.iloc[0]["prompt"] == "Real question?"
    assert frame.iloc[0]["original_prompt"] == "old prompt"


def test_openai_bad_chats_are_row_problems_with_the_messages_field(tmp_path):
    records = [
        {"messages": chat(("user", "ok?")), "answer": "1"},
        {"messages": chat(("user", "hi"), ("assistant", "hello")), "answer": "1"},
        {"messages": "just text", "answer": "1"},
        {"messages": [], "answer": "1"},
        {"messages": chat(("user", "no reference?"))},
    ]
    result = load_items(write_jsonl(tmp_path / "chat.jsonl", records))
    assert (result.rows, result.valid, result.rejected) == (5, 1, 4)
    got = [(p.line, p.field, p.reason) for p in result.problems]
    assert got == [
        (2, "messages", "the last message is from 'assistant'; it must be from the user"),
        (3, "messages", "must be an array of messages, got string"),
        (4, "messages", "is empty"),
        (5, "reference", "no reference field (looked for: reference, reference_answer, answer, "
                         "correct_answer, label, ground_truth)"),
    ]


# --------------------------------------------------------------------------- ReFT JSON


REFT_TEXT = """[
  {
    "item_id": 0,
    "question": "Ann has 3 pens. Bob has 2 more. How many pens does Bob have?",
    "answer_cot": "Bob has 3 + 2 = 5 pens. Therefore, the answer is 5.",
    "answer_value": 5
  },
  {
    "item_id": "gsm8k_1",
    "question": "What is 6 times 7?",
    "answer_cot": "6 * 7 = 42. Therefore, the answer is 42.",
    "answer_value": "42"
  },
  {
    "item_id": "gsm8k_2",
    "question": ["not", "text"],
    "answer_cot": "x",
    "answer_value": "1"
  }
]
"""


def test_reft_json_items_load_and_problems_point_at_item_start_line(tmp_path):
    path = tmp_path / "reft.json"
    path.write_text(REFT_TEXT, encoding="utf-8")
    result = load_items(path)
    assert result.format == "reft" and (result.rows, result.valid, result.rejected) == (3, 2, 1)
    frame = result.frame
    assert frame["id"].tolist() == ["0", "gsm8k_1"]  # numeric ids become text
    assert frame["reference"].tolist() == ["5", "42"]
    assert frame.iloc[0]["solution"] == "Bob has 3 + 2 = 5 pens. Therefore, the answer is 5."
    [problem] = result.problems
    assert (problem.line, problem.index, problem.field) == (14, 2, "question")
    assert problem.reason == "must be text, got array"
    assert problem.raw.startswith('{\n    "item_id": "gsm8k_2"')


def test_reft_malformed_item_costs_only_itself(tmp_path):
    broken = REFT_TEXT.replace('"answer_value": "42"', '"answer_value": "42",,')
    path = tmp_path / "reft.json"
    path.write_text(broken, encoding="utf-8")
    result = load_items(path)
    assert (result.rows, result.valid, result.rejected) == (3, 1, 2)
    reasons = {(p.index, p.line): p.reason for p in result.problems}
    assert reasons[(1, 8)].startswith("malformed JSON: Expecting property name")
    assert reasons[(2, 14)] == "must be text, got array"  # reading resumed at the next item


# --------------------------------------------------------------------------- CSV, Parquet


def test_csv_with_configured_columns_crlf_and_multiline_records(tmp_path):
    text = (
        "uid,q,a,cot,source\r\n"
        "u1,What is 2+2?,4,2+2=4,book\r\n"
        '"u2","A long\r\nquestion?",7,,web\r\n'
        "\r\n"
        "u3,,9,,web\r\n"
    )
    path = tmp_path / "items.csv"
    path.write_bytes(text.encode("utf-8"))
    cfg = DataConfig(columns=ColumnsConfig(id="uid", prompt="q", reference="a", solution="cot"))
    result = load_items(path, cfg)
    assert result.format == "csv" and (result.rows, result.valid, result.rejected) == (3, 2, 1)
    frame = result.frame
    assert frame["id"].tolist() == ["u1", "u2"]
    assert frame.iloc[1]["prompt"] == "A long\r\nquestion?"
    assert frame.iloc[0]["solution"] == "2+2=4" and frame.iloc[1]["solution"] is None
    assert frame.iloc[0]["source"] == "book"
    [problem] = result.problems
    # Physical lines: header 1, u1 2, u2 3-4, blank 5, u3 6.
    assert (problem.line, problem.field, problem.reason) == (6, "q", "is empty")
    assert problem.raw == "u3,,9,,web"


def test_csv_without_the_configured_columns_is_fatal_and_says_how_to_fix_it(tmp_path):
    path = tmp_path / "items.csv"
    path.write_text("q,a\nWhat?,1\n", encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_items(path)
    message = str(err.value)
    assert str(path) in message
    assert "'prompt' (data.columns.prompt)" in message and "'reference' (data.columns.reference)" in message
    assert "the file has columns: q, a" in message
    with pytest.raises(DataError, match="'uid' \\(data.columns.id\\)"):
        load_items(path, DataConfig(columns=ColumnsConfig(id="uid", prompt="q", reference="a")))


# Cells that hold the other delimiters, a quoted line break and a quoted delimiter: a wrong guess
# would split them into other columns.
CSV_ROWS = [
    {"id": "a1", "prompt": "What is 1,5 + 1; in words?", "reference": "2,5", "solution": "1,5 + 1 = 2,5"},
    {"id": "a2", "prompt": "Pick one: a|b\tor c", "reference": "b", "solution": ""},
    {"id": "a3", "prompt": "Two lines,\nthen; the question?", "reference": "7", "solution": "3 + 4 = 7"},
]


def csv_text(delimiter: str, header: tuple[str, ...] = ("id", "prompt", "reference", "solution")) -> str:
    import csv
    import io

    out = io.StringIO(newline="")
    writer = csv.writer(out, delimiter=delimiter, lineterminator="\r\n")
    writer.writerow(header)
    writer.writerows([[row[key] for key in ("id", "prompt", "reference", "solution")] for row in CSV_ROWS])
    return out.getvalue()


@pytest.mark.parametrize("setting", ["auto", "given", "by name"])
@pytest.mark.parametrize(("delimiter", "name"), [(",", "comma"), (";", "semicolon"), ("\t", "tab"), ("|", "pipe")])
@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".txt"])
def test_csv_delimiter_auto_given_or_named_reads_every_cell(tmp_path, delimiter, name, setting, suffix):
    path = tmp_path / f"items{suffix}"
    path.write_text(csv_text(delimiter), encoding="utf-8", newline="")
    value = {"auto": "auto", "given": delimiter, "by name": name}[setting]
    cfg = DataConfig(csv_delimiter=value, columns=ColumnsConfig(id="id"))
    result = load_items(path, cfg, format="csv" if suffix == ".txt" else None)
    assert (result.format, result.rows, result.valid) == ("csv", 3, 3), [str(p) for p in result.problems]
    frame = result.frame
    assert frame["prompt"].tolist() == [row["prompt"] for row in CSV_ROWS]
    assert frame["reference"].tolist() == ["2,5", "b", "7"]
    assert frame["solution"].tolist() == ["1,5 + 1 = 2,5", None, "3 + 4 = 7"]


@pytest.mark.parametrize("delimiter", [",", ";", "\t", "|"])
def test_csv_delimiter_is_sniffed_when_the_header_has_other_names(tmp_path, delimiter):
    """GSM8K columns (question/answer), not data.columns: the header does not decide, csv.Sniffer does."""
    path = tmp_path / "gsm.csv"
    rows = [("q1; with, words", "so 2.\n#### 2"), ("q2", "#### 3"), ("q3|x", "#### 4")]
    lines = ["question" + delimiter + "answer"] + [f'"{q}"{delimiter}"{a}"' for q, a in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = load_items(path)
    assert (result.format, result.valid) == ("gsm8k", 3)
    assert result.frame["reference"].tolist() == ["2", "3", "4"]


def test_a_forced_delimiter_that_does_not_split_the_header_says_which_one_does(tmp_path):
    path = tmp_path / "semi.csv"
    path.write_text(csv_text(";"), encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_items(path, DataConfig(csv_delimiter=","))
    assert err.value.setting == "data.csv_delimiter"
    assert "looks ';'-separated: set data.csv_delimiter to ';'" in str(err.value)


@pytest.mark.parametrize("bad", ["", ";;", '"', "\n", "\r", "semicolons", 3])
def test_csv_delimiter_setting_is_one_character_a_name_or_auto(bad):
    from rft_core.config import ConfigError, RFTConfig

    with pytest.raises(ConfigError, match="data.csv_delimiter"):
        RFTConfig.load(None, [f"data.csv_delimiter={json.dumps(bad)}"])
    assert RFTConfig.load(None, ["data.csv_delimiter=TAB"]).data.csv_delimiter == "\t"
    assert RFTConfig.load(None, ['data.csv_delimiter="\\t"']).data.csv_delimiter == "\t"
    assert RFTConfig.load(None, ["data.csv_delimiter=;"]).data.csv_delimiter == ";"


def test_parquet_and_csv_with_gsm8k_columns_are_read_as_gsm8k(tmp_path):
    # How Hugging Face ships openai/gsm8k: a Parquet file with question/answer columns.
    parquet = tmp_path / "train-00000-of-00001.parquet"
    pd.DataFrame([NATALIA]).to_parquet(parquet)
    result = load_items(parquet)
    assert result.format == "gsm8k" and result.frame.iloc[0]["reference"] == "72"
    csv_path = tmp_path / "gsm.csv"
    pd.DataFrame([NATALIA]).to_csv(csv_path, index=False)
    assert detect_format(csv_path) == "gsm8k"
    assert load_items(csv_path).frame.iloc[0]["solution"].endswith("in April and May.")


def test_parquet_with_configured_columns_and_row_index_problems(tmp_path):
    path = tmp_path / "items.parquet"
    pd.DataFrame(
        {"question": ["What is 1+1?", "What is 2+2?", None], "value": [2, 4, 6], "level": [1, 2, 3]}
    ).to_parquet(path)
    cfg = DataConfig(columns=ColumnsConfig(prompt="question", reference="value", solution=None))
    result = load_items(path, cfg)
    assert result.format == "parquet" and (result.rows, result.valid, result.rejected) == (3, 2, 1)
    assert result.frame["reference"].tolist() == ["2", "4"]
    assert item_dict(result.frame.iloc[1])["level"] == 2
    [problem] = result.problems
    assert (problem.line, problem.index, problem.field, problem.reason) == (None, 2, "question", "missing")


# --------------------------------------------------------------------------- detection


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("a.jsonl", json.dumps({"messages": chat(("user", "q")), "answer": "1"}) + "\n", "openai"),
        ("a.jsonl", json.dumps(NATALIA) + "\n", "gsm8k"),
        ("a.json", REFT_TEXT, "reft"),
        ("a.json", json.dumps(NATALIA) + "\n", "gsm8k"),  # JSON lines under a .json name
        ("a.data", json.dumps(NATALIA) + "\n", "gsm8k"),  # unknown extension, JSON content
        ("a.csv", "prompt,reference\nq,1\n", "csv"),
        ("a.tsv", "prompt\treference\nq\t1\n", "csv"),
    ],
)
def test_format_is_detected_from_extension_and_fields(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    assert detect_format(path) == expected
    assert load_items(path).format == expected


def test_parquet_is_detected_by_its_magic_bytes_whatever_the_name(tmp_path):
    path = tmp_path / "items.bin"
    pd.DataFrame({"prompt": ["q"], "reference": ["1"]}).to_parquet(path)
    assert detect_format(path) == "parquet"


def test_forced_format_wins_over_detection(tmp_path):
    path = tmp_path / "items.txt"
    path.write_text("prompt,reference\nWhat is 1+1?,2\n", encoding="utf-8")
    with pytest.raises(DataError, match="cannot tell the format"):
        load_items(path)
    assert load_items(path, format="csv").valid == 1
    assert load_items(path, DataConfig(format="csv")).valid == 1
    # Records with ReFT fields read as GSM8K when told so: item_id is then just an extra.
    reft_like = write_jsonl(tmp_path / "r.jsonl", [{"item_id": 1, "question": "q?", "answer": "#### 3"}])
    assert detect_format(reft_like) == "reft"
    forced = load_items(reft_like, format="gsm8k")
    assert forced.format == "gsm8k" and forced.frame.iloc[0]["reference"] == "3"


def test_fields_that_match_no_format_are_a_clear_error(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"text": "hello", "score": 1}])
    with pytest.raises(DataError, match=r"cannot tell the format from the fields \['score', 'text'\]"):
        load_items(path)


# --------------------------------------------------------------------------- frame helpers


def test_items_round_trip_through_parquet_with_messages_and_extras(tmp_path):
    frame = load_items(EXAMPLES / "sample_openai.jsonl").frame
    path = write_items(frame, tmp_path / "items.parquet")
    back = read_items(path)
    pd.testing.assert_frame_equal(back, frame)
    assert back.iloc[0]["messages"][0] == {"role": "system", "content": "Solve the problem. End with '#### <number>'."}
    assert frame_digest(back) == frame_digest(frame)


def test_read_items_refuses_a_parquet_file_it_did_not_write(tmp_path):
    path = tmp_path / "other.parquet"
    pd.DataFrame({"a": [1]}).to_parquet(path)
    with pytest.raises(DataError, match="not an items file"):
        read_items(path)


def test_frame_digest_ignores_row_order_and_sees_every_canonical_change():
    frame = load_items(EXAMPLES / "sample_gsm8k.jsonl").frame
    digest = frame_digest(frame)
    assert len(digest) == 16
    assert frame_digest(frame.iloc[::-1].reset_index(drop=True)) == digest
    changed = frame.copy()
    changed.loc[3, "reference"] = "999"
    assert frame_digest(changed) != digest
    no_solution = frame.copy()
    no_solution.at[0, "solution"] = None
    assert frame_digest(no_solution) != digest


def test_item_dict_gives_json_native_values():
    row = pd.Series(
        {"id": "x", "prompt": "p", "messages": [{"role": "user", "content": "p"}], "reference": "1",
         "solution": None, "n": np.int64(3), "score": np.float64("nan"), "tags": np.array([1, 2])}
    )
    item = item_dict(row)
    assert item == {"id": "x", "prompt": "p", "reference": "1", "solution": None, "n": 3, "score": None,
                    "tags": [1, 2]}
    assert type(item["n"]) is int
    json.dumps(item)
