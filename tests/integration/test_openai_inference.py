"""``POST /v1/chat/completions`` and ``POST /v1/completions`` through the real app.

Refusals of the body itself need no model; the rest run the real serving worker on a tiny model
fine-tuned here on a deterministic mapping (see the ``trained`` fixture).
"""

from __future__ import annotations

import json
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.serving_helpers import PAIRS, worker_stats


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


# -- the real worker, on a model fine-tuned here -------------------------------------------------

ALICE, BOB = "pt-alice-chat", "pt-bob-chat"


def as_(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_path):
    """A real ``posttrain serve`` (scheduler, trainer, serving worker) with two tenants; alice has
    fine-tuned the tiny model on ``PAIRS``. A tiny GPT-2 (no chat template) sits beside the base."""
    from posttrain.services.access import digest
    from tests.conftest import start_server, stop_server
    from tests.fixtures_tiny import build_tiny_gpt2
    from tests.serving_helpers import train_mapping

    build_tiny_gpt2(tmp_path_factory)  # in the same folder as tiny-llama: a base model too
    home = tmp_path_factory.mktemp("inference-live")
    keys = home / "keys"
    keys.write_text(f"alice:{digest(ALICE)}\nbob:{digest(BOB)}\n")
    server = start_server(home, tiny_model_path, extra_env={"POSTTRAIN_API_KEYS_FILE": str(keys)})
    try:
        trained = train_mapping(server.base_url, tiny_model_path, headers=as_(ALICE))
        http = httpx.Client(base_url=server.base_url, headers=as_(ALICE), timeout=120)
        yield {"server": server, "http": http, "home": home, **trained}
        http.close()
    finally:
        stop_server(server)


def chat(http, model: str, content: str, **extra):
    return http.post("/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": content}],
                                                   "temperature": 0, "max_tokens": 8, **extra})


def sse_chunks(response) -> list:
    """The ``data:`` payloads of an SSE answer, ``[DONE]`` kept as the string."""
    lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines), lines
    return [line[6:] if line[6:] == "[DONE]" else json.loads(line[6:]) for line in lines]


@pytest.mark.slow
def test_the_fine_tuned_model_answers_its_mapping_and_the_base_does_not(served):
    http, model = served["http"], served["fine_tuned_model"]
    for prompt, answer in PAIRS.items():
        response = chat(http, model, prompt)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-") and body["model"] == model
        (choice,) = body["choices"]
        assert choice["message"] == {"role": "assistant", "content": answer, "refusal": None, "annotations": []}
        assert choice["finish_reason"] == "stop" and choice["index"] == 0 and choice["logprobs"] is None
        usage = body["usage"]
        assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] >= 1
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    base = [chat(http, "tiny-llama", prompt).json()["choices"][0]["message"]["content"] for prompt in PAIRS]
    assert all(said != answer for said, answer in zip(base, PAIRS.values(), strict=True)), base
    # The Llama Stack checkpoint's identifier names the same weights.
    assert chat(http, served["checkpoint"], "sea").json()["choices"][0]["message"]["content"] == "blue"


@pytest.mark.slow
def test_a_streamed_chat_is_the_plain_answer_in_openai_chunks(served):
    http, model = served["http"], served["fine_tuned_model"]
    plain = chat(http, model, "leaves").json()
    body = {"model": model, "messages": [{"role": "user", "content": "leaves"}], "temperature": 0, "max_tokens": 8,
            "stream": True, "stream_options": {"include_usage": True}}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        chunks = sse_chunks(response)
    assert chunks[-1] == "[DONE]"
    events, usage_chunk = chunks[:-2], chunks[-2]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == events[0]["id"] for c in events)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in events)
    assert text == plain["choices"][0]["message"]["content"] == "green"
    assert events[-1]["choices"][0]["finish_reason"] == "stop" and events[-1]["choices"][0]["delta"] == {}
    assert all(c["usage"] is None for c in events)
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == plain["usage"]


