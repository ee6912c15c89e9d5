"""Which stages a config change reruns.

Only what changes what a stage computes may enter its cache key (`rft_core.stages.*_key`). Two
layers of proof:

- every field of every section, changed one at a time, against the stage keys (pure functions, no
  Prefect): the first stage whose key changes, and that nothing before it changes;
- one change per section through the real flow (Prefect's test harness, a real MLflow store, the
  tiny model): which stages come back `Cached` and which run again.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import pytest
from pydantic import BaseModel

from rft_core import stages, tracking
from rft_core.config import ConfigError, RFTConfig, apply_overrides

ORDER = ("validate", "split", "sft", "rl", "evaluate", "register")


def stage_keys(cfg: RFTConfig) -> dict[str, str]:
    """Each cacheable stage's key, chained as the flow chains them (a record's digest stands for
    what its stage wrote: the same key, the same digest)."""
    validate = stages.validate_key(cfg)
    data = stages.DataRecord(key=validate, train_items="", val_items=None, digest=validate, reports={})
    split = stages.split_key(cfg, data)
    split_record = stages.SplitRecord(key=split, train_items="", val_items="", manifest="", digest=split,
                                      val_digest=split, n_train=1, n_val=1, leakage=0)
    sft = stages.ModelRecord(stages.sft_key(cfg, split_record), "sft", "sft")
    rl = stages.ModelRecord(stages.rl_key(cfg, sft), "rl", "rl")
    evaluate = stages.EvalRecord(stages.evaluate_key(cfg, {"sft": sft, "rl": rl}), {}, "")
    register = stages.register_key(cfg, evaluate, tracking.resolve_tracking_uri(cfg))
    return {"validate": validate, "split": split, "sft": sft.key, "rl": rl.key, "evaluate": evaluate.key,
            "register": register}


def rerun(before: RFTConfig, after: RFTConfig) -> tuple[str, ...]:
    """The stages a change reruns: those whose key changed (the ones after a changed stage follow)."""
    old, new = stage_keys(before), stage_keys(after)
    return tuple(stage for stage in ORDER if old[stage] != new[stage])


def from_(stage: str | None) -> tuple[str, ...]:
    return () if stage is None else ORDER[ORDER.index(stage):]


# --------------------------------------------------------------------------- every field


def leaf_fields(model: type[BaseModel], prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted name, annotation) of every leaf field of a config section, sub-sections walked."""
    found = []
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            found += leaf_fields(annotation, f"{prefix}{name}.")
        else:
            found.append((f"{prefix}{name}", annotation))
    return found


def candidates(value: Any, annotation: Any) -> list[Any]:
    """Other values of a field's type to try, in order (the config's own validation picks)."""
    if get_origin(annotation) is Literal:
        return [v for v in get_args(annotation) if v != value]
    if get_origin(annotation) in (typing.Union, types.UnionType):
        return [c for arg in get_args(annotation) if arg is not type(None) for c in candidates(value, arg)] + (
            [None] if value is not None else [])
    if annotation is bool:
        return [not value]
    if annotation is int:
        base = value if isinstance(value, int) else 0
        return [base + 1, base + 2, 1, 8]
    if annotation is float:
        base = value if isinstance(value, float) else 0.5
        return [base / 2, base + 0.1, 0.5, 0.05, 2.0]
    if annotation is str:
        return [f"{value}-changed" if value else "changed", "{prompt} =", ","]
    if get_origin(annotation) is list:
        return [["q_proj", "v_proj"], ["accuracy"]]
    if get_origin(annotation) is dict:
        return [{"type": "string_check", "name": "exact", "input": "{{ sample.output_text }}",
                 "reference": "{{ item.reference }}", "operation": "eq"}]
    return []


def changed(cfg: RFTConfig, field: str, annotation: Any) -> RFTConfig | None:
    """`cfg` with `field` set to another valid value, or None when no candidate validates."""
    current: Any = cfg
    for part in field.split("."):
        current = getattr(current, part)
    for value in candidates(current, annotation):
        raw = cfg.model_dump(mode="json")
        node = raw
        *path, last = field.split(".")
        for part in path:
            node = node[part]
        node[last] = value
        try:
            other = RFTConfig.from_dict(raw)
        except ConfigError:
            continue
        if other != cfg:
            return other
    return None


