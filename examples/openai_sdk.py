"""Reinforcement fine-tuning through the openai SDK against `rft api` (the README's "From the openai SDK").

Start the server first (`rft api --config examples/api/tiny.yaml`), then run this from the project
root. Only `base_url` and `api_key` differ from a script written for OpenAI's service.
"""

import os
import time

from openai import OpenAI

client = OpenAI(base_url=os.environ.get("RFT_API_URL", "http://127.0.0.1:8000/v1"),
                api_key=os.environ.get("RFT_API_KEY", "none"))


def upload(path):
    with open(path, "rb") as f:
        return client.files.create(file=f, purpose="fine-tune").id


def wait(job):
    while job.status not in ("succeeded", "failed", "cancelled"):
        time.sleep(5)
        job = client.fine_tuning.jobs.retrieve(job.id)
    print(f"{job.id}: {job.status} -> {job.fine_tuned_model} ({job.trained_tokens} tokens) {job.error or ''}")
    return job


# 1. Supervised warm-up on worked solutions (OpenAI's chat format: the assistant's answer last).
sft = wait(client.fine_tuning.jobs.create(
    model="rft-tiny", suffix="warmup",
    training_file=upload("examples/api/sft_train.jsonl"), validation_file=upload("examples/api/sft_val.jsonl"),
    method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 4}}},
))

# 2. Check a grader before training with it.
grader = {
    "type": "python", "name": "final_answer",
    "source": "def grade(sample, item):\n"
              "    answer = sample['output_text'].split('####')[-1].strip()\n"
              "    return 1.0 if answer == item['reference_answer'] else 0.0\n",
}
client.fine_tuning.alpha.graders.validate(grader=grader)
run = client.fine_tuning.alpha.graders.run(grader=grader, model_sample="4+4=8.\n#### 8", item={"reference_answer": "8"})
print("grader reward:", run.reward, "errors:", [k for k, v in run.metadata.errors.model_dump().items() if v is True])

# 3. Reinforcement fine-tuning from the supervised model (OpenAI's RFT format: the user's turn last).
rl = wait(client.fine_tuning.jobs.create(
    model=sft.fine_tuned_model, suffix="rft",
    training_file=upload("examples/api/rft_train.jsonl"), validation_file=upload("examples/api/rft_val.jsonl"),
    method={"type": "reinforcement", "reinforcement": {
        "grader": grader, "hyperparameters": {"n_epochs": 1, "batch_size": 8, "eval_interval": 2}}},
))
for event in reversed(client.fine_tuning.jobs.list_events(rl.id, limit=100).data):
    if event.type == "metrics":
        d = event.data
        print(f"step {d['step']}: train reward {d.get('train_reward_mean')}, valid reward {d.get('valid_reward_mean')}, kl {d.get('kl')}")
for checkpoint in client.fine_tuning.jobs.checkpoints.list(rl.id):
    print(checkpoint.fine_tuned_model_checkpoint, checkpoint.metrics.model_dump(exclude_none=True))

# 4. Use the model: greedy (temperature 0) is what rft's evaluation measured.
messages = [{"role": "system", "content": "Solve the problem. End with '#### <number>'."},
            {"role": "user", "content": "Ann has 3 pens. Bob has 4 more pens than Ann. How many pens does Bob have?"}]
reply = client.chat.completions.create(model=rl.fine_tuned_model, messages=messages, temperature=0)
print("reply:", repr(reply.choices[0].message.content), reply.usage)
stream = client.chat.completions.create(model=rl.fine_tuned_model, messages=messages, temperature=0, stream=True)
print("streamed:", repr("".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)))
