"""TRL's side of the PPO comparison in `bench/vs_trl.py`: TRL 1.12's `trl.experimental.ppo.PPOTrainer`.

    bench/.envs/trl-1.12.0/bin/python bench/_trl_ppo.py SPEC.json OUT.json   (run by vs_trl.py)

TRL's PPO scores with a reward *model* and learns a separate value *model*. Both are sequence-
classification models with the policy's backbone (loaded from the same directory, a fresh score
head): the rewards are meaningless, this measures throughput and memory only. The time spent in
the reward model's forward passes (which our function grader does not need) is measured with
forward hooks and reported beside the totals.
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
    import trl
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainerCallback,
    )
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    rss_after_imports = rss_mb()
    torch.manual_seed(spec["seed"])
    model_dir = spec["model_dir"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    records = [json.loads(line) for line in Path(spec["prompts_file"]).read_text().splitlines()]
    ids = [tokenizer(r["prompt"], add_special_tokens=False)["input_ids"] for r in records]
    train = Dataset.from_dict({"input_ids": ids})
    dtype = torch.float32
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    value = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=dtype)
    reward = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=dtype)

    clock = Clock()
    backbone = getattr(reward, reward.base_model_prefix)
    started: list[tuple[float, float]] = []
    backbone.register_forward_pre_hook(lambda *a: started.append(now()))
    reward.score.register_forward_hook(
        lambda *a: clock.add("reward_model_forward", *(b - a for a, b in zip(started.pop(), now(), strict=True)))
    )

    p, m, e = spec["prompts_per_iteration"], spec["minibatch_size"], spec["ppo_epochs"]

    class Timer(TrainerCallback):
        def __init__(self):
            self.start, self.ends, self.splits, self.logs = None, [], [], []

        def on_train_begin(self, args, state, control, **kw):
            self.start = now()

        def on_step_end(self, args, state, control, **kw):  # PPOTrainer calls it once per rollout batch
            self.ends.append(now())
            self.splits.append(clock.take())

        def on_log(self, args, state, control, logs=None, **kw):
            self.logs.append(dict(logs or {}))

    timer = Timer()
    with tempfile.TemporaryDirectory(prefix="trl-bench-") as out_dir:
        args = PPOConfig(
            output_dir=out_dir,
            use_cpu=True,
            bf16=False,
            fp16=False,
            gradient_checkpointing=spec["trl_gradient_checkpointing"],
            # local_batch_size = per_device_train_batch_size * grad_accum = p; p / num_mini_batches = m rows
            # per optimizer step (TRL steps the optimizer per micro-batch; here micro-batch = minibatch).
            per_device_train_batch_size=p,
            gradient_accumulation_steps=1,
            num_mini_batches=p // m,
            num_ppo_epochs=e,
            total_episodes=p * spec["iterations"],
            local_rollout_forward_batch_size=p,
            response_length=spec["max_new_tokens"],
            stop_token="eos",
            temperature=spec["temperature"],
            kl_coef=spec["kl_coef"],
            kl_estimator="k1",
            cliprange=0.2,
            cliprange_value=0.2,
            vf_coef=spec["vf_coef"],
            gamma=1.0,
            lam=0.95,
            whiten_rewards=False,
            learning_rate=spec["lr"],
            lr_scheduler_type="constant",
            warmup_steps=0,
            weight_decay=0.0,
            adam_epsilon=1e-5,
            num_sample_generations=0,
            seed=spec["seed"],
            save_strategy="no",
            eval_strategy="no",
            report_to="none",
            disable_tqdm=True,
        )
        trainer = PPOTrainer(
            args=args,
            processing_class=tokenizer,
            model=policy,
            ref_model=ref,
            reward_model=reward,
            value_model=value,
            train_dataset=train,
            eval_dataset=train.select(range(2)),
            callbacks=[timer],
        )
        rss_after_setup = rss_mb()
        trainer.train()

    stats = throughput(timer.ends, timer.start, p, spec["warmup"])
    reward_s = sum(s.get("reward_model_forward", 0.0) for s in timer.splits[spec["warmup"] :])
    write_result(
        out_path,
        {
            "side": "trl",
            "trl_version": trl.__version__,
            "algorithm": "ppo",
            "model_params": sum(t.numel() for t in policy.parameters()),
            "rss_after_imports_mb": rss_after_imports,
            "rss_after_setup_mb": rss_after_setup,
            "reward_model_s": reward_s,
            "samples_per_s_without_reward_model": p * stats["measured_iterations"] / (stats["measured_s"] - reward_s),
            "splits": timer.splits,
            "num_eos_tokens": [log.get("val/num_eos_tokens") for log in timer.logs if "val/num_eos_tokens" in log],
            **stats,
        },
    )


if __name__ == "__main__":
    main(*sys.argv[1:3])
