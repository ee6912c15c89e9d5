"""FSDP2 on 2 CPU processes (gloo, `accelerate launch --use_fsdp --fsdp_version 2`): SFT and PPO runs
end with the weights of the one-process run, and a run stopped after a checkpoint resumes to them.

The launches start from an empty cache: the tiny model's pretraining runs in the main process while
the other waits (it used to hang, its loop joining the distributed group). One-process runs are the
same library calls in this process (`rft train` minus its command line).
"""

from __future__ import annotations

import copy
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

from rft_core import stages
from rft_core.config import RFTConfig
from rft_core.data import read_items
from rft_core.rl.trainer import run_rl
from rft_core.sft import run_sft

CONFIG = {
    "data": {"synthetic": {"n_train": 64, "n_val": 16, "max_steps": 2}},
    "model": {"tiny": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64,
                       "vocab_size": 320, "pretrain_steps": 3, "pretrain_batch_size": 4}},
    # A constant learning rate: a run's length changes nothing but where it stops.
    "sft": {"batch_size": 2, "grad_accum": 2, "lr_scheduler": "constant", "warmup_ratio": 0.0,
            "checkpoint_interval": 2, "eval_interval": 0, "keep_best": False},
    "eval": {"max_items": 8, "max_new_tokens": 16},
    "rl": {"prompts_per_iteration": 4, "samples_per_prompt": 2, "minibatch_size": 8, "ppo_epochs": 1,
           "max_new_tokens": 16, "eval_interval": 0, "checkpoint_interval": 1, "keep_best": False,
           "lr_scheduler": "constant", "lr": 1e-3, "critic_warmup": 0},
    "grader": {"spec": {"type": "numeric_match", "partial_credit": 0.1}},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fsdp_train(cfg: Path, *args: str) -> str:
    """`rft train` on 2 processes with FSDP2; returns its stderr (the progress lines)."""
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp", "--fsdp_version", "2",
        "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), "-m", "rft", "train", *args, "--config", str(cfg),
    ]
    # A hang (the pretraining's old failure) fails here instead of blocking the suite.
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


def weights(stage_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(stage_dir / "model" / "model.safetensors"))


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


def write(tmp: Path, name: str, changes: dict) -> Path:
    cfg = copy.deepcopy(CONFIG)
    for section, values in changes.items():
        cfg[section].update(values)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**cfg, "output_dir": str(tmp / "out")}))
    return path


def one_process(config: Path, stage: str, out: Path, init: Path | None = None) -> None:
    cfg = RFTConfig.load(config, [])
    split = stages.split_stage(cfg, stages.validate_stage(cfg))
    train, val = read_items(split.train_items), read_items(split.val_items)
    if stage == "sft":
        run_sft(cfg, train, val, stages.base_model_path(cfg, split), out)
    else:
        run_rl(cfg, train, val, init, out)


