"""Checkpoints and saved weights survive crashes: written whole or not at all (manifest, fsync,
rename), verified before a resume, a damaged one skipped for the one before it (or a fresh start),
and every error reading one names the file. Real tiny models, real SFT and RL runs."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from training_fixtures import Crash, crash_at, tiny_config, tiny_task

from rft_core import integrity
from rft_core.checkpoint import checkpoint_dirs, checkpoint_problem, latest_checkpoint, load_training_state
from rft_core.graders import build_grader
from rft_core.integrity import MANIFEST, DamagedFileError, directory_problem, writing_directory
from rft_core.models import load_model
from rft_core.rl.trainer import run_rl
from rft_core.sft import run_sft
from rft_core.training import best_weights_usable


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("task")
    cfg = tiny_config(tmp)
    train, val, model_dir = tiny_task(tmp, cfg)
    return cfg, train, val, model_dir


@pytest.fixture(scope="module")
def grader():
    with build_grader({"type": "numeric_match", "partial_credit": 0.1}) as g:
        yield g


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return set(wa) == set(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)


# --------------------------------------------------------------------------- ways a file is damaged


def truncate(path: Path) -> None:
    """What a crash before the data reached the disk leaves: the file cut short."""
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def empty(path: Path) -> None:
    """ext4's delayed allocation after a power loss: the name is there, the data is not."""
    path.write_bytes(b"")


