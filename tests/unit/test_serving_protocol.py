"""The typed serving protocol: a request and every stream event read back as themselves through
JSON, and bodies that break the protocol are refused with a clear message."""

from __future__ import annotations

import json

import pytest

from posttrain.domain.serving import (
    ErrorEvent,
    FinishedEvent,
    GenerationRequest,
    SamplingParams,
    ServedModel,
    ServingProtocolError,
    StartedEvent,
    TokenEvent,
    parse_event,
)

MODEL = ServedModel(id="ft:tiny:a:j1", base_path="/b", adapter_path="/a", tokenizer_path="/b", owned_by="alice",
                    created=1700000000)


@pytest.mark.parametrize("request_", [
    GenerationRequest(model=MODEL, sampling=SamplingParams(max_tokens=4), prompt="hi"),
    GenerationRequest(model=MODEL, sampling=SamplingParams(max_tokens=8, temperature=0.7, top_p=0.9, stop=("\n", "x"),
                                                           seed=3, n=2, logprobs=True, top_logprobs=2),
                      messages=({"role": "user", "content": "hello"},)),
])
def test_a_request_reads_back_as_itself(request_):
    assert GenerationRequest.from_json(json.loads(json.dumps(request_.to_json()))) == request_


@pytest.mark.parametrize("event", [
    StartedEvent(prompt_tokens=5),
    TokenEvent(index=1, text="ab", token_id=7, logprob=-0.5, top_logprobs=(("ab", -0.5), ("c", -1.25))),
    TokenEvent(index=0, text="", token_id=3),
    FinishedEvent(index=0, finish_reason="length", completion_tokens=4),
    ErrorEvent(code="prompt_too_long", message="too long"),
])
def test_every_event_reads_back_as_itself(event):
    assert parse_event(json.loads(json.dumps(event.to_json()))) == event


def test_minus_infinity_logprob_stays_json():
    line = json.dumps(TokenEvent(index=0, text="a", token_id=1, logprob=float("-inf")).to_json(), allow_nan=False)
    assert parse_event(json.loads(line)).logprob < -1e29


@pytest.mark.parametrize(("body", "message"), [
    ({"type": "nope"}, "unknown event"),
    ({"type": "finished", "index": 0, "finish_reason": "eos", "completion_tokens": 1}, "finish_reason"),
    ({"type": "token", "index": "0", "text": "a", "token_id": 1}, "index"),
])
def test_a_bad_event_is_refused(body, message):
    with pytest.raises(ServingProtocolError, match=message):
        parse_event(body)


def test_a_request_needs_exactly_one_of_prompt_and_messages():
    body = GenerationRequest(model=MODEL, sampling=SamplingParams(max_tokens=1), prompt="x").to_json()
    with pytest.raises(ServingProtocolError, match="exactly one"):
        GenerationRequest.from_json({**body, "messages": [{"role": "user", "content": "x"}]})
    with pytest.raises(ServingProtocolError, match="max_tokens"):
        GenerationRequest.from_json({**body, "sampling": {"max_tokens": 0}})
