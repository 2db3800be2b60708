"""From a request to the token ids a model reads: the tokenizers the worker keeps and the checks before a prompt runs.

Both engines (``engine.Engine`` on transformers, ``vllm_engine.VllmEngine`` on vLLM) render chat
with the same tokenizer's chat template and refuse the same requests with the same codes, so a
client sees one behaviour whichever engine the operator picked.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from posttrain.domain.serving import BAD_REQUEST, NO_CHAT_TEMPLATE, PROMPT_TOO_LONG, GenerationRequest


class RequestRefused(Exception):
    """The request cannot run: the code is the protocol's error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class TokenizerUnloadable(Exception):
    """The folder holds no tokenizer that loads."""


class Tokenizers:
    """The tokenizers of the last ``keep`` folders used, loaded on first use."""

    def __init__(self, keep: int = 16) -> None:
        self.keep = keep
        self._loaded: OrderedDict[str, Any] = OrderedDict()

    def get(self, path: str) -> Any:
        tokenizer = self._loaded.get(path)
        if tokenizer is None:
            from transformers import AutoTokenizer

            try:
                tokenizer = AutoTokenizer.from_pretrained(path)
            except Exception as exc:  # the folder's fault, reported to the client
                raise TokenizerUnloadable(f"cannot load the tokenizer at {path}: {exc}") from exc
            self._loaded[path] = tokenizer
            while len(self._loaded) > self.keep:
                self._loaded.popitem(last=False)
        self._loaded.move_to_end(path)
        return tokenizer

    def forget(self, path: str) -> None:
        self._loaded.pop(path, None)


def prompt_ids(tokenizer: Any, request: GenerationRequest) -> list[int]:
    """The request's prompt as token ids: chat ``messages`` through the chat template, or the plain prompt."""
    if request.messages is not None:
        if not getattr(tokenizer, "chat_template", None):
            raise RequestRefused(NO_CHAT_TEMPLATE, f"the model {request.model.id!r} has no chat template; "
                                 "use the completions endpoint with a plain prompt")
        try:
            text = tokenizer.apply_chat_template(list(request.messages), tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # a template that rejects these messages
            raise RequestRefused(BAD_REQUEST, f"the chat template cannot render these messages: {exc}") from exc
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    else:
        ids = list(tokenizer(request.prompt or "")["input_ids"])
    if not ids:
        if tokenizer.bos_token_id is None:
            raise RequestRefused(BAD_REQUEST, "the prompt is empty")
        ids = [tokenizer.bos_token_id]
    return ids


def check_fits(ids: list[int], max_tokens: int, positions: int | None) -> None:
    """Refuse a prompt that, with ``max_tokens`` more, would run past the model's ``positions``."""
    if positions is not None and len(ids) + max_tokens > positions:
        raise RequestRefused(PROMPT_TOO_LONG, f"the prompt has {len(ids)} tokens and max_tokens is "
                             f"{max_tokens}, more than the model's {positions} positions")
