"""Hub-shaped model fixtures, built here: nothing is downloaded.

A small randomly initialised model of a real hub architecture (`Qwen2ForCausalLM`, `LlamaForCausalLM`)
saved in the hub layout (config.json, generation_config.json, safetensors in bfloat16, tokenizer files),
whose tokenizer (a byte-level BPE trained with `tokenizers` on synthetic text, with the real
pre-tokenizer pattern, wrapped in `PreTrainedTokenizerFast`) carries the real chat template and the
special-token set-up of the instruct model it stands for, scaled down:

- `qwen2.5-instruct` (Qwen/Qwen2.5-0.5B-Instruct): no BOS, EOS `<|im_end|>`, pad `<|endoftext|>`;
  config.json eos `<|im_end|>`; generation_config.json eos `[<|im_end|>, <|endoftext|>]` (151645,
  151643), sampling defaults (do_sample, temperature 0.7, top_p 0.8, top_k 20, repetition_penalty 1.1).
- `qwen2.5-base` (Qwen/Qwen2.5-0.5B): the same template, but EOS = pad = `<|endoftext|>` and
  generation_config eos `<|endoftext|>` only: nothing but the template says a turn ends with `<|im_end|>`.
- `llama-3.2-instruct` (meta-llama/Llama-3.2-1B-Instruct): BOS `<|begin_of_text|>` added by the
  post-processor, EOS `<|eot_id|>`, no pad token; config.json and generation_config.json eos
  `[<|end_of_text|>, <|eom_id|>, <|eot_id|>]` (128001, 128008, 128009).

Special tokens follow the BPE vocabulary in the real order, and the model's vocabulary is padded to
a multiple of 64 beyond the tokenizer's, as the real checkpoints are. `pretrain_on="chat"` gives the
random model a few seconds of training on conversations of the synthetic arithmetic family rendered
with the template, so that it answers and ends its turn with the template's turn end, as an instruct
model does (`"none"`: random weights).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

# Qwen2.5-*-Instruct's tokenizer_config.json `chat_template` (Qwen2.5 base models ship the same one).
QWEN2_5_CHAT_TEMPLATE = (
    '{%- if tools %}\n'
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n"
    '    {%- else %}\n'
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n"
    '    {%- endif %}\n'
    '    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}\n'
    '    {%- for tool in tools %}\n'
    '        {{- "\\n" }}\n'
    '        {{- tool | tojson }}\n'
    '    {%- endfor %}\n'
    '    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}\n'
    '{%- else %}\n'
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    '    {%- else %}\n'
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}\n"
    '    {%- endif %}\n'
    '{%- endif %}\n'
    '{%- for message in messages %}\n'
    '    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}\n'
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    '    {%- elif message.role == "assistant" %}\n'
    "        {{- '<|im_start|>' + message.role }}\n"
    '        {%- if message.content %}\n'
    "            {{- '\\n' + message.content }}\n"
    '        {%- endif %}\n'
    '        {%- for tool_call in message.tool_calls %}\n'
    '            {%- if tool_call.function is defined %}\n'
    '                {%- set tool_call = tool_call.function %}\n'
    '            {%- endif %}\n'
    '            {{- \'\\n<tool_call>\\n{"name": "\' }}\n'
    '            {{- tool_call.name }}\n'
    '            {{- \'", "arguments": \' }}\n'
    '            {{- tool_call.arguments | tojson }}\n'
    "            {{- '}\\n</tool_call>' }}\n"
    '        {%- endfor %}\n'
    "        {{- '<|im_end|>\\n' }}\n"
    '    {%- elif message.role == "tool" %}\n'
    '        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}\n'
    "            {{- '<|im_start|>user' }}\n"
    '        {%- endif %}\n'
    "        {{- '\\n<tool_response>\\n' }}\n"
    '        {{- message.content }}\n'
    "        {{- '\\n</tool_response>' }}\n"
    '        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}\n'
    "            {{- '<|im_end|>\\n' }}\n"
    '        {%- endif %}\n'
    '    {%- endif %}\n'
    '{%- endfor %}\n'
    '{%- if add_generation_prompt %}\n'
    "    {{- '<|im_start|>assistant\\n' }}\n"
    '{%- endif %}\n'
)


# Llama-3.2-{1B,3B}-Instruct's tokenizer_config.json `chat_template`.
LLAMA_3_2_CHAT_TEMPLATE = (
    '{{- bos_token }}\n'
    '{%- if custom_tools is defined %}\n'
    '    {%- set tools = custom_tools %}\n'
    '{%- endif %}\n'
    '{%- if not tools_in_user_message is defined %}\n'
    '    {%- set tools_in_user_message = true %}\n'
    '{%- endif %}\n'
    '{%- if not date_string is defined %}\n'
    '    {%- if strftime_now is defined %}\n'
    '        {%- set date_string = strftime_now("%d %b %Y") %}\n'
    '    {%- else %}\n'
    '        {%- set date_string = "26 Jul 2024" %}\n'
    '    {%- endif %}\n'
    '{%- endif %}\n'
    '{%- if not tools is defined %}\n'
    '    {%- set tools = none %}\n'
    '{%- endif %}\n'
    '\n'
    '{#- This block extracts the system message, so we can slot it into the right place. #}\n'
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content']|trim %}\n"
    '    {%- set messages = messages[1:] %}\n'
    '{%- else %}\n'
    '    {%- set system_message = "" %}\n'
    '{%- endif %}\n'
    '\n'
    '{#- System message #}\n'
    '{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}\n'
    '{%- if tools is not none %}\n'
    '    {{- "Environment: ipython\\n" }}\n'
    '{%- endif %}\n'
    '{{- "Cutting Knowledge Date: December 2023\\n" }}\n'
    '{{- "Today Date: " + date_string + "\\n\\n" }}\n'
    '{%- if tools is not none and not tools_in_user_message %}\n'
    '    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}\n'
    '    {{- \'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.\' }}\n'
    '    {{- "Do not use variables.\\n\\n" }}\n'
    '    {%- for t in tools %}\n'
    '        {{- t | tojson(indent=4) }}\n'
    '        {{- "\\n\\n" }}\n'
    '    {%- endfor %}\n'
    '{%- endif %}\n'
    '{{- system_message }}\n'
    '{{- "<|eot_id|>" }}\n'
    '\n'
    '{#- Custom tools are passed in a user message with some extra guidance #}\n'
    '{%- if tools_in_user_message and not tools is none %}\n'
    '    {#- Extract the first user message so we can plug it in here #}\n'
    '    {%- if messages | length != 0 %}\n'
    "        {%- set first_user_message = messages[0]['content']|trim %}\n"
    '        {%- set messages = messages[1:] %}\n'
    '    {%- else %}\n'
    '        {{- raise_exception("Cannot put tools in the first user message when there\'s no first user message!") }}\n'
    '{%- endif %}\n'
    "    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}\n"
    '    {{- "Given the following functions, please respond with a JSON for a function call " }}\n'
    '    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}\n'
    '    {{- \'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.\' }}\n'
    '    {{- "Do not use variables.\\n\\n" }}\n'
    '    {%- for t in tools %}\n'
    '        {{- t | tojson(indent=4) }}\n'
    '        {{- "\\n\\n" }}\n'
    '    {%- endfor %}\n'
    '    {{- first_user_message + "<|eot_id|>"}}\n'
    '{%- endif %}\n'
    '\n'
    '{%- for message in messages %}\n'
    "    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}\n"
    "        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}\n"
    "    {%- elif 'tool_calls' in message %}\n"
    '        {%- if not message.tool_calls|length == 1 %}\n'
    '            {{- raise_exception("This model only supports single tool-calls at once!") }}\n'
    '        {%- endif %}\n'
    '        {%- set tool_call = message.tool_calls[0].function %}\n'
    "        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}\n"
    '        {{- \'{"name": "\' + tool_call.name + \'", \' }}\n'
    '        {{- \'"parameters": \' }}\n'
    '        {{- tool_call.arguments | tojson }}\n'
    '        {{- "}" }}\n'
    '        {{- "<|eot_id|>" }}\n'
    '    {%- elif message.role == "tool" or message.role == "ipython" %}\n'
    '        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}\n'
    '        {%- if message.content is mapping or message.content is iterable %}\n'
    '            {{- message.content | tojson }}\n'
    '        {%- else %}\n'
    '            {{- message.content }}\n'
    '        {%- endif %}\n'
    '        {{- "<|eot_id|>" }}\n'
    '    {%- endif %}\n'
    '{%- endfor %}\n'
    '{%- if add_generation_prompt %}\n'
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    '{%- endif %}\n'
)


# The pre-tokenizer patterns of the real tokenizer.json files (Qwen2: one digit per token; Llama 3: up to 3).
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_QWEN_SPECIAL = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
_QWEN_ADDED = [  # added tokens that are not special (decoded, not skipped)
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
]
_LLAMA_SPECIAL = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
]


@dataclass(frozen=True)
class HubSpec:
    """The special-token set-up of one real model's files (token names; ids are resolved here)."""

    architecture: Literal["qwen2", "llama"]
    pattern: str
    special: list[str]
    added: list[str]
    bos: str | None
    eos: str
    pad: str | None
    config_eos: str | list[str]
    generation: dict[str, Any]  # generation_config.json, token fields by name
    chat_template: str
    additional_special_tokens: list[str] = field(default_factory=list)
    bos_added: bool = False  # the post-processor prepends BOS (Llama 3)
    turn_end: str = ""  # what the template writes after an assistant message (for the tests)


