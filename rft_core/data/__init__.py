"""The data layer: task files -> validated canonical item frame -> train/validation split.

    result = load_items("train.jsonl", cfg.data, numeric=True)   # frame + every rejected row
    report = validate_file("train.jsonl", cfg.data)              # same, rejects file written
    split = split_items(result.frame, cfg.data)                  # train, val, manifest, leakage
    train, val = apply_manifest(result.frame, SplitManifest.load("split.json"))

readers.py reads a file's bytes into raw rows (JSON lines, JSON array, CSV, Parquet), detect.py tells
the format, records.py maps each format's records onto the canonical columns, load.py judges the rows
into items and rejects; schemas.py defines the frame, validate.py reports, split.py splits,
synthetic.py generates the built-in task; `rft validate` (rft/validate.py) is the command over validate.py.
"""

from rft_core.data.detect import detect_format
from rft_core.data.load import LoadResult, Reject, load_items
from rft_core.data.records import FORMATS, split_gsm8k_answer
from rft_core.data.schemas import (
    CANONICAL_COLUMNS,
    ITEMS_SCHEMA,
    DataError,
    Problem,
    canonical_frame,
    frame_digest,
    item_dict,
    read_items,
    validate_items,
    write_items,
)
from rft_core.data.split import (
    LeakagePair,
    SplitManifest,
    SplitResult,
    apply_manifest,
    find_near_duplicates,
    normalize_prompt,
    split_items,
)
from rft_core.data.synthetic import generate, pretraining_documents, write_synthetic
from rft_core.data.validate import ValidationReport, default_rejects_path, validate_file

__all__ = [
    "CANONICAL_COLUMNS",
    "FORMATS",
    "ITEMS_SCHEMA",
    "DataError",
    "LeakagePair",
    "LoadResult",
    "Problem",
    "Reject",
    "SplitManifest",
    "SplitResult",
    "ValidationReport",
    "apply_manifest",
    "canonical_frame",
    "default_rejects_path",
    "detect_format",
    "find_near_duplicates",
    "frame_digest",
    "generate",
    "item_dict",
    "load_items",
    "normalize_prompt",
    "pretraining_documents",
    "read_items",
    "split_gsm8k_answer",
    "split_items",
    "validate_file",
    "validate_items",
    "write_items",
    "write_synthetic",
]