# The first stage each change reruns (None: none). Fields not named take their section's rule.
SECTION_RULE = {
    "data": "validate",
    "data.synthetic": "validate",
    "model": "sft",
    "sft": "sft",
    "rl": "rl",
    "grader": "sft",
    "eval": "sft",
    "tracking": None,
    "registry": None,
    "compute": None,  # where a stage trains, not what: 1 process or 8 make the same update
}
FIELD_RULE: dict[str, str | None] = {
    "experiment": None,
    "run_name": None,
    "seed": None,  # no stage reads it
    **{f"data.{name}": "split" for name in ("val_fraction", "val_size", "seed", "max_items", "near_duplicate_threshold")},
    "sft.checkpoint_interval": None,  # a resumed run ends with the same weights as a straight one
    "rl.checkpoint_interval": None,
    "rl.max_prompt_length": "sft",  # every rendering of a prompt is cut there, validation's too
    "grader.workers": None,  # how many processes grade, not the grades
    "grader.spec": "validate",  # a non-numeric grader accepts text references
    "eval.k": "evaluate",
    "eval.num_logged_samples": "evaluate",
    "tracking.tracking_uri": "register",  # one registered version per store
    "registry.model_name": "register",
}
SKIPPED = {
    "output_dir": "where the stages and their cache live: another one starts from nothing",
    "data.train_path": "a file the key digests; tested below with real files",
    "data.val_path": "a file the key digests; tested below with real files",
    "grader.file": "a file the key reads; tested below",
    "compute.machines": "valid only with a cluster's address; tested below with one",
}


def expected_first(field: str) -> str | None:
    if field in FIELD_RULE:
        return FIELD_RULE[field]
    section = field.rsplit(".", 1)[0]
    while section not in SECTION_RULE:
        if "." not in section:
            raise AssertionError(f"{field}: its section has no rule in SECTION_RULE (a new section: add one)")
        section = section.rsplit(".", 1)[0]
    return SECTION_RULE[section]


FIELDS = [(name, annotation) for name, annotation in leaf_fields(RFTConfig) if name not in SKIPPED]


@pytest.mark.parametrize(("field", "annotation"), FIELDS, ids=[name for name, _ in FIELDS])
def test_a_change_to_any_field_reruns_its_stage_and_what_follows_only(field: str, annotation: Any) -> None:
    base = RFTConfig()
    other = changed(base, field, annotation)
    assert other is not None, f"no other valid value found for {field}"
    assert rerun(base, other) == from_(expected_first(field))


def test_where_a_stage_trains_enters_no_key() -> None:
    here = RFTConfig()
    for overrides in (["compute.address=127.0.0.1:6379", "compute.machines=2"],
                      ["compute.address=auto", "compute.machines=4", "compute.processes=2"]):
        assert rerun(here, RFTConfig.load(overrides=overrides)) == from_(None), overrides


def test_eval_sampling_settings_enter_training_only_when_validation_samples() -> None:
    sampled = RFTConfig()
    greedy = RFTConfig.load(overrides=["eval.sampled_validation=false"])
    for field in ("temperature", "top_k", "top_p", "min_p", "seed"):
        value = {"temperature": 0.7, "top_k": 5, "top_p": 0.9, "min_p": 0.1, "seed": 3}[field]
        assert rerun(sampled, sampled.model_copy(update={"eval": sampled.eval.model_copy(update={field: value})})) \
            == from_("sft"), field
        assert rerun(greedy, greedy.model_copy(update={"eval": greedy.eval.model_copy(update={field: value})})) \
            == from_("evaluate"), field