SPECS: dict[str, HubSpec] = {
    "qwen2.5-instruct": HubSpec(
        architecture="qwen2", pattern=QWEN2_PATTERN, special=_QWEN_SPECIAL, added=_QWEN_ADDED,
        bos=None, eos="<|im_end|>", pad="<|endoftext|>", config_eos="<|im_end|>",
        generation={
            "bos_token_id": "<|endoftext|>", "pad_token_id": "<|endoftext|>", "do_sample": True,
            "eos_token_id": ["<|im_end|>", "<|endoftext|>"], "repetition_penalty": 1.1,
            "temperature": 0.7, "top_p": 0.8, "top_k": 20,
        },
        chat_template=QWEN2_5_CHAT_TEMPLATE, additional_special_tokens=_QWEN_SPECIAL[1:],
        turn_end="<|im_end|>",
    ),
    "qwen2.5-base": HubSpec(
        architecture="qwen2", pattern=QWEN2_PATTERN, special=_QWEN_SPECIAL, added=_QWEN_ADDED,
        bos=None, eos="<|endoftext|>", pad="<|endoftext|>", config_eos="<|endoftext|>",
        generation={
            "bos_token_id": "<|endoftext|>", "do_sample": False, "eos_token_id": "<|endoftext|>",
            "max_new_tokens": 2048,
        },
        chat_template=QWEN2_5_CHAT_TEMPLATE, additional_special_tokens=_QWEN_SPECIAL[1:],
        turn_end="<|im_end|>",
    ),
    "llama-3.2-instruct": HubSpec(
        architecture="llama", pattern=LLAMA3_PATTERN, special=_LLAMA_SPECIAL, added=[],
        bos="<|begin_of_text|>", eos="<|eot_id|>", pad=None,
        config_eos=["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"],
        generation={
            "bos_token_id": "<|begin_of_text|>", "do_sample": True,
            "eos_token_id": ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"], "temperature": 0.6, "top_p": 0.9,
        },
        chat_template=LLAMA_3_2_CHAT_TEMPLATE, bos_added=True, turn_end="<|eot_id|>",
    ),
}