def flip_byte(path: Path) -> None:
    """Same size, other bytes (bit rot, a stray write)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def delete(path: Path) -> None:
    path.unlink()


DAMAGE = {"truncated": truncate, "empty": empty, "flipped": flip_byte, "deleted": delete}


# --------------------------------------------------------------------------- directories


def make_dir(path: Path, files: dict[str, bytes]) -> Path:
    with writing_directory(path, {"step": 3}) as staging:
        for name, data in files.items():
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            (staging / name).write_bytes(data)
    return path


@pytest.mark.parametrize("damage", sorted(DAMAGE))
@pytest.mark.parametrize("name", ["a.bin", "sub/b.json"])
def test_a_published_directory_reports_each_kind_of_damage_by_file(tmp_path, damage, name):
    d = make_dir(tmp_path / "d", {"a.bin": os.urandom(5000), "sub/b.json": b'{"x": 1}'})
    assert directory_problem(d) is None
    DAMAGE[damage](d / name)
    problem = directory_problem(d)
    assert problem is not None and name in problem


def test_a_directory_with_a_broken_manifest_or_none_at_all_is_not_whole(tmp_path):
    d = make_dir(tmp_path / "d", {"a.safetensors": b""})
    (d / MANIFEST).write_text('{"files": ')
    assert f"its manifest {MANIFEST} is unreadable" in directory_problem(d)
    assert directory_problem(tmp_path / "nothing") == "it is missing"


def test_a_directory_from_before_manifests_is_checked_by_its_safetensors_headers(tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    save_file({"w": torch.zeros(64, 64)}, str(old / "model.safetensors"))
    (old / "config.json").write_text('{"a": 1}')
    assert directory_problem(old) is None
    truncate(old / "model.safetensors")
    assert "model.safetensors is cut short" in directory_problem(old)
    (old / "model.safetensors").write_bytes(b"\x10")
    assert "model.safetensors" in directory_problem(old)


def test_publishing_replaces_a_directory_whole_and_flushes_every_file_first(tmp_path, monkeypatch):
    final = make_dir(tmp_path / "best", {"old.bin": b"old"})
    synced = []
    real_fsync = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(integrity.os, "fsync", spy)
    with writing_directory(final, {"step": 7}) as staging:
        (staging / "new.bin").write_bytes(b"new")
        (staging / "deep").mkdir()
        (staging / "deep" / "x.bin").write_bytes(b"x")
    assert sorted(p.name for p in final.iterdir()) == sorted([MANIFEST, "deep", "new.bin"])
    assert integrity.manifest_meta(final) == {"step": 7}
    staging = str(integrity.staging_path(final))
    for name in ("new.bin", "deep/x.bin", MANIFEST, "deep", ""):
        assert os.path.join(staging, name).rstrip("/") in synced  # before the rename
    assert str(tmp_path) in synced  # the rename itself
    assert not integrity.staging_path(final).exists()


def test_a_failed_write_leaves_the_previous_directory_untouched(tmp_path):
    final = make_dir(tmp_path / "model", {"w.bin": b"good"})
    with pytest.raises(RuntimeError), writing_directory(final) as staging:
        (staging / "w.bin").write_bytes(b"half")
        raise RuntimeError("disk full")
    assert (final / "w.bin").read_bytes() == b"good" and directory_problem(final) is None
    assert not integrity.staging_path(final).exists()


def test_reading_errors_of_a_saved_model_name_the_directory(task, tmp_path):
    cfg, _, _, model_dir = task
    copy = Path(shutil.copytree(model_dir, tmp_path / "model"))
    truncate(copy / "model.safetensors")
    with pytest.raises(DamagedFileError, match=str(copy)):
        load_model(copy, cfg.model)


# --------------------------------------------------------------------------- SFT


def sft_config(task, tmp_path):
    cfg = task[0]
    return cfg.model_copy(update={"sft": cfg.sft.model_copy(update={"keep_best": False, "eval_interval": 0})})


@pytest.fixture(scope="module")
def sft_reference(task, grader, tmp_path_factory):
    """SFT run straight through: what every resumed run must end with."""
    cfg, train, val, model_dir = task
    out = tmp_path_factory.mktemp("sft-straight")
    run_sft(sft_config(task, out), train, val, model_dir, out, grader=grader)
    return out / "model"


def interrupted_sft(task, grader, out: Path) -> list[Path]:
    cfg, train, val, model_dir = task
    with pytest.raises(Crash):
        run_sft(sft_config(task, out), train, val, model_dir, out, grader=grader, log=crash_at(5))
    dirs = checkpoint_dirs(out / "checkpoints")
    assert [d.name for d in dirs] == ["step-2", "step-4"]
    return dirs


@pytest.mark.parametrize(
    ("damage", "file"),
    [("truncated", "model/model.safetensors"), ("empty", "optimizer.pt"), ("flipped", "model/model.safetensors"),
     ("deleted", "state.json"), ("truncated", "rng.pt")],
)
def test_sft_resumes_from_the_previous_checkpoint_when_the_latest_is_damaged(
    task, grader, tmp_path, sft_reference, caplog, damage, file
):
    cfg, train, val, model_dir = task
    previous, latest = interrupted_sft(task, grader, tmp_path)
    DAMAGE[damage](latest / file)
    assert checkpoint_problem(latest) is not None and latest_checkpoint(tmp_path / "checkpoints") == previous
    with caplog.at_level(logging.INFO, logger="rft"):
        run_sft(sft_config(task, tmp_path), train, val, model_dir, tmp_path, grader=grader)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(latest) in w and "damaged" in w for w in warnings), warnings
    assert any(f"resuming from {previous} (step 2 of 6)" in r.getMessage() for r in caplog.records)
    assert same_weights(tmp_path / "model", sft_reference)  # nothing skipped, nothing replayed twice
    # The damaged checkpoint was replaced by a whole one when the run passed its step again.
    assert checkpoint_problem(latest) is None


def test_sft_starts_over_with_a_warning_when_every_checkpoint_is_damaged(task, grader, tmp_path, sft_reference, caplog):
    cfg, train, val, model_dir = task
    for checkpoint, damage in zip(interrupted_sft(task, grader, tmp_path), ("truncated", "empty"), strict=True):
        DAMAGE[damage](checkpoint / "model" / "model.safetensors")
    with caplog.at_level(logging.INFO, logger="rft"):
        run_sft(sft_config(task, tmp_path), train, val, model_dir, tmp_path, grader=grader)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("damaged" in w for w in warnings) >= 2
    assert any("training starts from the beginning" in w and str(tmp_path / "checkpoints") in w for w in warnings)
    assert not any("resuming from" in r.getMessage() for r in caplog.records)
    assert same_weights(tmp_path / "model", sft_reference)


def test_an_unreadable_checkpoint_file_that_no_manifest_covers_is_named_when_loaded(task, grader, tmp_path):
    _, latest = interrupted_sft(task, grader, tmp_path)
    (latest / MANIFEST).unlink()  # as written by an older rft: only headers can be checked
    truncate(latest / "optimizer.pt")
    with pytest.raises(DamagedFileError, match=str(latest / "optimizer.pt")):
        load_training_state(latest)


def test_best_weights_are_used_only_when_whole_and_of_the_step_the_state_names(tmp_path, caplog):
    best = make_dir(tmp_path / "best", {"model.safetensors": os.urandom(100)})  # published at step 3
    assert best_weights_usable(best, 3)
    with caplog.at_level(logging.WARNING, logger="rft"):
        assert not best_weights_usable(best, 5)  # a newer best was saved, its checkpoint never was
        truncate(best / "model.safetensors")
        assert not best_weights_usable(best, 3)
        assert not best_weights_usable(tmp_path / "missing", 3)
    messages = [r.getMessage() for r in caplog.records]
    assert "holds the weights of step 3" in messages[0] and str(best) in messages[0]
    assert "model.safetensors has 50 bytes" in messages[1]
    assert "missing" in messages[2]


def test_sft_keeps_its_last_weights_when_the_best_weights_are_damaged(task, grader, tmp_path, caplog):
    cfg, train, val, model_dir = task
    # A learning rate below float32's resolution: the weights never change, so the first
    # validation (step 0) stays the best and the end of the run must load it.
    cfg = cfg.model_copy(update={"sft": cfg.sft.model_copy(update={"keep_best": True, "eval_interval": 2, "lr": 1e-15})})
    with pytest.raises(Crash):
        run_sft(cfg, train, val, model_dir, tmp_path, grader=grader, log=crash_at(5))
    assert json.loads((tmp_path / "checkpoints" / "step-4" / "state.json").read_text())["best_step"] == 0
    truncate(tmp_path / "best" / "model.safetensors")
    with caplog.at_level(logging.WARNING, logger="rft"):
        result = run_sft(cfg, train, val, model_dir, tmp_path, grader=grader)
    assert any(str(tmp_path / "best") in r.getMessage() and "cannot be used" in r.getMessage() for r in caplog.records)
    assert result.metrics["step"] == 6  # the metrics of the weights it kept
    assert directory_problem(tmp_path / "model") is None


# --------------------------------------------------------------------------- RL


@pytest.fixture(scope="module")
def rl_reference(task, grader, tmp_path_factory):
    cfg, train, val, model_dir = task
    out = tmp_path_factory.mktemp("rl-straight")
    run_rl(tiny_config(out, "rl.iterations=3"), train, val, model_dir, out, grader=grader)
    return out / "model"


def interrupted_rl(task, grader, out: Path) -> list[Path]:
    _, train, val, model_dir = task
    with pytest.raises(Crash):
        run_rl(tiny_config(out, "rl.iterations=3"), train, val, model_dir, out, grader=grader, log=crash_at(3))
    dirs = checkpoint_dirs(out / "checkpoints")
    assert [d.name for d in dirs] == ["step-1", "step-2"]
    return dirs


@pytest.mark.parametrize(
    ("damage", "file"),
    [("truncated", "model/model.safetensors"), ("flipped", "extra.pt"), ("empty", "state.json"),
     ("deleted", "model/config.json")],
)
def test_rl_resumes_from_the_previous_checkpoint_when_the_latest_is_damaged(
    task, grader, tmp_path, rl_reference, caplog, damage, file
):
    _, train, val, model_dir = task
    previous, latest = interrupted_rl(task, grader, tmp_path)
    DAMAGE[damage](latest / file)
    with caplog.at_level(logging.INFO, logger="rft"):
        run_rl(tiny_config(tmp_path, "rl.iterations=3"), train, val, model_dir, tmp_path, grader=grader)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(latest) in w and file.split("/")[-1] in w for w in warnings), warnings
    assert any(f"resuming RL from {previous} (iteration 1)" in r.getMessage() for r in caplog.records)
    assert same_weights(tmp_path / "model", rl_reference)


def test_rl_starts_over_with_a_warning_when_every_checkpoint_is_damaged(task, grader, tmp_path, rl_reference, caplog):
    _, train, val, model_dir = task
    for checkpoint in interrupted_rl(task, grader, tmp_path):
        truncate(checkpoint / "model" / "model.safetensors")
    with caplog.at_level(logging.INFO, logger="rft"):
        run_rl(tiny_config(tmp_path, "rl.iterations=3"), train, val, model_dir, tmp_path, grader=grader)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("training starts from the beginning" in w for w in warnings)
    assert not any("resuming RL from" in r.getMessage() for r in caplog.records)
    assert same_weights(tmp_path / "model", rl_reference)
    assert [d.name for d in checkpoint_dirs(tmp_path / "checkpoints")] == ["step-2", "step-3"]


def test_a_stale_checkpoint_past_the_resumed_one_is_removed_when_the_run_passes_it(task, grader, tmp_path):
    _, train, val, model_dir = task
    previous, latest = interrupted_rl(task, grader, tmp_path)
    # A damaged checkpoint further on than any the run will write (written with a longer interval).
    far = tmp_path / "checkpoints" / "step-9"
    shutil.copytree(latest, far)
    truncate(far / "optimizer.pt")
    run_rl(tiny_config(tmp_path, "rl.iterations=3"), train, val, model_dir, tmp_path, grader=grader)
    assert [d.name for d in checkpoint_dirs(tmp_path / "checkpoints")] == ["step-2", "step-3"]


def test_the_final_model_directory_carries_a_manifest_that_verifies(rl_reference, sft_reference):
    for model_dir in (rl_reference, sft_reference):
        assert (model_dir / MANIFEST).is_file() and directory_problem(model_dir) is None
