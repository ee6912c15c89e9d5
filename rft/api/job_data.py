"""A job's data: the uploaded files as the pipeline reads them, and their validation.

Reinforcement data is OpenAI's RFT format (`messages` ending with the user's turn, reference fields
beside it), which rft reads as it is. Supervised data is OpenAI's chat format, `messages` ending
with the assistant's turn: each such line becomes rft's form of it, line for line (so line numbers
stay the file's): the messages before the answer are the prompt, and the answer is both the worked
`solution` and the `reference` (a `reference` field of the row is kept as `original_reference`).
OpenAI's supervised method takes no grader: SFT validation reports the loss on the held-out
answers (`valid_loss`) and scores exact reproduction of them (string_check `eq`, the accuracy).

`validate_files` runs rft's validation (the pandera schemas, as `rft validate` does) on every file
of a job; any invalid row fails the job with a message naming the file, line and field.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rft_core.config import RFTConfig

# What a supervised job's SFT validation scores (OpenAI's supervised method takes no grader).
SUPERVISED_GRADER: dict[str, Any] = {
    "type": "string_check",
    "name": "reproduces_answer",
    "operation": "eq",
    "input": "{{ sample.output_text }}",
    "reference": "{{ item.reference }}",
}
MAX_SHOWN_PROBLEMS = 5


class FileProblem(ValueError):
    """A job file with invalid rows (or unusable as a whole); `param` is the job field naming it."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def link_or_copy(source: Path, target: Path) -> None:
    """`target` holds `source`'s bytes: a hard link (no copy of a large file) where the disk allows."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    partial.unlink(missing_ok=True)
    try:
        os.link(source, partial)
    except OSError:
        shutil.copyfile(source, partial)
    os.replace(partial, target)


def supervised_line(line: bytes) -> bytes:
    """One line of an OpenAI chat-format file in rft's form (unchanged when it is not such a line:
    validation then reports what is wrong with it)."""
    try:
        record = json.loads(line)
    except ValueError:
        return line
    messages = record.get("messages") if isinstance(record, dict) else None
    if not (isinstance(messages, list) and len(messages) >= 2 and isinstance(messages[-1], dict)
            and messages[-1].get("role") == "assistant" and isinstance(messages[-1].get("content"), str)):
        return line
    answer = messages[-1]["content"]
    converted = {key: value for key, value in record.items() if key != "messages"}
    converted["messages"] = messages[:-1]
    if "reference" in converted:
        converted["original_reference"] = converted.pop("reference")
    converted["solution"] = answer
    converted["reference"] = answer
    return json.dumps(converted, ensure_ascii=False).encode("utf-8")


def prepare_file(source: Path, target: Path, method_type: str) -> None:
    """The job's copy of an uploaded file: linked as it is (reinforcement), or converted line by line
    from OpenAI's chat format (supervised)."""
    if method_type != "supervised":
        link_or_copy(source, target)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")  # a server killed mid-way leaves no half file
    with open(source, "rb") as src, open(partial, "wb") as out:
        for line in src:
            ending = line[len(line.rstrip(b"\r\n")):]
            body = line[: len(line) - len(ending)]
            out.write((supervised_line(body) if body.strip() else body) + ending)
    os.replace(partial, target)


@dataclass
class Counts:
    """What the validated files hold: items in the training split, and those with a worked solution."""

    n_train: int
    n_sft: int
    n_val: int


def _describe(problems: list[dict[str, Any]], label: str, total: int) -> str:
    shown = []
    for p in problems[:MAX_SHOWN_PROBLEMS]:
        where = f"line {p['line']}" if p.get("line") is not None else f"item {p.get('index')}"
        field = f", field '{p['field']}'" if p.get("field") else ""
        shown.append(f"{label} {where}{field}: {p['reason']}")
    more = f" (and {total - len(shown)} more problems)" if total > len(shown) else ""
    return "; ".join(shown) + more


def validate_files(cfg: RFTConfig, files: dict[str, tuple[str, Path]], work: Path) -> Counts:
    """Validate each job file (`param` -> (label, path)) as the pipeline will read it, then split
    as the pipeline will; FileProblem naming file, line and field at the first invalid file."""
    from rft_core.data import DataError, split_items, validate_file
    from rft_core.stages import numeric_grader

    numeric = numeric_grader(cfg)
    frames = {}
    for param, (label, path) in files.items():
        try:
            report = validate_file(path, cfg.data, rejects_path=work / f"{param}.rejects.jsonl", numeric=numeric)
        except DataError as exc:
            raise FileProblem(f"{label}: {str(exc).replace(str(path), 'the file')}", param) from None
        if report.rejected:
            details = report.to_dict(max_problems=MAX_SHOWN_PROBLEMS)
            raise FileProblem(
                f"{label}: {report.rejected} of {report.rows} rows are invalid: "
                + _describe(details["problems"], label, details["problem_count"]),
                param,
            )
        frames[param] = report.frame
    split = split_items(frames["training_file"], cfg.data, frames.get("validation_file"))
    solutions = split.train.get("solution", [])
    n_sft = sum(1 for s in solutions if isinstance(s, str) and s.strip())
    return Counts(n_train=len(split.train), n_sft=n_sft, n_val=len(split.val))