def synthetic_items(n: int, seed: int = 0) -> list[dict[str, str]]:
    """`n` arithmetic word problems of 1-3 steps with worked solutions, GSM8K-shaped
    (`question`, `answer` ending in `#### value`): the family of examples/data/sample_gsm8k.jsonl."""
    import tempfile

    from rft_core.config import SyntheticConfig
    from rft_core.data.synthetic import write_synthetic

    cfg = SyntheticConfig(n_train=n, n_val=1, min_steps=1, max_steps=3, max_value=30,
                          solution_fraction=1.0, distractor_fraction=0.3, seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        train, _ = write_synthetic(cfg, tmp)
        rows = [json.loads(line) for line in Path(train).read_text().splitlines() if line.strip()]
    return [{"question": r["question"], "answer": r["answer"]} for r in rows]


def build_tokenizer(spec: HubSpec, texts: list[str], vocab_size: int = 640) -> PreTrainedTokenizerFast:
    """A byte-level BPE with the real pre-tokenizer pattern, then the special tokens in the real order."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(spec.pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in spec.special])
    if spec.added:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in spec.added])
    if spec.bos_added:
        bos_id = tok.token_to_id(spec.bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{spec.bos}:0 $A:0", pair=f"{spec.bos}:0 $A:0 {spec.bos}:1 $B:1",
            special_tokens=[(spec.bos, bos_id)],
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    kwargs: dict[str, Any] = {}
    if spec.additional_special_tokens:
        kwargs["additional_special_tokens"] = spec.additional_special_tokens
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=spec.bos, eos_token=spec.eos, pad_token=spec.pad,
        chat_template=spec.chat_template, clean_up_tokenization_spaces=False, model_max_length=131072,
        **kwargs,
    )


def _token_ids(tokenizer: PreTrainedTokenizerFast, value: Any) -> Any:
    if isinstance(value, str) and value.startswith("<|"):
        return tokenizer.convert_tokens_to_ids(value)
    if isinstance(value, list):
        return [_token_ids(tokenizer, v) for v in value]
    return value


def build_model(spec: HubSpec, tokenizer: PreTrainedTokenizerFast, seed: int) -> torch.nn.Module:
    """A small model of the real architecture: GQA, tied embeddings, the real RoPE settings."""
    vocab = -(-len(tokenizer) // 64) * 64  # padded beyond the tokenizer, as the hub checkpoints are
    ids = {"bos_token_id": _token_ids(tokenizer, spec.generation["bos_token_id"]),
           "eos_token_id": _token_ids(tokenizer, spec.config_eos)}
    common = dict(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True, **ids)
    if spec.architecture == "qwen2":
        config: Any = Qwen2Config(intermediate_size=160, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                                  use_sliding_window=False, **common)
        cls: Any = Qwen2ForCausalLM
    else:
        config = LlamaConfig(
            intermediate_size=256, rms_norm_eps=1e-5, head_dim=16,
            rope_scaling={"rope_type": "llama3", "factor": 32.0, "high_freq_factor": 4.0,
                          "low_freq_factor": 1.0, "original_max_position_embeddings": 256},
            rope_theta=500_000.0, **common,
        )
        cls = LlamaForCausalLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(config)


def chat_examples(tokenizer: PreTrainedTokenizerFast, items: list[dict[str, str]]) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) of each item as a conversation rendered with the chat template; loss on the
    assistant's turn only: its content and the turn end the template closes it with."""
    examples = []
    for item in items:
        user = [{"role": "user", "content": item["question"]}]
        prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": item["answer"]}],
                                             tokenize=False)
        assert full.startswith(prompt)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
        examples.append((prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids))
    return examples


