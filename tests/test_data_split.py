"""The split is deterministic, keeps every prompt on one side, reports leakage, and replays exactly."""

from __future__ import annotations

import itertools
import json
import random

import pytest

from rft_core.config import DataConfig, SyntheticConfig
from rft_core.data import (
    DataError,
    SplitManifest,
    apply_manifest,
    canonical_frame,
    find_near_duplicates,
    load_items,
    normalize_prompt,
    split_items,
    write_synthetic,
)
from rft_core.data.split import jaccard, word_shingles


@pytest.fixture(scope="module")
def items(tmp_path_factory):
    """300 synthetic items as the loader gives them."""
    train_path, _ = write_synthetic(SyntheticConfig(n_train=300, n_val=5, seed=3), tmp_path_factory.mktemp("syn"))
    return load_items(train_path).frame


def frame_of(prompts: list[str], prefix: str = "t") -> object:
    return canonical_frame(
        [{"id": f"{prefix}{i}", "prompt": p, "reference": "1", "solution": None} for i, p in enumerate(prompts)]
    )


def test_same_seed_same_split_and_another_seed_another(items):
    first = split_items(items, DataConfig(seed=1))
    again = split_items(items, DataConfig(seed=1))
    other = split_items(items, DataConfig(seed=2))
    assert first.manifest.train_ids == again.manifest.train_ids
    assert first.manifest.val_ids == again.manifest.val_ids
    assert first.manifest.digest == again.manifest.digest
    assert set(other.manifest.val_ids) != set(first.manifest.val_ids)
    assert len(first.val) == 30 and len(first.train) == 270  # val_fraction 0.1 of 300


def test_split_does_not_depend_on_row_order(items):
    shuffled = items.sample(frac=1.0, random_state=0).reset_index(drop=True)
    a = split_items(items, DataConfig(seed=5))
    b = split_items(shuffled, DataConfig(seed=5))
    assert set(a.manifest.val_ids) == set(b.manifest.val_ids)
    assert a.manifest.data_digest == b.manifest.data_digest


def test_val_size_gives_exactly_that_many(items):
    result = split_items(items, DataConfig(val_size=37))
    assert len(result.val) == 37 and len(result.train) == 263
    assert not set(result.manifest.train_ids) & set(result.manifest.val_ids)
    with pytest.raises(DataError, match="cannot hold out 300 of 300"):
        split_items(items, DataConfig(val_size=300))


def test_prompts_equal_up_to_case_and_whitespace_never_straddle_the_split():
    # 40 questions, each written 1-4 ways that differ only in case and spacing.
    prompts = []
    for q in range(40):
        base = f"Question number {q}: how many apples are left?"
        variants = [base, base.upper(), base.replace(" ", "  "), "  " + base.lower() + "\n"]
        prompts += variants[: 1 + q % 4]
    frame = frame_of(prompts)
    for seed in range(20):
        result = split_items(frame, DataConfig(seed=seed, val_fraction=0.25))
        train_keys = {normalize_prompt(p) for p in result.train["prompt"]}
        val_keys = {normalize_prompt(p) for p in result.val["prompt"]}
        assert not train_keys & val_keys
        assert len(result.train) + len(result.val) == len(prompts)
        assert len(result.val) == round(0.25 * len(prompts))  # whole groups still meet the target


def test_a_validation_file_drops_train_copies_of_its_prompts():
    train = frame_of(["What is 1+1?", "What is 2+2?", "WHAT  is 3+3?", "Name a colour."])
    val = frame_of(["what is 3+3?", "Name a fruit."], prefix="v")
    result = split_items(train, DataConfig(), val_frame=val)
    assert result.train["id"].tolist() == ["t0", "t1", "t3"]
    assert result.val["id"].tolist() == ["v0", "v1"]
    assert [(d.train_id, d.val_id, d.kind) for d in result.dropped] == [("t2", "v0", "exact")]
    assert result.manifest.val_source == "file"


