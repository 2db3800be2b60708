"""``POST /v1/chat/completions`` and ``POST /v1/completions`` through the real app.

Refusals of the body itself need no model; the rest run the real serving worker on a tiny model
fine-tuned here on a deterministic mapping (see the ``trained`` fixture).
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient


@pytest.fixture(scope="module")
def bare_client(tmp_path_factory, tiny_model_path):
    """The real app on SQLite, for refusals that happen before any model is looked up."""
    from posttrain.api.app import create_app
    from posttrain.services.container import build_services
    from posttrain.settings import Settings

    home = tmp_path_factory.mktemp("inference-bare")
    services = build_services(Settings(home=home / "home", database_url=f"sqlite:///{home / 'store.db'}",
                                       model_roots=[tiny_model_path.parent]))
    with TestClient(create_app(services=services), raise_server_exceptions=False) as client:
        yield client


CHAT = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hello"}]}
COMPLETION = {"model": "tiny-llama", "prompt": "hello"}


@pytest.mark.parametrize(("extra", "param"), [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"function_call": "auto"}, "function_call"),
    ({"parallel_tool_calls": True}, "parallel_tool_calls"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"logit_bias": {"50256": -100}}, "logit_bias"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"frequency_penalty": -1}, "frequency_penalty"),
    ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
    ({"web_search_options": {}}, "web_search_options"),
    ({"reasoning_effort": "low"}, "reasoning_effort"),
    ({"store": True}, "store"),
    ({"service_tier": "flex"}, "service_tier"),
    ({"stream_options": {"include_obfuscation": True}, "stream": True}, "stream_options.include_obfuscation"),
    ({"no_such_field": 1}, "no_such_field"),
    ({"max_tokens": 10**9}, "max_tokens"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"n": 1000}, "n"),
    ({"temperature": 3}, "temperature"),
    ({"top_logprobs": 50, "logprobs": True}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": ""}, "stop"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"max_tokens": 5, "max_completion_tokens": 6}, "max_tokens"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages.0.content"),
    ({"messages": [{"role": "user"}]}, "messages.0"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
])
def test_chat_body_refused_naming_the_field(bare_client, extra, param):
    response = bare_client.post("/v1/chat/completions", json={**CHAT, **extra})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    assert param.split(".")[0] in error["message"], error


@pytest.mark.parametrize(("extra", "param"), [
    ({"echo": True}, "echo"),
    ({"best_of": 3}, "best_of"),
    ({"suffix": "tail"}, "suffix"),
    ({"prompt": [1, 2, 3]}, "prompt"),
    ({"prompt": [[1, 2]]}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"logprobs": 6}, "logprobs"),
    ({"logprobs": True}, "logprobs"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"prompt": ["a"] * 4, "n": 5}, "n"),
    ({"presence_penalty": 1}, "presence_penalty"),
])
def test_completion_body_refused_naming_the_field(bare_client, extra, param):
    response = bare_client.post("/v1/completions", json={**COMPLETION, **extra})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param, response.json()


def test_neutral_values_of_unsupported_fields_are_not_refused_for_them(bare_client):
    """``tools: []``, zero penalties, a text response format pass the schema (what follows is the model's lookup)."""
    neutral = {"tools": [], "tool_choice": "none", "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {},
               "response_format": {"type": "text"}, "modalities": ["text"], "store": False, "user": "u",
               "metadata": {"k": "v"}, "service_tier": "auto", "n": 1, "stream": False}
    response = bare_client.post("/v1/chat/completions", json={**CHAT, **neutral, "model": "no-such-model"})
    assert response.status_code == 404, response.text


def test_nan_temperature_is_refused(bare_client):
    response = bare_client.post("/v1/chat/completions", content=b'{"model": "m", "messages": '
                                b'[{"role": "user", "content": "x"}], "temperature": NaN}',
                                headers={"content-type": "application/json"})
    assert response.status_code == 400 and "temperature" in response.json()["error"]["message"], response.text
