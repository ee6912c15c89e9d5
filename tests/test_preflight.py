"""Everything that can be checked before the first stage is checked there: config values (inf,
registry names), data files, grader specs, local model directories, the output directory; what
needs the data read (worked solutions for SFT, items for an RL batch) fails in the first stages,
before any training; and only failures that may pass by themselves are retried."""

from __future__ import annotations

import errno
import json
import sqlite3

import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import (
    INVALID_PARAMETER_VALUE,
    RESOURCE_DOES_NOT_EXIST,
    TEMPORARILY_UNAVAILABLE,
)
from typer.testing import CliRunner

from rft.cli import app
from rft_core import stages
from rft_core.config import ConfigError, RFTConfig
from rft_core.data import DataError
from rft_core.preflight import check, preflight
from rft_core.retries import transient


def cfg(tmp_path, *overrides: str) -> RFTConfig:
    return RFTConfig.load(None, [f"output_dir={tmp_path / 'out'}", *overrides])


@pytest.mark.parametrize(
    "override",
    ["rl.lr=inf", "rl.lr=-inf", "sft.epochs=inf", "sft.lr=nan", "rl.kl_coef=nan", "grader.timeout_s=inf",
     "eval.temperature=inf"],
)
def test_non_finite_settings_are_refused_when_the_config_loads(override) -> None:
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"{key}: Input should be a finite number"):
        RFTConfig.load(None, [override])


@pytest.mark.parametrize("name", ["bad/name", "a:b", "team/model:v1", "model@champion", " padded", "", "..", "x.rft-lock", "tab\there"])
def test_registry_names_mlflow_or_model_uris_cannot_hold_are_refused_when_the_config_loads(name) -> None:
    with pytest.raises(ConfigError, match=r"registry\.model_name: "):
        RFTConfig.from_dict({"registry": {"model_name": name}})


@pytest.mark.parametrize("name", ["rft-model", "gsm8k_qwen2.5-0.5b", "Team.Model v2"])
def test_ordinary_registry_names_pass(name) -> None:
    assert RFTConfig.load(None, [f"registry.model_name={name}"]).registry.model_name == name


def test_the_default_config_has_no_problems(tmp_path) -> None:
    assert preflight(cfg(tmp_path)) == []


def test_every_problem_of_a_config_is_listed_at_once(tmp_path) -> None:
    (tmp_path / "a-dir").mkdir()
    (tmp_path / "model").mkdir()
    grader_file = tmp_path / "grader.json"
    grader_file.write_text(json.dumps({"type": "string_check", "operation": "sort-of"}))
    problems = preflight(cfg(
        tmp_path,
        f"data.train_path={tmp_path / 'missing.jsonl'}",
        f"data.val_path={tmp_path / 'a-dir'}",
        f"grader.file={grader_file}",
        f"model.name_or_path={tmp_path / 'model'}",
    ))
    assert problems[0] == f"{tmp_path / 'missing.jsonl'}: data file (data.train_path) not found (no such file; check the path)"
    assert problems[1].startswith(f"{tmp_path / 'a-dir'}: is a directory") and "data.val_path" in problems[1]
    assert any(p.startswith(f"grader.file {grader_file}: ") and "sort-of" in p for p in problems)
    assert problems[-1] == f"model.name_or_path: {tmp_path / 'model'} has no config.json (not a saved model directory)"


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ({"type": "no_such_grader"}, "no_such_grader"),
        ({"type": "multi", "graders": {}, "calculate_output": "a +"}, "formula 'a +'"),
        ({"type": "python"}, "source"),
    ],
)
def test_an_invalid_inline_grader_spec_is_a_preflight_problem(tmp_path, spec, words) -> None:
    problems = preflight(cfg(tmp_path, f"grader.spec={json.dumps(spec)}"))
    assert problems and all(p.startswith("grader.spec: ") for p in problems)
    assert any(words in p for p in problems)
    with pytest.raises(ConfigError, match="grader.spec: "):
        check(cfg(tmp_path, f"grader.spec={json.dumps(spec)}"))


def test_an_unreadable_grader_file_and_an_output_dir_under_a_file_are_problems(tmp_path) -> None:
    bad = tmp_path / "grader.yaml"
    bad.write_text("type: [unclosed")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    problems = preflight(RFTConfig.load(None, [f"grader.file={bad}", f"output_dir={blocker / 'runs'}"]))
    assert problems[0].startswith("grader: ") and str(bad) in problems[0]
    assert problems[1] == f"output_dir: {blocker / 'runs'} cannot be created or written ({blocker} is not a writable directory)"


def test_a_hub_id_is_left_to_the_loader(tmp_path) -> None:
    assert preflight(cfg(tmp_path, "model.name_or_path=Qwen/Qwen2.5-0.5B-Instruct")) == []