def pretrain(model: torch.nn.Module, examples: list[tuple[list[int], list[int]]], steps: int, seed: int,
             batch_size: int = 8, lr: float = 1e-2) -> None:
    """A few steps of full fine-tuning in float32 on random batches of `examples`."""
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for step in range(steps):
            batch = [examples[rng.randrange(len(examples))] for _ in range(batch_size)]
            width = max(len(ids) for ids, _ in batch)
            input_ids = torch.zeros((batch_size, width), dtype=torch.long)
            labels = torch.full((batch_size, width), -100, dtype=torch.long)
            mask = torch.zeros((batch_size, width), dtype=torch.long)
            for row, (ids, lab) in enumerate(batch):
                input_ids[row, : len(ids)] = torch.tensor(ids)
                labels[row, : len(lab)] = torch.tensor(lab)
                mask[row, : len(ids)] = 1
            loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            for group in optimizer.param_groups:  # short warm-up, then linear decay to 10 %
                group["lr"] = lr * min(1.0, (step + 1) / 10) * (1.0 - 0.9 * step / steps)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    model.eval()


def build_hub_model(
    root: str | Path,
    name: str,
    *,
    pretrain_on: Literal["none", "chat"] = "chat",
    steps: int = 120,
    seed: int = 0,
    items: list[dict[str, str]] | None = None,
) -> Path:
    """Build the fixture `name` (a key of SPECS) into `root/<name>-<pretrain_on>`; returns the directory."""
    spec = SPECS[name]
    out = Path(root) / f"{name}-{pretrain_on}"
    items = items if items is not None else synthetic_items(600, seed)
    texts = [f"{i['question']}\n{i['answer']}" for i in items]
    texts += ["You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
              "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n", "system user assistant"]
    tokenizer = build_tokenizer(spec, texts)
    model = build_model(spec, tokenizer, seed)
    if pretrain_on != "none":
        pretrain(model, chat_examples(tokenizer, items), steps, seed)
    model.generation_config = GenerationConfig(
        **{k: _token_ids(tokenizer, v) for k, v in spec.generation.items()}
    )
    model.to(torch.bfloat16).save_pretrained(out)  # the hub checkpoints are bfloat16
    tokenizer.save_pretrained(out)
    return out