@pytest.mark.slow
def test_completions_continue_the_rendered_prompt(served):
    from posttrain.trainer.tiny_model import BOS_TOKEN, EOS_TOKEN

    http, model = served["http"], served["fine_tuned_model"]

    def rendered(prompt: str) -> str:
        return (f"{BOS_TOKEN}<|start_header_id|>user<|end_header_id|>\n\n{prompt}{EOS_TOKEN}"
                "<|start_header_id|>assistant<|end_header_id|>\n\n")

    prompts = [rendered("apple"), rendered("snow")]
    response = http.post("/v1/completions", json={"model": model, "prompt": prompts, "temperature": 0,
                                                  "max_tokens": 8, "n": 2, "logprobs": 2})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in body["choices"]] == ["red", "red", "white", "white"]
    first = body["choices"][0]["logprobs"]
    assert "".join(first["tokens"]) == "red" and len(first["top_logprobs"][0]) <= 2
    assert first["text_offset"][0] == len(prompts[0])
    with http.stream("POST", "/v1/completions", json={"model": model, "prompt": prompts[1], "temperature": 0,
                                                      "max_tokens": 8, "stream": True}) as streamed:
        chunks = sse_chunks(streamed)
    assert chunks[-1] == "[DONE]" and all(c["object"] == "text_completion" for c in chunks[:-1])
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == "white"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.slow
def test_seed_n_logprobs_and_stop(served):
    http, model = served["http"], "tiny-llama"
    sampled = {"temperature": 1.0, "max_tokens": 12, "seed": 11, "n": 2, "logprobs": True}
    first, again = (chat(http, model, "apple", **sampled).json() for _ in range(2))
    texts = [c["message"]["content"] for c in first["choices"]]
    assert [c["index"] for c in first["choices"]] == [0, 1] and len(texts) == 2
    assert texts == [c["message"]["content"] for c in again["choices"]]  # same seed, same text
    other = chat(http, model, "apple", **{**sampled, "seed": 12}).json()
    assert [c["message"]["content"] for c in other["choices"]] != texts
    assert first["usage"]["completion_tokens"] == sum(len(c["logprobs"]["content"]) for c in first["choices"])

    greedy = chat(http, model, "apple", logprobs=True, top_logprobs=3).json()["choices"][0]
    content = greedy["logprobs"]["content"]
    assert "".join(t["token"] for t in content) == greedy["message"]["content"]
    for token in content:
        assert len(token["top_logprobs"]) == 3 and token["logprob"] <= 0
        assert token["logprob"] == pytest.approx(max(t["logprob"] for t in token["top_logprobs"]))
        assert token["bytes"] == list(token["token"].encode())

    full = chat(http, served["fine_tuned_model"], "leaves").json()["choices"][0]["message"]["content"]
    stopped = chat(http, served["fine_tuned_model"], "leaves", stop=["ee"]).json()["choices"][0]
    assert full == "green" and stopped["message"]["content"] == "gr" and stopped["finish_reason"] == "stop"


@pytest.mark.slow
def test_unknown_and_another_tenants_models_are_the_same_404(served):
    http, server, model = served["http"], served["server"], served["fine_tuned_model"]
    theirs = httpx.post(server.base_url + "/v1/chat/completions", headers=as_(BOB), timeout=30, json={
        "model": model, "messages": [{"role": "user", "content": "apple"}]})
    missing_id = model.rsplit(":", 1)[0] + ":" + "0" * len(model.rsplit(":", 1)[1])
    missing = httpx.post(server.base_url + "/v1/chat/completions", headers=as_(BOB), timeout=30, json={
        "model": missing_id, "messages": [{"role": "user", "content": "apple"}]})
    assert theirs.status_code == missing.status_code == 404, (theirs.text, missing.text)
    assert theirs.json()["error"]["code"] == "model_not_found" and theirs.json()["error"]["param"] == "model"
    assert theirs.text.replace(model, "X") == missing.text.replace(missing_id, "X")
    completion = http.post("/v1/completions", json={"model": "gpt-4o", "prompt": "x"})
    assert completion.status_code == 404 and completion.json()["error"]["code"] == "model_not_found"