@pytest.mark.parametrize("name", ["models/qwen2.5-instruct/v2", "rft_runs/stages/sft-0a1b/model", "./model", "~/nope"])
def test_a_relative_path_of_several_parts_is_a_local_directory_to_check(tmp_path, name) -> None:
    """A hub id is `org/name`: a name with more parts, or one that starts with . or ~, is a path."""
    assert preflight(cfg(tmp_path, f"model.name_or_path={name}")) == [
        f"model.name_or_path: {name} is not a directory (a local model is a directory with config.json)"]


def test_rft_train_checks_its_init_model_before_preparing_anything(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["train", "rl", "--init-model", "rft_runs/stages/sft-0a1b/model"])
    assert result.exit_code == 2
    assert result.stderr.strip() == ("error: --init-model: rft_runs/stages/sft-0a1b/model is not a directory "
                                     "(a local model is a directory with config.json)")
    assert not (tmp_path / "rft_runs").exists()


def test_rft_run_stops_on_preflight_problems_in_one_line_each_before_starting_anything(tmp_path) -> None:
    result = CliRunner().invoke(
        app, ["run", "--set", f"data.train_path={tmp_path / 'nope.jsonl'}", "--set", f"output_dir={tmp_path}"]
    )
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        f"error: {tmp_path / 'nope.jsonl'}: data file (data.train_path) not found (no such file; check the path)"
    )
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "stages").exists()


def test_sft_on_data_without_worked_solutions_fails_at_validation_and_says_to_turn_it_off(tmp_path) -> None:
    from pathlib import Path

    sample = Path(__file__).resolve().parents[1] / "examples" / "data" / "sample_openai.jsonl"
    with pytest.raises(DataError, match=r"no item has a worked solution.*set sft\.enabled=false"):
        stages.validate_stage(cfg(tmp_path, f"data.train_path={sample}", "data.val_size=2"))
    assert stages.validate_stage(cfg(tmp_path, f"data.train_path={sample}", "sft.enabled=false")).digest


def test_an_rl_batch_larger_than_the_training_set_fails_at_the_split(tmp_path) -> None:
    settings = ["data.synthetic.n_train=40", "data.synthetic.n_val=8"]
    data = stages.validate_stage(cfg(tmp_path, *settings))
    with pytest.raises(DataError, match=r"rl\.prompts_per_iteration \(100000\) is more than the 40 training items"):
        stages.split_stage(cfg(tmp_path, *settings, "rl.prompts_per_iteration=100000"), data)
    split = stages.split_stage(cfg(tmp_path, *settings, "rl.prompts_per_iteration=32"), data)
    assert split.n_train == 40
    # A cached split does not see a later rl section: the rl stage checks it again, before training.
    with pytest.raises(DataError, match="is more than the 40 training items"):
        stages.rl_stage(cfg(tmp_path, *settings, "rl.prompts_per_iteration=41"), split, stages.ModelRecord("k", "sft", "x"))
    assert stages.split_stage(cfg(tmp_path, *settings, "rl.enabled=false", "rl.prompts_per_iteration=100000"), data)


class _Wrapped(RuntimeError):
    pass


def _raised_from(cause: BaseException) -> BaseException:
    try:
        try:
            raise cause
        except BaseException as exc:
            raise _Wrapped("stage failed") from exc
    except _Wrapped as wrapped:
        return wrapped


@pytest.mark.parametrize(
    "error",
    [
        ConnectionRefusedError("127.0.0.1:5000"),
        ConnectionResetError("reset by peer"),
        TimeoutError("timed out"),
        OSError(errno.EAGAIN, "try again"),
        sqlite3.OperationalError("database is locked"),
        MlflowException("API request to http://127.0.0.1:5000/api failed with exception HTTPConnectionPool(...): Max retries exceeded"),
        MlflowException("busy", error_code=TEMPORARILY_UNAVAILABLE),
        _raised_from(ConnectionRefusedError("deep in the chain")),
    ],
)
def test_failures_that_may_pass_are_transient(error) -> None:
    assert transient(error)


@pytest.mark.parametrize(
    "error",
    [
        FileNotFoundError(errno.ENOENT, "No such file", "data/train.jsonl"),
        PermissionError(errno.EACCES, "denied"),
        ValueError("invalid"),
        DataError("no valid rows"),
        ConfigError("unknown key"),
        MlflowException("Invalid model name 'a/b'", error_code=INVALID_PARAMETER_VALUE),
        MlflowException("Registered Model with name=x not found", error_code=RESOURCE_DOES_NOT_EXIST),
        sqlite3.OperationalError("no such table: runs"),
        _raised_from(KeyError("missing")),
    ],
)
def test_deterministic_failures_are_not_transient(error) -> None:
    assert not transient(error)
