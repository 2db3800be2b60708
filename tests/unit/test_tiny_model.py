"""The tiny model folder loads like any Hugging Face checkpoint and can chat and generate."""

from __future__ import annotations

import pytest

from tests.fixtures_tiny import build_tiny_model


@pytest.fixture(scope="module")
def tiny_model_path(tmp_path_factory):
    return build_tiny_model(tmp_path_factory)


def test_loads_with_auto_classes_and_generates(tiny_model_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    assert model.dtype == torch.float32
    assert model.config.vocab_size == len(tokenizer)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the colour of the sky?"}], tokenize=False, add_generation_prompt=True
    )
    inputs = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]


def test_special_tokens_and_chat_template(tiny_model_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    assert tokenizer.bos_token and tokenizer.eos_token and tokenizer.pad_token
    assert len({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}) == 3
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]
    text = tokenizer.apply_chat_template(chat, tokenize=False)
    assert text.startswith(tokenizer.bos_token)
    assert text.endswith("Hello" + tokenizer.eos_token)
    prompt = tokenizer.apply_chat_template(chat[:2], tokenize=False, add_generation_prompt=True)
    assert text.startswith(prompt) and "assistant" in prompt[-30:]


def test_same_seed_gives_same_weights(tmp_path):
    from safetensors.torch import load_file

    from posttrain.trainer.tiny_model import create_tiny_model

    a = load_file(create_tiny_model(tmp_path / "a", num_layers=1, hidden_size=32) / "model.safetensors")
    b = load_file(create_tiny_model(tmp_path / "b", num_layers=1, hidden_size=32) / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