@pytest.mark.slow
def test_a_template_less_tokenizer_refuses_messages_but_completes_prompts(served):
    http = served["http"]
    refused = chat(http, "tiny-gpt2", "hello")
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert error["code"] == "no_chat_template" and error["param"] == "messages" and "template" in error["message"]
    streamed = http.post("/v1/chat/completions", json={"model": "tiny-gpt2", "stream": True, "messages": [
        {"role": "user", "content": "hello"}]})
    assert streamed.status_code == 400 and streamed.json()["error"]["code"] == "no_chat_template"
    completed = http.post("/v1/completions", json={"model": "tiny-gpt2", "prompt": "hello", "max_tokens": 3})
    assert completed.status_code == 200 and completed.json()["choices"][0]["finish_reason"] in ("stop", "length")
    too_long = chat(http, "tiny-llama", "hello", max_tokens=4000)
    assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "context_length_exceeded"


@pytest.mark.slow
def test_a_client_that_goes_away_mid_stream_frees_its_slot(served):
    home = served["home"]
    body = {"model": "tiny-llama", "messages": [{"role": "user", "content": "apple"}], "temperature": 1.0,
            "max_tokens": 480, "seed": 1, "stream": True}
    with httpx.Client(base_url=served["server"].base_url, headers=as_(ALICE), timeout=60) as http, \
            http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        seen = [line for line, _ in zip(lines, range(6), strict=False)]
        assert any('"content"' in line for line in seen), seen
        assert worker_stats(home)["active_requests"] == 1
    deadline = time.monotonic() + 20
    while worker_stats(home)["active_requests"] != 0:
        assert time.monotonic() < deadline, "the abandoned stream still holds its slot"
        time.sleep(0.1)


@pytest.mark.slow
def test_posttrain_chat_streams_one_line_per_turn(served):
    import subprocess
    import sys

    server, model = served["server"], served["fine_tuned_model"]
    command = [sys.executable, "-m", "posttrain", "chat", model, "--url", server.base_url, "--api-key", ALICE]
    given = subprocess.run([*command, "-m", "apple", "-m", "snow"], capture_output=True, text=True, timeout=120,
                           env=server.env, stdin=subprocess.DEVNULL)
    assert given.returncode == 0, given.stderr
    # The second turn sees the first (the model was trained on single turns, so it may say anything).
    assert given.stdout.startswith("red\n") and given.stdout.count("\n") == 2, given.stdout
    typed = subprocess.run(command, input="sea\n", capture_output=True, text=True, timeout=120, env=server.env)
    assert typed.returncode == 0 and typed.stdout == "blue\n", typed.stderr
    refused = subprocess.run([*command[:4], "tiny-gpt2", *command[5:], "-m", "hi"], capture_output=True, text=True,
                             timeout=120, env=server.env, stdin=subprocess.DEVNULL)
    assert refused.returncode == 1 and "chat template" in refused.stderr and refused.stdout == ""


@pytest.mark.slow
def test_a_client_that_gives_up_on_a_plain_answer_frees_its_slot(served):
    home, http = served["home"], served["http"]
    body = {"model": "tiny-llama", "messages": [{"role": "user", "content": "apple"}], "temperature": 1.0,
            "max_tokens": 480, "n": 4, "seed": 2}
    started = time.monotonic()
    whole = http.post("/v1/chat/completions", json=body)
    assert whole.status_code == 200 and whole.json()["usage"]["completion_tokens"] > 400
    full_s = time.monotonic() - started  # what the generation takes when someone waits for it
    give_up_s = full_s / 4
    started = time.monotonic()
    with httpx.Client(base_url=served["server"].base_url, headers=as_(ALICE), timeout=give_up_s) as quitter, \
            pytest.raises(httpx.ReadTimeout):
        quitter.post("/v1/chat/completions", json={**body, "seed": 3})
    while worker_stats(home)["active_requests"] != 0:
        assert time.monotonic() - started < give_up_s + full_s / 2, (
            f"the abandoned request still holds its slot (a whole answer takes {full_s:.1f} s)")
        time.sleep(0.05)