def test_near_duplicates_across_the_split_are_reported_with_the_pair():
    long_text = ("Sara buys a box of pencils for the new school year and gives a few of them to each of "
                 "her friends in the class before the first lesson starts")
    train = frame_of([
        "Tom has 12 apples and eats 3. How many are left?",  # same text up to numbers as v0
        long_text + " today.",  # one word away from v1: Jaccard 0.92
        "Something unrelated entirely.",
    ])
    val = frame_of(["Tom has 40 apples and eats 9. How many are left?", long_text + " tomorrow."], prefix="v")
    pairs = find_near_duplicates(train, val, threshold=0.9)
    assert [(p.train_id, p.val_id, p.kind) for p in pairs] == [("t1", "v1", "jaccard"), ("t0", "v0", "numbers")]
    assert pairs[0].similarity == pytest.approx(jaccard(word_shingles(long_text + " today."),
                                                        word_shingles(long_text + " tomorrow.")), abs=1e-4)
    assert pairs[0].similarity >= 0.9
    assert split_items(train, DataConfig(), val_frame=val).leakage == pairs
    assert find_near_duplicates(train, val, threshold=0.95)[0].kind == "numbers"  # t1/v1 below 0.95


def test_fast_near_duplicate_search_finds_exactly_what_brute_force_finds():
    rng = random.Random(0)
    words = ["a", "b", "c", "d", "e", "f", "g", "h"]
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))) for _ in range(160)]
    train, val = frame_of(texts[:100]), frame_of(texts[100:], prefix="v")
    for threshold in (0.3, 0.5, 0.7, 0.9, 1.0):
        fast = {(p.train_id, p.val_id) for p in find_near_duplicates(train, val, threshold) if p.kind == "jaccard"}
        brute = {
            (f"t{i}", f"v{j}")
            for i, j in itertools.product(range(100), range(60))
            if jaccard(word_shingles(texts[i]), word_shingles(texts[100 + j])) >= threshold
        }
        numbers = {(p.train_id, p.val_id) for p in find_near_duplicates(train, val, threshold) if p.kind == "numbers"}
        assert fast | numbers == brute, threshold  # text without digits: "numbers" means equal text


def test_manifest_round_trip_replays_the_same_split(items, tmp_path):
    result = split_items(items, DataConfig(seed=9, max_items=100))
    path = result.manifest.save(tmp_path / "split.json")
    loaded = SplitManifest.load(path)
    assert loaded == result.manifest
    train, val = apply_manifest(items, loaded)
    assert train.equals(result.train) and val.equals(result.val)
    assert len(train) == 100 and loaded.max_items == 100


def test_an_edited_manifest_or_changed_data_is_refused(items, tmp_path):
    result = split_items(items, DataConfig())
    path = result.manifest.save(tmp_path / "split.json")
    data = json.loads(path.read_text())
    data["val_ids"] = data["val_ids"][1:]
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match="modified after it was written"):
        SplitManifest.load(path)
    changed = items.copy()
    changed.loc[0, "reference"] = "12345"
    with pytest.raises(DataError, match="the data changed since the split was made"):
        apply_manifest(changed, result.manifest)


def test_manifest_with_a_validation_file_needs_that_file(items):
    val = frame_of(["Completely different question?"], prefix="v")
    result = split_items(items, DataConfig(), val_frame=val)
    with pytest.raises(DataError, match="pass its frame as val_frame"):
        apply_manifest(items, result.manifest)
    train, replayed_val = apply_manifest(items, result.manifest, val_frame=val)
    assert replayed_val["id"].tolist() == ["v0"] and len(train) == len(items)


def test_max_items_is_a_seeded_choice_independent_of_row_order(items):
    a = split_items(items, DataConfig(max_items=50, seed=4))
    b = split_items(items.iloc[::-1].reset_index(drop=True), DataConfig(max_items=50, seed=4))
    assert len(a.train) == 50 and set(a.manifest.train_ids) == set(b.manifest.train_ids)
