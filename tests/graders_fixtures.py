"""Test helpers for the grader tests: a tiny local causal LM that always answers one token, a
tiny embedding model, and a real chat-completions HTTP server on 127.0.0.1."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

SENTENCES = [
    "the reference answer is correct and the model answer is incorrect",
    "score the answer from 0 to 10 : 0 1 2 3 4 5 6 7 8 9 10",
    "yes no correct incorrect maybe paris lyon rome",
    "reply with one word or one number only",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL_TOKENS = ["<unk>", "<pad>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


def build_tokenizer(chat_template: str | None = CHAT_TEMPLATE) -> Any:
    """A word-level tokenizer trained on SENTENCES with the `tokenizers` library."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>", eos_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[3:],
    )
    if chat_template:
        fast.chat_template = chat_template
    return fast


def build_tiny_lm(path: Path, reply_token: str | None = None, *, chat_template: str | None = CHAT_TEMPLATE) -> Path:
    """Save a ~50k-parameter GPT-2 + tokenizer to `path`, loadable with AutoModelForCausalLM.

    With `reply_token`, the weights are set so that greedy decoding emits that token at every
    step (the final layer norm outputs a constant vector that only the token's row of the
    output matrix sees), so a judge built on it replies `reply_token` for any prompt.
    """
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = build_tokenizer(chat_template)
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=256, n_embd=32, n_layer=2, n_head=2, n_inner=64,
        tie_word_embeddings=False, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = GPT2LMHeadModel(config)
    if reply_token is not None:
        target = tokenizer.convert_tokens_to_ids(reply_token)
        assert target != tokenizer.unk_token_id, reply_token
        with torch.no_grad():
            model.transformer.ln_f.weight.zero_()
            model.transformer.ln_f.bias.zero_()
            model.transformer.ln_f.bias[0] = 1.0
            model.lm_head.weight.zero_()
            model.lm_head.weight[target, 0] = 5.0
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


class ChatServer:
    """A chat-completions server on 127.0.0.1 for tests: POST /v1/chat/completions.

    `respond(request_json)` gives the assistant's reply (a string), or an HTTP status and body
    to send instead (`(status, body)` or `(status, body, headers)`); it may sleep to play a slow
    server. Every request body, its headers and its arrival time (time.monotonic) are recorded.
    """

    def __init__(self, respond: Callable[[dict[str, Any]], str | tuple[Any, ...]]):
        self.respond = respond
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.arrivals: list[float] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server API
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.arrivals.append(time.monotonic())
                server.requests.append(body)
                server.headers.append({k.lower(): v for k, v in self.headers.items()})
                if self.path != "/v1/chat/completions":
                    self._send(404, json.dumps({"error": f"no route {self.path}"}))
                    return
                reply = server.respond(body)
                if isinstance(reply, tuple):
                    self._send(*reply)
                    return
                self._send(200, json.dumps({
                    "id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": body.get("model"),
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": reply}}],
                }))

            def _send(self, status: int, text: str, headers: dict[str, str] | None = None) -> None:
                data = text.encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for key, value in (headers or {}).items():
                        self.send_header(key, value)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # a client that timed out has gone; a slow server's late reply goes nowhere

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> ChatServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
