"""The model `bench/gpu.py` trains: Qwen2.5-0.5B-Instruct's architecture, randomly initialised, with
a fixture tokenizer in Qwen's style. Nothing is downloaded.

Shape (Qwen2.5-0.5B-Instruct's config.json): hidden 896, 24 layers, 14 attention heads with 2
key/value heads (GQA, head dim 64), MLP 4864, SiLU, RMSNorm eps 1e-6, rope theta 1e6, tied input
and output embeddings, attention biases on q/k/v, vocabulary 151,936 rows (494M parameters).

The vocabulary keeps the real 151,936 rows although the fixture tokenizer knows at most 2,048 tokens: the
embedding and the LM head are a quarter of the parameters and the logits over the vocabulary
dominate the memory of scoring and of the loss, so a smaller vocabulary would make every figure
wrong. Qwen itself pads: its tokenizer has 151,665 tokens, its model 151,936 rows. Here the unused
rows are most of them, so the random model samples ids the tokenizer does not have; decoding drops
them (tokenizers' behaviour for unknown ids), the same on both sides. The work per iteration is
what it would be with the real tokenizer: completions run to the length cap (a random model almost
never samples the end token), every forward pass computes the full-vocabulary logits.

The tokenizer: byte-level BPE with single digits (as Qwen's pre-tokenizer splits digits) trained
with `tokenizers` on the synthetic task's text, the specials `<|endoftext|>` (padding, Qwen's BOS in
the generation config), `<|im_start|>`, `<|im_end|>` (EOS of the chat model), and a ChatML chat
template with Qwen2.5's default system prompt. generation_config.json lists both end tokens
(`[<|im_end|>, <|endoftext|>]`), as Qwen2.5-Instruct's does, but none of its sampling defaults (top_k
20, top_p 0.8, repetition penalty): TRL's `generate()` would pick those up and ours would not, which
would make the two sides sample differently.

`--tiny` keeps the architecture and the tokenizer and shrinks the sizes (CPU smoke runs).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

QWEN25_05B: dict[str, Any] = {
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1_000_000.0,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
    "use_sliding_window": False,
    "attention_dropout": 0.0,
}
# The same architecture at toy size, for CPU smoke runs (vocabulary padded like Qwen's: see above).
TINY: dict[str, Any] = {
    **QWEN25_05B,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 4096,
    "max_position_embeddings": 2048,
}

SYSTEM_PROMPT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
# ChatML, as Qwen2.5-Instruct renders messages without tools: a default system message when the
# conversation has none, each message between <|im_start|>role and <|im_end|>, then the assistant's
# turn opened for generation.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\n" + SYSTEM_PROMPT + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (loop.first and message['role'] == 'system') %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def train_tokenizer(texts: Sequence[str], vocab_size: int = 2048):
    """A Qwen-style fixture tokenizer: byte-level BPE, single digits, ChatML specials and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([*texts, SYSTEM_PROMPT, "system user assistant"], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=131072,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model_dir(
    out: str | Path, texts: Sequence[str], *, tiny: bool, seed: int = 0, device: str = "cpu"
) -> dict[str, Any]:
    """Write the fixture (config, random bf16 weights, tokenizer, generation config) to `out`;
    the weights are drawn on `device` (on a GPU: seconds instead of a minute of CPU)."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    out = Path(out)
    tokenizer = train_tokenizer(texts)
    shape = dict(TINY if tiny else QWEN25_05B)
    if len(tokenizer) > shape["vocab_size"]:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, more than the model's {shape['vocab_size']} rows")
    endoftext, im_end = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    config = Qwen2Config(**shape, bos_token_id=endoftext, eos_token_id=im_end, pad_token_id=endoftext)
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2ForCausalLM(config)
    model = model.to(torch.bfloat16)
    model.generation_config = GenerationConfig(
        bos_token_id=endoftext, eos_token_id=[im_end, endoftext], pad_token_id=endoftext
    )
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    params = sum(p.numel() for p in model.parameters())
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return {
        "dir": str(out),
        "shape": shape,
        "params": params,
        "tokenizer_tokens": len(tokenizer),
        "eos": {"tokenizer": tokenizer.eos_token, "generation_config": ["<|im_end|>", "<|endoftext|>"]},
    }