def test_the_tiny_model_section_counts_only_for_the_tiny_model() -> None:
    hub = RFTConfig.load(overrides=["model.name_or_path=my/model"])
    for override in ("model.tiny.hidden_size=64", "model.tiny.pretrain_steps=7", "data.synthetic.n_train=50"):
        after = RFTConfig.load(overrides=["model.name_or_path=my/model", override])
        first = "validate" if override.startswith("data.") else None  # synthetic data is still generated
        assert rerun(hub, after) == from_(first), override
    # With the tiny model, the task family it pretrains on is part of the model.
    tiny = RFTConfig.load(overrides=["data.train_path=x.jsonl"])
    assert rerun(tiny, RFTConfig.load(overrides=["data.train_path=x.jsonl", "data.synthetic.max_steps=3"])) \
        == from_("sft")


def test_data_files_enter_by_content(tmp_path: Path) -> None:
    train = tmp_path / "train.jsonl"
    train.write_text('{"question": "1+1?", "answer": "2 #### 2"}\n')
    cfg = RFTConfig.load(overrides=[f"data.train_path={train}"])
    before = stage_keys(cfg)
    train.write_text('{"question": "1+2?", "answer": "3 #### 3"}\n')
    assert stage_keys(cfg)["validate"] != before["validate"]
    val = tmp_path / "val.jsonl"
    val.write_text('{"question": "2+2?", "answer": "4 #### 4"}\n')
    assert rerun(cfg, RFTConfig.load(overrides=[f"data.train_path={train}", f"data.val_path={val}"])) \
        == from_("validate")


def test_a_numeric_grader_with_other_settings_reruns_training_not_validation() -> None:
    spec = {"type": "numeric_match", "input": "{{ sample.output_text }}", "reference": "{{ item.reference }}"}
    a = RFTConfig.from_dict({"grader": {"spec": {**spec, "partial_credit": 0.1}}})
    b = RFTConfig.from_dict({"grader": {"spec": {**spec, "partial_credit": 0.0}}})
    assert rerun(a, b) == from_("sft")


def test_a_grader_file_enters_by_content_not_by_path(tmp_path: Path) -> None:
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    for path in (first, second):
        path.write_text("type: numeric_match\nname: answer\ninput: '{{ sample.output_text }}'\n"
                        "reference: '{{ item.reference }}'\npartial_credit: 0.1\n")
    a = RFTConfig.load(overrides=[f"grader.file={first}"])
    b = RFTConfig.load(overrides=[f"grader.file={second}"])
    assert rerun(a, b) == ()  # the same grader under another name
    before = stage_keys(a)
    first.write_text(first.read_text().replace("0.1", "0.2"))  # edited in place: other rewards
    after = stage_keys(a)
    assert [stage for stage in ORDER if before[stage] != after[stage]] == list(from_("sft"))


# --------------------------------------------------------------------------- through the flow

TINY = {
    "experiment": "keys",
    "data": {"synthetic": {"n_train": 48, "n_val": 8, "max_steps": 1}},
    "model": {"tiny": {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 32,
                       "vocab_size": 300, "pretrain_steps": 2}},
    "sft": {"batch_size": 8, "max_steps": 2, "eval_interval": 0, "checkpoint_interval": 0},
    "rl": {"iterations": 1, "prompts_per_iteration": 4, "samples_per_prompt": 2, "minibatch_size": 8,
           "max_new_tokens": 8, "eval_interval": 0, "checkpoint_interval": 0, "critic_warmup": 0},
    "eval": {"max_new_tokens": 8, "sampled_validation": False},
    "registry": {"model_name": "keys", "promote": False},
}


@pytest.fixture(scope="module")
def flow_runs(tmp_path_factory: pytest.TempPathFactory):
    """`run(*overrides)` runs the pipeline flow on the tiny config (one output directory, one MLflow
    store, one Prefect API for the module) and returns (summary, {stage: Prefect state name})."""
    from prefect.testing.utilities import prefect_test_harness

    out = tmp_path_factory.mktemp("keys")

    def run(*overrides: str) -> tuple[dict[str, Any], dict[str, str]]:
        from flows.pipeline import rft_pipeline

        cfg = RFTConfig.from_dict(apply_overrides({**TINY, "output_dir": str(out)}, list(overrides)))
        state = rft_pipeline(config=cfg, return_state=True)
        return state.result(), task_states(state.state_details.flow_run_id)

    with prefect_test_harness(server_startup_timeout=120):
        first = run()
        yield run, first


