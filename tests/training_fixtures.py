"""Small real things for training tests: a synthetic task and a tiny model saved like a hub model."""

from __future__ import annotations

from pathlib import Path

from rft_core.config import RFTConfig
from rft_core.data import load_items
from rft_core.data.synthetic import write_synthetic
from rft_core.tiny import prepare_tiny_model

TINY = [
    "model.tiny.hidden_size=32",
    "model.tiny.num_layers=2",
    "model.tiny.num_heads=2",
    "model.tiny.intermediate_size=64",
    "model.tiny.vocab_size=320",
    "data.synthetic.n_train=64",
    "data.synthetic.n_val=16",
    "data.synthetic.max_steps=2",
    "sft.batch_size=8",
    "sft.max_steps=6",
    "sft.checkpoint_interval=2",
    "sft.lr=3e-3",
    "rl.iterations=2",
    "rl.critic_warmup=0",
    "rl.prompts_per_iteration=4",
    "rl.samples_per_prompt=2",
    "rl.minibatch_size=4",
    "rl.max_new_tokens=24",
    "rl.eval_interval=0",
    "rl.checkpoint_interval=1",
    "rl.lr=1e-3",
    "eval.max_new_tokens=24",
    "eval.max_items=8",
]


def tiny_config(tmp: Path, *overrides: str) -> RFTConfig:
    return RFTConfig.load(None, [f"output_dir={tmp}", *TINY, *overrides])


def tiny_task(tmp: Path, cfg: RFTConfig):
    """(train frame, val frame, tiny model directory) for `cfg`."""
    train_path, val_path = write_synthetic(cfg.data.synthetic, tmp / "data")
    train, val = load_items(train_path).frame, load_items(val_path).frame
    texts = list(train["prompt"]) + [s for s in train["solution"] if isinstance(s, str)]
    model_dir = prepare_tiny_model(cfg, texts, tmp / "cache", exclude_prompts=set(val["prompt"]))
    return train, val, model_dir


class Crash(RuntimeError):
    """Stands in for a process dying mid-training."""


def crash_at(step: int):
    """A `log` callable that raises when training reports `step`."""

    def log(metrics, at):
        if at == step and ("loss" in metrics or "reward_mean" in metrics):
            raise Crash(f"crash at step {step}")

    return log