@pytest.mark.slow
def test_fsdp_sft_and_ppo_equal_one_process_and_resume_from_their_checkpoints(tmp_path):
    # SFT: 2 processes x 2 micro-batches (gradients exchanged once, after the second) x 2 sequences,
    # or 1 process x 8 sequences: the same global batch.
    fsdp = {"sft": {"max_steps": 2}}
    log = fsdp_train(write(tmp_path, "sft2", fsdp), "sft", "--out", str(tmp_path / "sft-fsdp"))
    assert "FSDP2: LlamaForCausalLM sharded in 3 units" in log  # 2 decoder layers + the root
    assert len(list((tmp_path / "out" / "cache").glob("tiny-*"))) == 1  # pretrained here, from scratch

    for steps in (2, 4):
        one = {"sft": {"max_steps": steps, "batch_size": 8, "grad_accum": 1}}
        one_process(write(tmp_path, f"sft1-{steps}", one), "sft", tmp_path / f"sft-one-{steps}")
    base = load_file(str(next((tmp_path / "out" / "cache").glob("tiny-*")) / "model.safetensors"))
    moved = max_difference(weights(tmp_path / "sft-one-2"), base)
    assert moved > 1e-4
    assert max_difference(weights(tmp_path / "sft-fsdp"), weights(tmp_path / "sft-one-2")) < moved * 1e-3

    # The stopped FSDP run goes on from its step-2 checkpoint (weights, optimizer, schedule) to step 4.
    log = fsdp_train(write(tmp_path, "sft2-4", {"sft": {"max_steps": 4}}), "sft",
                     "--out", str(tmp_path / "sft-fsdp"))
    assert "resuming from" in log and "step 2 of 4" in log
    moved = max_difference(weights(tmp_path / "sft-one-4"), weights(tmp_path / "sft-one-2"))
    assert moved > 1e-4
    assert max_difference(weights(tmp_path / "sft-fsdp"), weights(tmp_path / "sft-one-4")) < moved * 1e-3
    # Its checkpoint holds whole tensors under parameter names, as the one-process checkpoint does.
    fsdp_state = torch.load(tmp_path / "sft-fsdp" / "checkpoints" / "step-4" / "optimizer.pt")["state"]
    one_state = torch.load(tmp_path / "sft-one-4" / "checkpoints" / "step-4" / "optimizer.pt")["state"]
    assert set(fsdp_state) == set(one_state) and "model.embed_tokens.weight" in one_state
    for name, moments in one_state.items():
        for key in ("exp_avg", "exp_avg_sq"):
            expected = moments[key]
            tolerance = 1e-3 * expected.abs().max().item()
            torch.testing.assert_close(fsdp_state[name][key], expected, rtol=1e-3, atol=tolerance)
    fsdp_result = json.loads((tmp_path / "sft-fsdp" / "result.json").read_text())["metrics"]
    one_result = json.loads((tmp_path / "sft-one-4" / "result.json").read_text())["metrics"]
    assert fsdp_result["val_loss"] == pytest.approx(one_result["val_loss"], rel=1e-5)

    # PPO (policy + value head, full fine-tuning, frozen reference) from the one-process SFT model.
    init = tmp_path / "sft-one-4" / "model"
    log = fsdp_train(write(tmp_path, "rl2", {"rl": {"iterations": 1}}), "rl", "--init-model", str(init),
                     "--out", str(tmp_path / "rl-fsdp"))
    assert "FSDP2: PolicyWithValue sharded in 3 units" in log
    for iterations in (1, 2):
        one_process(write(tmp_path, f"rl1-{iterations}", {"rl": {"iterations": iterations}}), "rl",
                    tmp_path / f"rl-one-{iterations}", init=init)
    moved = max_difference(weights(tmp_path / "rl-one-1"), load_file(str(init / "model.safetensors")))
    assert moved > 1e-5
    assert max_difference(weights(tmp_path / "rl-fsdp"), weights(tmp_path / "rl-one-1")) < moved * 1e-3

    log = fsdp_train(write(tmp_path, "rl2-2", {"rl": {"iterations": 2}}), "rl", "--init-model", str(init),
                     "--out", str(tmp_path / "rl-fsdp"))
    assert "resuming RL from" in log
    moved = max_difference(weights(tmp_path / "rl-one-2"), weights(tmp_path / "rl-one-1"))
    assert moved > 1e-5
    assert max_difference(weights(tmp_path / "rl-fsdp"), weights(tmp_path / "rl-one-2")) < moved * 1e-3
    head_fsdp = torch.load(tmp_path / "rl-fsdp" / "value_head.pt")
    head_one = torch.load(tmp_path / "rl-one-2" / "value_head.pt")
    assert head_one["weight"].abs().max() > 1e-4  # the critic trained
    assert torch.allclose(head_fsdp["weight"], head_one["weight"], atol=1e-6)
    fsdp_result = json.loads((tmp_path / "rl-fsdp" / "result.json").read_text())
    one_result = json.loads((tmp_path / "rl-one-2" / "result.json").read_text())
    assert fsdp_result["metrics"] == pytest.approx(one_result["metrics"])
