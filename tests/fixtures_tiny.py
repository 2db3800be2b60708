"""A tiny random Llama model folder shared by the trainer tests (built once per test session)."""

from __future__ import annotations

from pathlib import Path


def build_tiny_model(tmp_path_factory) -> Path:
    """Build (or reuse, within this pytest session) a tiny model + tokenizer folder.

    Built under a temporary name and renamed, so a half-written folder is never reused.
    """
    from posttrain.trainer.tiny_model import create_tiny_model

    path = tmp_path_factory.getbasetemp() / "tiny-llama"
    if not path.exists():
        staging = tmp_path_factory.mktemp("tiny-llama-build")
        create_tiny_model(staging / "model")
        (staging / "model").rename(path)
    return path
