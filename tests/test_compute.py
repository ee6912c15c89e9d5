"""The `compute` section without starting Ray: what it accepts, what preflight refuses before any
stage runs (Ray missing, a cluster that cannot be reached, named by its address; settings that do
not split over the processes; FSDP with LoRA), the per-process config, and `rft train rl`'s
default start (the sft stage's result). The runs on Ray are in tests/test_ray.py."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from rft.cli import app
from rft_core import compute, stages
from rft_core.config import ConfigError, RFTConfig
from rft_core.preflight import preflight

ROOT = Path(__file__).resolve().parents[1]
HAS_RAY = subprocess.run([sys.executable, "-c", "import ray"], capture_output=True).returncode == 0
needs_ray = pytest.mark.skipif(not HAS_RAY, reason="Ray is not installed (pip install 'rft[ray]')")


def closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load(*overrides: str) -> RFTConfig:
    return RFTConfig.load(None, list(overrides))


# --------------------------------------------------------------------------- the section


def test_the_default_trains_in_this_process_and_more_processes_do_not():
    assert compute.in_process(load())
    assert compute.where(load()) == "this process"
    assert not compute.in_process(load("compute.processes=2"))
    assert not compute.in_process(load("compute.address=127.0.0.1:6379"))  # one process, on the cluster
    # auto is a GPU count: 1 on a machine without GPUs, or when model.device rules them out.
    assert compute.local_processes(load("compute.processes=auto", "model.device=cpu")) == 1


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("compute.processes=0", "compute.processes: a number of processes (1 or more) or auto (got 0)"),
        ("compute.processes=two", "compute.processes: a number of processes (1 or more) or auto (got 'two')"),
        ("compute.processes=true", "(got True)"),
        ("compute.processes=1.5", "(got 1.5)"),
        ("compute.machines=2", "compute.machines=2 needs a Ray cluster: set compute.address"),
        ("compute.machines=0", "compute.machines"),
        ("compute.strategy=deepspeed", "compute.strategy: Input should be 'ddp' or 'fsdp'"),
        ("compute.start_timeout_s=0", "compute.start_timeout_s"),
        ("compute.nodes=2", "compute.nodes"),
    ],
)
def test_compute_settings_that_cannot_be_used_are_refused_when_the_config_loads(override, fragment):
    with pytest.raises(ConfigError) as caught:
        load(override)
    assert fragment in str(caught.value)


# --------------------------------------------------------------------------- before anything runs


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["sft.batch_size=5"], ["sft.batch_size (5) does not divide over the 2 training processes"]),
        (["rl.prompts_per_iteration=3", "rl.minibatch_size=3"],
         ["rl.prompts_per_iteration (3) does not divide over the 2", "rl.minibatch_size"]),
        (["rl.micro_batch_size=3"], ["rl.micro_batch_size (3) does not divide over the 2"]),
        (["sft.enabled=false", "sft.batch_size=5"], []),  # a stage that does not run splits nothing
        (["rl.enabled=false", "rl.prompts_per_iteration=3", "rl.minibatch_size=6"], []),
    ],
)
@needs_ray
def test_settings_that_do_not_split_over_the_processes_are_named_before_anything_runs(overrides, expected):
    found = [p for p in preflight(load("compute.processes=2", *overrides)) if "does not divide" in p]
    assert len(found) == len(expected), found
    for line, fragment in zip(found, expected, strict=True):
        assert fragment in line and "set it to a multiple of 2" in line


@needs_ray
def test_processes_times_machines_is_what_must_divide():
    address = f"127.0.0.1:{closed_port()}"
    found = preflight(load("compute.processes=2", "compute.machines=3", f"compute.address={address}",
                           "sft.batch_size=8"))
    assert any("sft.batch_size (8) does not divide over the 6 training processes" in p for p in found), found


@needs_ray
@pytest.mark.parametrize(
    ("address", "fragment"),
    [
        ("127.0.0.1:{port}", "compute.address 127.0.0.1:{port}: the Ray cluster cannot be reached (127.0.0.1:{port}: "),
        ("ray://127.0.0.1:{port}", "compute.address ray://127.0.0.1:{port}: the Ray cluster cannot be reached"),
        ("localhost:{port}", "compute.address localhost:{port}: the Ray cluster cannot be reached"),
        ("ray-head.invalid:6379", "compute.address ray-head.invalid:6379: the Ray cluster cannot be reached"),
        ("127.0.0.1", "compute.address 127.0.0.1: expected host:port"),
        ("head:port", "compute.address head:port: expected host:port"),
    ],
)
def test_a_ray_cluster_that_cannot_be_reached_is_named_by_its_address(address, fragment):
    port = closed_port()
    address, fragment = address.format(port=port), fragment.format(port=port)
    found = [p for p in preflight(load(f"compute.address={address}")) if p.startswith("compute.address")]
    assert len(found) == 1 and fragment in found[0], found


@needs_ray
def test_auto_names_the_cluster_it_looked_for(monkeypatch):
    address = f"127.0.0.1:{closed_port()}"
    monkeypatch.setenv("RAY_ADDRESS", address)  # what `auto` means first
    (found,) = [p for p in preflight(load("compute.address=auto")) if p.startswith("compute.address")]
    assert f"compute.address auto (RAY_ADDRESS={address}): the Ray cluster cannot be reached ({address}: " in found


@needs_ray
def test_rft_run_refuses_an_unreachable_cluster_in_one_line_before_any_stage(tmp_path):
    address = f"127.0.0.1:{closed_port()}"
    result = CliRunner().invoke(app, ["run", "--set", f"output_dir={tmp_path}", "--set", f"compute.address={address}"])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: compute.address {address}: the Ray cluster cannot be reached")
    assert not (tmp_path / "stages").exists()  # nothing ran


def test_without_ray_installed_the_install_command_is_named():
    # A Python where `import ray` fails, as on an install without the extra.
    script = (
        "import sys; sys.modules['ray'] = None\n"
        "from rft_core.config import RFTConfig; from rft_core.preflight import preflight\n"
        "print('\\n'.join(preflight(RFTConfig.load(None, ['compute.processes=2']))))\n"
        "print('\\n'.join(preflight(RFTConfig.load(None, []))) or 'default: no problem')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert ("compute: training on this machine (a Ray instance of its own) (2 processes x 1 machines) runs on Ray, "
            "which is not installed here: pip install 'rft[ray]'") in done.stdout
    assert "default: no problem" in done.stdout  # one process needs no Ray


@needs_ray
def test_fsdp_is_refused_for_lora_before_training():
    found = preflight(load("compute.processes=2", "compute.strategy=fsdp", "model.lora.enabled=true"))
    assert any(p.startswith("compute.strategy=fsdp shards fully trained models only") for p in found), found
    assert not [p for p in preflight(load("compute.processes=2", "compute.strategy=fsdp")) if "fsdp" in p]


def test_a_launch_by_hand_decides_where_training_runs(monkeypatch):
    cfg = load("compute.processes=2", "sft.batch_size=5", "compute.address=127.0.0.1:1")
    assert compute.problems(cfg)
    monkeypatch.setenv("WORLD_SIZE", "2")  # one of the processes `accelerate launch` started
    assert compute.launched_by_hand() and compute.problems(cfg) == []


# --------------------------------------------------------------------------- what each process trains with


def test_each_process_takes_its_share_of_the_sft_batch_and_reads_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "grader.yaml").write_text(yaml.safe_dump({"type": "string_check", "name": "s", "operation": "eq",
                                                            "input": "{{ sample.output_text }}",
                                                            "reference": "{{ item.reference }}"}))
    cfg = load("output_dir=runs", "grader.file=grader.yaml", "sft.batch_size=8", "rl.minibatch_size=8")
    one, four = compute.worker_config(cfg, 1), compute.worker_config(cfg, 4)
    assert one.sft.batch_size == 8 and four.sft.batch_size == 2
    assert four.rl == cfg.rl  # RL's batch settings are totals already
    assert four.output_dir == str(tmp_path / "runs") and four.grader.file == str(tmp_path / "grader.yaml")
    assert cfg.sft.batch_size == 8 and cfg.output_dir == "runs"  # the caller's config is untouched
    # The stage keys read neither: the pipeline on 4 processes reuses what 1 process computed.
    split = stages.SplitRecord("k", "t", "v", "m", "digest", "vd", 1, 1, 0)
    assert stages.sft_key(load("compute.processes=4"), split) == stages.sft_key(load(), split)
    with pytest.raises(ConfigError, match=r"sft.batch_size \(8\) does not divide over the 3"):
        compute.worker_config(cfg, 3)


def test_rl_with_several_minibatches_per_epoch_is_said_to_differ_on_several_processes():
    # 4 prompts x 2 samples = 8 rows an iteration: one minibatch of 8 is the whole batch on any number of
    # processes; minibatches of 4 hold other samples on 2 processes (each shuffles its own rows).
    assert compute.rl_update_differs(load("rl.minibatch_size=8", "rl.prompts_per_iteration=4",
                                          "rl.samples_per_prompt=2"), 2) is None
    assert compute.rl_update_differs(load("rl.minibatch_size=4", "rl.prompts_per_iteration=4",
                                          "rl.samples_per_prompt=2"), 1) is None
    said = compute.rl_update_differs(load("rl.minibatch_size=4", "rl.prompts_per_iteration=4",
                                          "rl.samples_per_prompt=2"), 2)
    assert said.startswith("rl.minibatch_size (4) cuts each PPO epoch's 8 samples into several minibatches")
    assert "rl.minibatch_size >= 8 trains the same numbers" in said


# --------------------------------------------------------------------------- rft train rl's start


def test_rft_train_rl_starts_from_the_sft_stage_s_result_by_default(tmp_path, monkeypatch):
    from training_fixtures import TINY

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    config = tmp_path / "config.yaml"
    raw: dict = {"output_dir": str(tmp_path / "out")}
    for override in [*TINY, "model.tiny.pretrain_steps=2", "sft.max_steps=2", "rl.iterations=1"]:
        key, value = override.split("=")
        node = raw
        *path, last = key.split(".")
        for name in path:
            node = node.setdefault(name, {})
        node[last] = yaml.safe_load(value)
    config.write_text(yaml.safe_dump(raw))
    runner = CliRunner()

    # No sft result yet: one line saying what to do.
    result = runner.invoke(app, ["train", "rl", "--config", str(config)])
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: rl starts from the sft stage's result for this config, ")
    assert "it is missing: run `rft train sft` with the same config first" in line
    assert not (tmp_path / "out" / "cache").exists()  # found out before the tiny model was built

    result = runner.invoke(app, ["train", "sft", "--config", str(config)])
    assert result.exit_code == 0, result.output
    sft_dir = json.loads(result.stdout[result.stdout.index("{"):])["model_dir"]
    result = runner.invoke(app, ["train", "rl", "--config", str(config)])
    assert result.exit_code == 0, result.output
    rl_dir = Path(json.loads(result.stdout[result.stdout.index("{"):])["model_dir"]).parent
    state = json.loads((rl_dir / "checkpoints" / "step-1" / "state.json").read_text())
    assert state["settings"]["start_model"] == sft_dir  # not the base model
    # The RL stage directory the pipeline would use after that sft stage: either resumes the other.
    cfg = RFTConfig.from_yaml(config)
    split = stages.split_stage(cfg, stages.validate_stage(cfg))
    sft = stages.ModelRecord(stages.sft_key(cfg, split), "sft", sft_dir)
    assert rl_dir == stages.stage_path(cfg, "rl", stages.rl_key(cfg, sft))

    # With sft off, the pipeline's RL starts from the base model: so does rft train rl.
    result = runner.invoke(app, ["train", "rl", "--config", str(config), "--set", "sft.enabled=false"])
    assert result.exit_code == 0, result.output
    rl_dir = Path(json.loads(result.stdout[result.stdout.index("{"):])["model_dir"]).parent
    start = json.loads((rl_dir / "checkpoints" / "step-1" / "state.json").read_text())["settings"]["start_model"]
    assert Path(start).parent == tmp_path / "out" / "cache" and Path(start).name.startswith("tiny-")


# --------------------------------------------------------------------------- rft's guards, from the CLI


def tiny_config_file(tmp_path: Path, *overrides: str) -> Path:
    from training_fixtures import TINY

    raw: dict = {"output_dir": str(tmp_path / "out")}
    for override in [*TINY, "model.tiny.pretrain_steps=2", *overrides]:
        key, value = override.split("=", 1)
        node = raw
        *path, last = key.split(".")
        for name in path:
            node = node.setdefault(name, {})
        node[last] = yaml.safe_load(value)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    return config


@pytest.mark.parametrize(
    ("stage", "overrides", "expected"),
    [
        ("sft", ["sft.lr=1e30", "sft.max_steps=2"], r"error: sft step 1: non-finite .*Lower sft\.lr \(now 1e\+30\)"),
        ("rl", ["sft.enabled=false", "rl.lr=1e30", "rl.iterations=2"],
         r"error: RL iteration 1: non-finite .*Lower rl\.lr \(now 1e\+30\)"),
        ("rl", ["sft.enabled=false", "rl.iterations=2", "grader.spec.type=python",
                "grader.spec.source=\"def grade(sample, item):\\n    raise ValueError('no grade')\\n\""],
         r"error: RL iteration 1: the grader failed on 8 of 8 samples \(100%"),
    ],
    ids=["sft-diverges", "rl-diverges", "grader-fails"],
)
def test_a_stage_stopped_by_a_guard_in_this_process_is_one_error_line_without_a_resume_hint(
    tmp_path, monkeypatch, stage, overrides, expected
):
    # In one process as on several (tests/test_ray.py): the guard's message, exit 2, no traceback,
    # and no "resume" hint (the same command would stop the same way; the message says what to change).
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    config = tiny_config_file(tmp_path, *overrides)
    result = CliRunner().invoke(app, ["train", stage, "--config", str(config)])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and re.match(expected, errors[0]), result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "resume" not in errors[0]


# --------------------------------------------------------------------------- a failed rank, in words


def _ranks_errors():
    from ray.exceptions import ActorDiedError, OutOfMemoryError

    from rft_core.guards import GraderFailing, TrainingDiverged

    diverged = "RL iteration 3: non-finite weights after an optimizer step at lr 1e+30; Lower rl.lr"
    lost = RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:1234")
    return {
        "a guard on every rank": ({0: TrainingDiverged(diverged), 1: TrainingDiverged(diverged)}, 2,
                                  "rl failed on rank 0 of 2: TrainingDiverged: " + diverged
                                  + "; rank 1 failed the same way", False),
        "a grader on some ranks": ({1: GraderFailing("RL iteration 1: the grader failed"), 2: lost, 3: lost}, 4,
                                   "rl failed on rank 1 of 4: GraderFailing: RL iteration 1: the grader failed; "
                                   "ranks 0, 2, 3 were stopped with it", False),
        "a killed rank, its peer lost": ({0: lost, 1: ActorDiedError()}, 2,
                                         "rl failed on rank 1 of 2: its process died without an error of its own "
                                         "(killed, e.g. by kill -9 or the out-of-memory killer, or crashed); "
                                         "rank 0 was stopped with it", True),
        "an exception on one rank of three": ({2: ValueError("bad row\nsecond line")}, 3,
                                              "rl failed on rank 2 of 3: ValueError: bad row; ranks 0, 1 were "
                                              "stopped with it", True),
        "a rank out of memory": ({0: lost, 1: OutOfMemoryError("the node ran low on memory")}, 2,
                                 "rl failed on rank 1 of 2: its process ran out of memory (Ray's memory monitor "
                                 "killed it): the node ran low on memory; rank 0 was stopped with it", True),
        "only lost peers": ({1: lost}, 2, f"rl failed on rank 1 of 2: RuntimeError: {lost}; rank 0 was stopped "
                                          "with it", True),
    }


CASES = ["a guard on every rank", "a grader on some ranks", "a killed rank, its peer lost",
         "an exception on one rank of three", "a rank out of memory", "only lost peers"]


@needs_ray
@pytest.mark.parametrize("case", CASES)
def test_a_failed_stage_names_the_rank_that_failed_first_and_what_the_others_did(case):
    from rft_core.launch import rank_failure

    failures, world, message, resumable = _ranks_errors()[case]
    failure = rank_failure("rl", world, failures)
    assert str(failure) == message
    assert failure.resumable is resumable  # not after a guard: the same config stops the same way
    assert failure.__cause__ is failures[failure.rank]


def test_the_reaper_kills_its_ray_instance_when_its_driver_dies_however_the_news_comes() -> None:
    """A killed driver closes the reaper's stdin and sends its parent-death SIGTERM at once: the
    signal handler then runs inside the reap that stdin's end began (a plain lock deadlocked there
    about one time in six, leaving Ray's agents running). Each way, and both at once, it kills its
    processes and exits."""
    import signal
    import time

    launch = pytest.importorskip("rft_core.launch", exc_type=ImportError)  # needs ray
    for how in ("stdin", "sigterm", "both") * 4:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        reaper = subprocess.Popen([sys.executable, "-c", launch._REAPER, str(child.pid)], stdin=subprocess.PIPE,
                                  start_new_session=True)
        time.sleep(0.3)
        if how in ("stdin", "both"):
            reaper.stdin.close()
        if how in ("sigterm", "both"):
            reaper.send_signal(signal.SIGTERM)
        try:
            assert reaper.wait(timeout=30) == 0, how
            assert child.wait(timeout=30) == -signal.SIGKILL, how
        finally:
            for proc in (reaper, child):
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
