"""TRL's side of the GRPO comparison in `bench/vs_trl.py`: `trl.GRPOTrainer`, timed.

    bench/.envs/trl-1.16.0/bin/python bench/_trl_grpo.py SPEC.json OUT.json   (run by vs_trl.py)

Runs in TRL's own virtual environment. The reward is our `numeric_match` grader (imported from the
repository by path; it needs only the standard library and pydantic), wrapped as a TRL reward
function. The prompts come in the order our trainer draws them (`shuffle_dataset=False`), so both
sides see the same prompts at every iteration.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from _worker_common import Clock, now, pin_threads, rss_mb, throughput, trl_grpo_settings, write_result


def main(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    pin_threads(spec["threads"])
    sys.path.insert(0, spec["repo_root"])
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rft_core.graders import build_grader, grade_batch

    rss_after_imports = rss_mb()
    records = [json.loads(line) for line in Path(spec["prompts_file"]).read_text().splitlines()]
    dataset = Dataset.from_list(records)
    grader = build_grader(spec["grader"])
    lengths: list[float] = []
    prompts_seen: list[str] = []  # each prompt once, in the order TRL generated for them

    def numeric_match(prompts, completions, reference, **kwargs):
        results = grade_batch(grader, completions, [{"reference": r} for r in reference])
        prompts_seen.extend(prompts[::k])  # a group's K copies are adjacent
        if kwargs.get("completion_ids") is not None:
            lengths.extend(len(c) for c in kwargs["completion_ids"])
        return [r.reward for r in results]  # None (grader error) marks a completion unscorable

    k, p, m, e = spec["samples_per_prompt"], spec["prompts_per_iteration"], spec["minibatch_size"], spec["ppo_epochs"]
    steps_per_generation = p * k // m
    steps_per_iteration = steps_per_generation * e

    clock = Clock()

    class Timer(TrainerCallback):
        def __init__(self):
            self.start, self.ends, self.splits = None, [], []

        def on_train_begin(self, args, state, control, **kw):
            self.start = now()

        def on_step_end(self, args, state, control, **kw):
            if state.global_step % steps_per_iteration == 0:
                self.ends.append(now())
                self.splits.append(clock.take())

    timer = Timer()
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    with tempfile.TemporaryDirectory(prefix="trl-bench-") as out_dir:
        args = GRPOConfig(
            output_dir=out_dir,
            use_cpu=True,
            bf16=False,
            fp16=False,
            model_init_kwargs={"dtype": torch.float32},
            **trl_grpo_settings(spec, minibatch=m, prompts=p, group=k, epochs=e,
                                steps_per_iteration=steps_per_iteration,
                                gradient_checkpointing=spec["trl_gradient_checkpointing"]),
        )
        trainer = GRPOTrainer(
            model=spec["model_dir"],
            reward_funcs=numeric_match,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[timer],
        )
        # Where TRL's time goes, in the same sections as ours (instance-level wrappers, no behaviour change).
        trainer._generate = clock.wrap("generate", trainer._generate)
        trainer._generate_and_score_completions = clock.wrap("rollout", trainer._generate_and_score_completions)
        trainer._compute_loss = clock.wrap("update_forward_loss", trainer._compute_loss)
        trainer.accelerator.backward = clock.wrap("update_backward", trainer.accelerator.backward)
        rss_after_setup = rss_mb()
        trainer.train()

    samples = p * k
    per_iter = samples
    write_result(
        out_path,
        {
            "side": "trl",
            "trl_version": trl.__version__,
            "algorithm": "grpo",
            "model_params": sum(t.numel() for t in trainer.model.parameters()),
            "rss_after_imports_mb": rss_after_imports,
            "rss_after_setup_mb": rss_after_setup,
            "steps_per_iteration": steps_per_iteration,
            "response_length": sum(lengths[per_iter:]) / max(1, len(lengths[per_iter:])),
            "has_ref_model": trainer.ref_model is not None,
            "prompts_seen": prompts_seen,
            "splits": timer.splits,
            "gradient_checkpointing": bool(getattr(trainer.model, "is_gradient_checkpointing", False)),
            **throughput(timer.ends, timer.start, samples, spec["warmup"]),
        },
    )


if __name__ == "__main__":
    main(*sys.argv[1:3])
