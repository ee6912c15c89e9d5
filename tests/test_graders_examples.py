"""Every example grader in examples/graders/ comes with the item and the sample it is meant for
(`<name>.example.json`), and `rft grade` gives the reward the example says, as the README of that
folder shows the command. The graders that ask a model run here against stand-ins where their spec
says the model is: tiny local models under ./models/ of the working directory, and a
chat-completions server for the one that calls an endpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from graders_fixtures import ChatServer, build_tiny_lm
from typer.testing import CliRunner

from rft.cli import app
from rft_core.graders import load_grader_spec

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "graders"
SPECS = sorted(p for p in EXAMPLES.iterdir() if p.suffix in (".json", ".yaml") and not p.name.endswith(".example.json"))


def example_of(spec: Path) -> dict:
    return json.loads((EXAMPLES / f"{spec.stem}.example.json").read_text())


def grade(spec: Path, example: dict, cwd: Path) -> tuple[int, dict]:
    result = CliRunner().invoke(app, ["grade", "--grader", str(spec), "--item", json.dumps(example["item"]),
                                      "--sample", example["sample"]])
    return result.exit_code, json.loads(result.stdout) if result.stdout.strip() else {"stderr": result.stderr}


def test_every_example_grader_has_its_example_and_the_folder_readme_shows_it() -> None:
    readme = (EXAMPLES / "README.md").read_text()
    for spec in SPECS:
        example = example_of(spec)
        assert {"item", "sample", "note"} <= set(example), spec.name
        assert ("reward" in example) != ("needs" in example), spec.name  # a reward to check, or what it needs
        assert spec.name in readme, spec.name
    leftover = {p.name for p in EXAMPLES.glob("*.example.json")} - {f"{s.stem}.example.json" for s in SPECS}
    assert not leftover


@pytest.mark.parametrize("spec", [s for s in SPECS if "reward" in example_of(s)], ids=lambda p: p.name)
def test_rft_grade_gives_each_example_its_reward(spec: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    example = example_of(spec)
    code, result = grade(spec, example, tmp_path)
    assert code == 0, result
    assert result["errors"] == [] and result["reward"] == pytest.approx(example["reward"], abs=1e-3)


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A working directory whose ./models/ holds what the model graders' specs name: a judge that
    answers "correct", and an embedding model."""
    root = tmp_path_factory.mktemp("examples")
    build_tiny_lm(root / "models" / "judge", reply_token="correct")
    build_tiny_lm(root / "models" / "all-MiniLM-L6-v2")
    return root


@pytest.mark.parametrize("spec", [s for s in SPECS if "needs" in example_of(s)], ids=lambda p: p.name)
def test_the_model_graders_grade_their_example_where_the_model_is(spec: Path, stand_ins: Path, tmp_path: Path,
                                                                  monkeypatch) -> None:
    monkeypatch.chdir(stand_ins)
    example = example_of(spec)
    if "base_url" in load_grader_spec(spec):
        # An endpoint: the same spec pointed at a chat-completions server of this test (whatever
        # listens at the example's own address on this machine is not ours to call).
        with ChatServer(lambda request: "8") as server:
            copy = tmp_path / spec.name
            copy.write_text(spec.read_text().replace("http://127.0.0.1:8000/v1", server.base_url))
            code, result = grade(copy, example, stand_ins)
        assert code == 0 and result["reward"] == pytest.approx(0.8), result
        return
    code, result = grade(spec, example, stand_ins)
    assert code == 0, result
    assert result["errors"] == [] and 0.0 <= result["reward"] <= 1.0
    if spec.name.startswith("label_model"):
        assert result["reward"] == 1.0  # the stand-in judge answers "correct"