def task_states(flow_run_id: Any) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {run.name.rsplit("-", 1)[0]: run.state.name for run in runs}


def computed(states: dict[str, str]) -> tuple[str, ...]:
    """The cacheable stages that ran (not `Cached`)."""
    return tuple(stage for stage in ORDER if stage in states and states[stage] != "Cached")


def test_the_first_run_computes_every_stage(flow_runs) -> None:
    _, (summary, states) = flow_runs
    assert computed(states) == ORDER
    assert "reused" not in summary


# One change per section (and the top level): the stages it must run again. A store or registry
# change runs no training: `register` logs the cached model into the new store, or registers it
# under the new name.
FLOW_CASES = {
    "experiment=keys-elsewhere": (),
    "seed=7": (),
    "data.max_items=40": from_("split"),
    "data.val_size=6": ("split",),  # the validation file is the validation set: the same split
    "model.tiny.pretrain_steps=3": from_("sft"),
    "sft.checkpoint_interval=1": (),
    "sft.lr=0.002": from_("sft"),
    "rl.eval_interval=1": from_("rl"),
    "rl.guard.margin=0.2": from_("rl"),
    "rl.checkpoint_interval=1": (),
    "grader.workers=2": (),
    "grader.timeout_s=5": from_("sft"),
    "eval.num_logged_samples=3": ("evaluate", "register"),
    "eval.k=2": ("evaluate", "register"),
    "eval.max_new_tokens=6": from_("sft"),
    "tracking.log_models=false": (),
    "registry.model_name=keys-renamed": ("register",),
}


@pytest.mark.parametrize("override", list(FLOW_CASES))
def test_a_change_reruns_exactly_the_stages_it_affects(flow_runs, override: str) -> None:
    run, _ = flow_runs
    summary, states = run(override)
    assert computed(states) == FLOW_CASES[override], states
    assert set(summary["reused"]) == set(ORDER[:5]) - set(FLOW_CASES[override])


def test_another_tracking_store_reruns_no_training_and_registers_the_model_there(flow_runs, tmp_path) -> None:
    from mlflow import MlflowClient

    run, _ = flow_runs
    store = f"sqlite:///{tmp_path}/other.db"
    summary, states = run(f"tracking.tracking_uri={store}")
    assert computed(states) == ("register",)
    version = MlflowClient(store).get_model_version("keys", str(summary["registered"]["version"]))
    # The model was logged into this store, on this pipeline run's rl run.
    rl_run = MlflowClient(store).get_run(version.run_id)
    assert rl_run.data.tags["mlflow.parentRunId"] == summary["mlflow_run_id"]
    assert rl_run.data.tags["rft.stage"] == "rl"


def test_a_fully_cached_rerun_says_in_mlflow_that_it_reused_the_first_run(flow_runs) -> None:
    from mlflow import MlflowClient

    run, (first, _) = flow_runs
    summary, states = run()
    assert computed(states) == ()
    client = MlflowClient(summary["tracking_uri"])
    rerun_run, original = client.get_run(summary["mlflow_run_id"]), client.get_run(first["mlflow_run_id"])
    assert rerun_run.info.run_name == f"{original.info.run_name} (cached rerun)"
    assert rerun_run.data.tags["rft.rerun_of"] == first["mlflow_run_id"]
    note = rerun_run.data.tags["mlflow.note.content"]
    assert f"#/experiments/{original.info.experiment_id}/runs/{first['mlflow_run_id']}" in note
    for stage in ("validate", "split", "sft", "rl", "evaluate"):
        stage_run = rerun_run.data.tags[f"rft.reused.{stage}"]
        assert client.get_run(stage_run).data.tags["mlflow.parentRunId"] == first["mlflow_run_id"]
        assert f"`{stage}`" in note and stage_run in note
    # Not an empty run: the reused evaluation's figures and the data digest are on it.
    assert {key: value for key, value in rerun_run.data.metrics.items() if key.startswith("eval/")} == {
        key: value for key, value in original.data.metrics.items() if key.startswith("eval/")
    }
    assert rerun_run.data.tags["data_digest"] == original.data.tags["data_digest"]
