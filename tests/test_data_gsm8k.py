"""The real GSM8K files load completely, every reference extracts, and the leakage check is fast.

The files live in ../shared/data/gsm8k relative to the repository (RFT_GSM8K_DIR overrides).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from rft_core.config import DataConfig
from rft_core.data import load_items, split_items
from rft_core.graders.numeric import extract_answer, parse_number

REPO = Path(__file__).resolve().parents[1]
GSM8K_DIR = Path(os.environ.get("RFT_GSM8K_DIR", REPO.parent / "shared" / "data" / "gsm8k"))
EXPECTED_ROWS = {"train": 7473, "test": 1319}

pytestmark = pytest.mark.skipif(
    not all((GSM8K_DIR / f"{name}.jsonl").is_file() for name in EXPECTED_ROWS),
    reason=f"GSM8K train.jsonl/test.jsonl not found in {GSM8K_DIR} (set RFT_GSM8K_DIR to their folder)",
)


@pytest.fixture(scope="module")
def gsm8k():
    return {name: load_items(GSM8K_DIR / f"{name}.jsonl", numeric=True) for name in EXPECTED_ROWS}


@pytest.mark.parametrize("name", list(EXPECTED_ROWS))
def test_every_gsm8k_row_loads_and_validates(gsm8k, name):
    result = gsm8k[name]
    assert result.format == "gsm8k"
    assert (result.rows, result.valid, result.rejected) == (EXPECTED_ROWS[name], EXPECTED_ROWS[name], 0)
    assert result.problems == []


@pytest.mark.parametrize("name", list(EXPECTED_ROWS))
def test_every_gsm8k_reference_extracts_as_the_graders_see_it(gsm8k, name):
    frame = gsm8k[name].frame
    for reference, answer, solution in zip(frame["reference"], frame["answer"], frame["solution"], strict=True):
        assert parse_number(reference) is not None
        assert extract_answer(answer) == reference
        assert solution and "<<" not in solution and "####" not in solution


def test_gsm8k_train_against_test_split_and_leakage_check_take_seconds(gsm8k):
    train, test = gsm8k["train"].frame, gsm8k["test"].frame
    start = time.perf_counter()
    result = split_items(train, DataConfig(), val_frame=test)
    elapsed = time.perf_counter() - start
    assert elapsed < 10, f"split + leakage check took {elapsed:.1f}s"
    assert (len(result.train), len(result.val)) == (7473, 1319)
    assert result.dropped == []  # no test question appears in train
    assert all(pair.similarity >= 0.9 or pair.kind == "numbers" for pair in result.leakage)
