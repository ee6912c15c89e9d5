"""Our side of `bench/vs_trl.py`: `RLTrainer` (GRPO or PPO) for a few iterations, timed.

    python bench/_ours_rl.py SPEC.json OUT.json      (run by vs_trl.py in the project's venv)

Runs what `RLTrainer.iteration` runs (rollout, rollout_stats, update) without validation or
checkpoints. Instance-level wrappers time the reference forward pass, the update's forward +
loss, backward and optimizer steps, so the profile needs no change to the trainer.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from _worker_common import Clock, now, pin_threads, rss_mb, throughput, write_result


def main(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    pin_threads(spec["threads"])
    import torch

    from rft_core.config import RFTConfig
    from rft_core.data import load_items
    from rft_core.graders import build_grader
    from rft_core.rl.trainer import RLTrainer

    rss_after_imports = rss_mb()
    torch.manual_seed(spec["seed"])
    cfg = RFTConfig.from_dict(
        {
            "seed": spec["seed"],
            "model": {"name_or_path": spec["model_dir"], "device": "cpu", "dtype": "float32"},
            "grader": {"spec": spec["grader"]},
            "rl": {
                "algorithm": spec["algorithm"],
                "iterations": spec["iterations"],
                "critic_warmup": 0,  # throughput: every iteration a full update, as TRL's
                "prompts_per_iteration": spec["prompts_per_iteration"],
                "samples_per_prompt": spec["samples_per_prompt"],
                "minibatch_size": spec["minibatch_size"],
                "ppo_epochs": spec["ppo_epochs"],
                "max_new_tokens": spec["max_new_tokens"],
                "temperature": spec["temperature"],
                "kl_coef": spec["kl_coef"],
                "lr": spec["lr"],
                "lr_scheduler": "constant",
                "vf_coef": spec["vf_coef"],
                "eval_interval": 0,
                "checkpoint_interval": 0,
                "seed": spec["seed"],
            },
        }
    )
    train = load_items(spec["train_file"]).frame
    grader = build_grader(cfg.grader.resolved_spec())
    clock = Clock()
    with tempfile.TemporaryDirectory(prefix="rft-bench-") as out_dir:
        trainer = RLTrainer(cfg, train, train.iloc[:1], spec["model_dir"], out_dir, grader=grader)
        trainer.reference_logprobs = clock.wrap("score_reference", trainer.reference_logprobs)
        trainer.losses = clock.wrap("update_forward_loss", trainer.losses)
        trainer.accelerator.backward = clock.wrap("update_backward", trainer.accelerator.backward)
        trainer.accelerator.clip_grad_norm_ = clock.wrap("update_optimizer", trainer.accelerator.clip_grad_norm_)
        trainer.optimizer.step = clock.wrap("update_optimizer", trainer.optimizer.step)
        rss_after_setup = rss_mb()

        iterations, ends = [], []
        start = now()
        for iteration in range(spec["iterations"]):
            timings: dict[str, float] = {}
            batch = trainer.rollout(iteration, timings)
            stats = trainer.rollout_stats(batch, timings)
            stats.update(trainer.update(batch, iteration, timings))
            ends.append(now())
            split = clock.take()
            iterations.append(
                {
                    **{k: float(v) for k, v in timings.items()},
                    **split,
                    "rows": len(batch.texts),
                    "reward_mean": stats["reward_mean"],
                    "response_length": stats["response_length"],
                    "stop_rate": stats["stop_rate"],
                    "kl": stats["kl"],
                }
            )

    samples = spec["prompts_per_iteration"] * spec["samples_per_prompt"]
    write_result(
        out_path,
        {
            "side": "ours",
            "algorithm": spec["algorithm"],
            "model_params": sum(p.numel() for p in trainer.policy.parameters()),
            "trainable_params": sum(p.numel() for p in trainer.params),
            "rss_after_imports_mb": rss_after_imports,
            "rss_after_setup_mb": rss_after_setup,
            "iterations": iterations,
            **throughput(ends, start, samples, spec["warmup"]),
        },
    )


if __name__ == "__main__":
    main(*sys.argv[1:3])
