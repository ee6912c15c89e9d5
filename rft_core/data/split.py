"""Split items into train and validation: deterministic from a seed, no prompt on both sides.

- Items whose prompts are equal after normalising whitespace and case form one group, and a group
  goes wholly to one side. With a validation file instead, train items whose normalised prompt is
  in it are dropped and reported.
- Which groups are held out depends only on the seed and the prompts (each group is ranked by a
  hash of seed and prompt), not on the row order of the file, the platform or the Python version.
- Near-duplicates across the two sides (the same text up to its numbers, or word 3-gram Jaccard
  similarity >= `near_duplicate_threshold`) are reported as possible leakage, not moved.
- The split is a `SplitManifest` (ids, seed, data digest, its own digest) that later stages and
  reruns apply with `apply_manifest`, so every stage sees exactly the same split.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from rft_core.config import DataConfig
from rft_core.data.schemas import DataError, frame_digest

_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_WORD = re.compile(r"\w+")


def normalize_prompt(text: str) -> str:
    """Case-folded, whitespace collapsed: what "the same prompt" means for splitting.

    >>> normalize_prompt("  How many\\n pens   does Bob HAVE? ")
    'how many pens does bob have?'
    """
    return " ".join(text.casefold().split())


def numbers_stripped(text: str) -> str:
    """The normalised prompt with every number replaced by '#': equal for templated variants.

    >>> numbers_stripped("Ann has 9 pens.") == numbers_stripped("ann has 1,200 pens.")
    True
    """
    return _NUMBER.sub("#", normalize_prompt(text))


def word_shingles(text: str, n: int = 3) -> frozenset[str]:
    """The set of word n-grams of a text (the whole text as one shingle when it is shorter)."""
    words = _WORD.findall(text.casefold())
    if len(words) < n:
        return frozenset([" ".join(words)]) if words else frozenset()
    return frozenset(" ".join(words[i : i + n]) for i in range(len(words) - n + 1))


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    if not a and not b:
        return 1.0
    inter = len(a & b)
    return inter / (len(a) + len(b) - inter)


# --------------------------------------------------------------------------- leakage


@dataclass(frozen=True)
class LeakagePair:
    """A train item and a validation item that may be the same problem.

    `kind`: "exact" (equal normalised prompts; the train item was dropped), "numbers" (the same
    text up to its numbers) or "jaccard" (word 3-gram Jaccard similarity at or above the threshold).
    """

    train_id: str
    val_id: str
    kind: str
    similarity: float
    train_prompt: str
    val_prompt: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def find_near_duplicates(train: pd.DataFrame, val: pd.DataFrame, threshold: float) -> list[LeakagePair]:
    """Every train/val pair that is the same text up to numbers or has Jaccard >= `threshold`.

    Exact and fast: numbers-stripped prompts are looked up in a dict, and Jaccard candidates come
    from prefix filtering (each set indexed by its rarest shingles; two sets with Jaccard >= t must
    share one of their first |s| - ceil(t|s|) + 1), so only a handful of pairs are ever compared.
    """
    train_ids, train_prompts = train["id"].tolist(), train["prompt"].tolist()
    val_ids, val_prompts = val["id"].tolist(), val["prompt"].tolist()
    train_sh = [word_shingles(p) for p in train_prompts]
    val_sh = [word_shingles(p) for p in val_prompts]
    found: dict[tuple[int, int], str] = {}

    by_template: dict[str, list[int]] = defaultdict(list)
    for j, prompt in enumerate(val_prompts):
        by_template[numbers_stripped(prompt)].append(j)
    for i, prompt in enumerate(train_prompts):
        for j in by_template.get(numbers_stripped(prompt), ()):
            found[(i, j)] = "numbers"

    freq: Counter[str] = Counter()
    for shingles in (*train_sh, *val_sh):
        freq.update(shingles)

    def prefix(shingles: frozenset[str]) -> list[str]:
        # The 1e-9 keeps float error (0.7 * 10 = 7.000000000000001) from shortening the prefix.
        length = len(shingles) - math.ceil(threshold * len(shingles) - 1e-9) + 1
        return sorted(shingles, key=lambda g: (freq[g], g))[:length]

    index: dict[str, list[int]] = defaultdict(list)
    for j, shingles in enumerate(val_sh):
        for gram in prefix(shingles):
            index[gram].append(j)
    for i, shingles in enumerate(train_sh):
        if not shingles:
            continue
        candidates = {j for gram in prefix(shingles) for j in index.get(gram, ())}
        for j in candidates:
            other = val_sh[j]
            if (i, j) in found or not threshold * len(shingles) <= len(other) <= len(shingles) / threshold:
                continue
            if jaccard(shingles, other) >= threshold:
                found[(i, j)] = "jaccard"

    pairs = [
        LeakagePair(
            train_id=str(train_ids[i]),
            val_id=str(val_ids[j]),
            kind=kind,
            similarity=round(jaccard(train_sh[i], val_sh[j]), 4),
            train_prompt=train_prompts[i],
            val_prompt=val_prompts[j],
        )
        for (i, j), kind in found.items()
    ]
    return sorted(pairs, key=lambda p: (-p.similarity, p.train_id, p.val_id))


# --------------------------------------------------------------------------- manifest


@dataclass
class SplitManifest:
    """Exactly which items are train and which validation, and from which data.

    `data_digest` is `frame_digest` of the frame that was split (`val_digest` of the validation
    file's frame when there was one); `digest` hashes everything else here, so a stage can cache on
    it and a hand-edited manifest is caught on load.
    """

    train_ids: list[str]
    val_ids: list[str]
    seed: int
    data_digest: str
    val_source: str = "carved"  # "carved" out of the data, or "file"
    val_digest: str | None = None
    max_items: int | None = None
    digest: str = field(default="")

    def __post_init__(self) -> None:
        if not self.digest:
            self.digest = self.content_digest()

    def content_digest(self) -> str:
        body = {k: v for k, v in asdict(self).items() if k != "digest"}
        text = json.dumps(body, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | Path) -> Path:
        from rft_core.files import write_text_atomic

        # Written whole or not at all: a later load never reads half a manifest.
        return write_text_atomic(path, json.dumps(self.to_dict(), indent=1, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> SplitManifest:
        from rft_core.files import FileProblem, read_text

        path = Path(path)
        try:
            data = json.loads(read_text(path, "split manifest"))
            manifest = cls(**data)
        except FileProblem as exc:  # missing, a directory or FIFO, too large, not UTF-8
            raise DataError(str(exc)) from None
        except (json.JSONDecodeError, TypeError, RecursionError) as exc:
            raise DataError(f"{path}: not a split manifest: {exc}") from None
        if manifest.digest != manifest.content_digest():
            raise DataError(f"{path}: the manifest was modified after it was written (digest mismatch)")
        return manifest


@dataclass
class SplitResult:
    """The two sides, the manifest that reproduces them, and what the leakage check found."""

    train: pd.DataFrame
    val: pd.DataFrame
    manifest: SplitManifest
    leakage: list[LeakagePair]
    dropped: list[LeakagePair] = field(default_factory=list)  # train items removed (in the val file)

    def to_dict(self, max_pairs: int | None = 100) -> dict[str, Any]:
        return {
            "train": len(self.train),
            "val": len(self.val),
            "manifest_digest": self.manifest.digest,
            "leakage_count": len(self.leakage),
            "leakage": [p.to_dict() for p in self.leakage[:max_pairs]],
            "dropped_count": len(self.dropped),
            "dropped": [p.to_dict() for p in self.dropped[:max_pairs]],
        }


# --------------------------------------------------------------------------- splitting


def _rank(seed: int, key: str) -> bytes:
    return hashlib.sha256(f"{seed}\x00{key}".encode("utf-8", "surrogatepass")).digest()


def _check_ids(frame: pd.DataFrame, what: str) -> None:
    duplicated = frame["id"][frame["id"].duplicated()].tolist()
    if duplicated:
        raise DataError(f"{what}: ids must be unique to split; repeated: {duplicated[:5]}")


def _carve(frame: pd.DataFrame, cfg: DataConfig) -> tuple[list[int], list[int]]:
    """Positions of (train, val): whole groups of equal normalised prompts, in seeded hash order,
    until the validation target is met exactly (a group that would overshoot it is passed over)."""
    n = len(frame)
    target = cfg.val_size if cfg.val_size is not None else max(1, round(cfg.val_fraction * n))
    if target >= n:
        raise DataError(f"cannot hold out {target} of {n} items for validation; lower data.val_size/val_fraction")
    groups: dict[str, list[int]] = defaultdict(list)
    for pos, prompt in enumerate(frame["prompt"].tolist()):
        groups[normalize_prompt(prompt)].append(pos)
    chosen: list[int] = []
    for key in sorted(groups, key=lambda k: _rank(cfg.seed, k)):
        if len(chosen) >= target:
            break
        if len(chosen) + len(groups[key]) <= target:
            chosen.extend(groups[key])
    if not chosen or len(chosen) == n:
        raise DataError(
            f"cannot split {n} items into train and validation: they share too few distinct prompts"
        )
    held_out = set(chosen)
    return [p for p in range(n) if p not in held_out], sorted(chosen)


def _limit(frame: pd.DataFrame, positions: list[int], max_items: int | None, seed: int) -> list[int]:
    """At most `max_items` train positions: a seeded, order-independent choice, kept in file order."""
    if max_items is None or len(positions) <= max_items:
        return positions
    prompts, ids = frame["prompt"].tolist(), frame["id"].tolist()
    ranked = sorted(positions, key=lambda p: (_rank(seed, normalize_prompt(prompts[p])), ids[p]))
    return sorted(ranked[:max_items])


def split_items(frame: pd.DataFrame, cfg: DataConfig, val_frame: pd.DataFrame | None = None) -> SplitResult:
    """Split `frame` into train and validation (or use `val_frame` as validation), as documented
    above; `cfg.max_items` then caps the training side."""
    _check_ids(frame, "data")
    dropped: list[LeakagePair] = []
    if val_frame is None:
        train_pos, val_pos = _carve(frame, cfg)
        val = frame.iloc[val_pos]
        val_source, val_digest = "carved", None
    else:
        _check_ids(val_frame, "validation data")
        if val_frame.empty:
            raise DataError("the validation data has no items")
        val = val_frame
        val_source, val_digest = "file", frame_digest(val_frame)
        val_by_key: dict[str, int] = {}
        for j, prompt in enumerate(val_frame["prompt"].tolist()):
            val_by_key.setdefault(normalize_prompt(prompt), j)
        train_pos = []
        for pos, (item_id, prompt) in enumerate(zip(frame["id"].tolist(), frame["prompt"].tolist(), strict=True)):
            j = val_by_key.get(normalize_prompt(prompt))
            if j is None:
                train_pos.append(pos)
            else:
                dropped.append(LeakagePair(str(item_id), str(val_frame["id"].iat[j]), "exact", 1.0,
                                           prompt, val_frame["prompt"].iat[j]))
        if not train_pos:
            raise DataError("every training item's prompt is also in the validation data")
    train_pos = _limit(frame, train_pos, cfg.max_items, cfg.seed)
    train = frame.iloc[train_pos].reset_index(drop=True)
    val = val.reset_index(drop=True)
    manifest = SplitManifest(
        train_ids=[str(i) for i in train["id"]],
        val_ids=[str(i) for i in val["id"]],
        seed=cfg.seed,
        data_digest=frame_digest(frame),
        val_source=val_source,
        val_digest=val_digest,
        max_items=cfg.max_items,
    )
    leakage = find_near_duplicates(train, val, cfg.near_duplicate_threshold)
    return SplitResult(train=train, val=val, manifest=manifest, leakage=leakage, dropped=dropped)


def _select(frame: pd.DataFrame, ids: list[str], what: str) -> pd.DataFrame:
    position = {str(item_id): pos for pos, item_id in enumerate(frame["id"].tolist())}
    missing = [i for i in ids if i not in position]
    if missing:
        raise DataError(f"{len(missing)} {what} ids of the manifest are not in the data (first: {missing[:5]})")
    return frame.iloc[[position[i] for i in ids]].reset_index(drop=True)


def apply_manifest(
    frame: pd.DataFrame,
    manifest: SplitManifest,
    val_frame: pd.DataFrame | None = None,
    *,
    check_digest: bool = True,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, val) exactly as the manifest recorded them, in its order.

    `val_frame` is required when the validation set came from a file. With `check_digest`, data
    that changed since the split (a different `frame_digest`) is a DataError, not a silent mismatch.
    """
    if check_digest and frame_digest(frame) != manifest.data_digest:
        raise DataError(
            f"the data changed since the split was made (digest {frame_digest(frame)}, "
            f"manifest {manifest.data_digest}); split it again"
        )
    if manifest.val_source == "file":
        if val_frame is None:
            raise DataError("this split's validation set came from a file: pass its frame as val_frame")
        if check_digest and frame_digest(val_frame) != manifest.val_digest:
            raise DataError("the validation data changed since the split was made; split it again")
        val_source = val_frame
    else:
        val_source = frame
    return _select(frame, manifest.train_ids, "train"), _select(val_source, manifest.val_ids, "validation")
