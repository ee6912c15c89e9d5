"""SFT and one PPO iteration on 2 CPU processes (gloo, via `accelerate launch`, data parallel) equal
the 1-process run; the 2-process launch builds the tiny model from an empty cache."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

CONFIG = {
    "data": {"synthetic": {"n_train": 64, "n_val": 16, "max_steps": 2}},
    "model": {"tiny": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64, "vocab_size": 320}},
    "sft": {"batch_size": 4, "max_steps": 4, "checkpoint_interval": 0, "keep_best": False},
    "eval": {"max_items": 8, "max_new_tokens": 16},
    "rl": {"iterations": 1, "prompts_per_iteration": 4, "samples_per_prompt": 2, "minibatch_size": 8,
           "ppo_epochs": 1, "max_new_tokens": 16, "eval_interval": 0, "lr": 1e-3, "critic_warmup": 0},
    "grader": {"spec": {"type": "numeric_match", "partial_credit": 0.1}},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rft_train(cfg: Path, *args: str, processes: int = 1) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if processes == 1:
        cmd = [sys.executable, "-m", "rft", "train", *args, "--config", str(cfg)]
    else:
        cmd = [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()), "-m", "rft", "train", *args, "--config", str(cfg),
        ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout[done.stdout.index("{"):])


def max_difference(a: Path, b: Path) -> float:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


@pytest.mark.slow
def test_two_processes_compute_the_same_sft_and_ppo_updates_as_one(tmp_path):
    one = tmp_path / "one.yaml"
    two = tmp_path / "two.yaml"
    # Same global batch: 1 process x 8, or 2 processes x 4.
    one.write_text(yaml.safe_dump({**CONFIG, "output_dir": str(tmp_path / "out"),
                                   "sft": {**CONFIG["sft"], "batch_size": 8}}))
    two.write_text(yaml.safe_dump({**CONFIG, "output_dir": str(tmp_path / "out")}))

    # 2 processes first, from an empty cache: the main process pretrains the tiny model in a loop of
    # its own while the other waits (the pretraining's loop once joined the group and hung).
    sft2 = rft_train(two, "sft", "--out", str(tmp_path / "sft2"), processes=2)
    sft1 = rft_train(one, "sft", "--out", str(tmp_path / "sft1"))
    base = next((tmp_path / "out" / "cache").glob("tiny-*"))
    moved = max_difference(Path(sft1["model_dir"]), base)
    assert moved > 1e-4
    assert max_difference(Path(sft1["model_dir"]), Path(sft2["model_dir"])) < moved * 1e-3
    assert sft1["metrics"]["val_loss"] == pytest.approx(sft2["metrics"]["val_loss"], rel=1e-5)

    init = sft1["model_dir"]
    rl1 = rft_train(one, "rl", "--init-model", init, "--out", str(tmp_path / "rl1"))
    rl2 = rft_train(two, "rl", "--init-model", init, "--out", str(tmp_path / "rl2"), processes=2)
    moved = max_difference(Path(rl1["model_dir"]), Path(init))
    assert moved > 1e-5
    assert max_difference(Path(rl1["model_dir"]), Path(rl2["model_dir"])) < moved * 1e-3
    head1 = torch.load(tmp_path / "rl1" / "value_head.pt")
    head2 = torch.load(tmp_path / "rl2" / "value_head.pt")
    assert torch.allclose(head1["weight"], head2["weight"], atol=1e-6)
    assert rl1["metrics"] == pytest.approx(rl2["metrics"])
