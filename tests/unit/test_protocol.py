"""The typed trainer protocol: what the trainer writes is what the launcher reads back, flat JSON
on the wire, and anything that is not an event is told apart."""

from __future__ import annotations

import json
import math

import pytest

from posttrain.domain.protocol import (
    Cancelled,
    CheckpointWritten,
    Completed,
    Failed,
    FailureCode,
    LogLine,
    Paused,
    ProtocolError,
    Started,
    StepMetric,
    parse_line,
)

METRIC = StepMetric(step=3, epoch=1, loss=1.5, lr=1e-3, tokens_per_s=900.0, tokens=120, padding_fraction=0.1,
                    step_seconds=0.13, total_steps=8, extra={"reward_margin": 0.25})


@pytest.mark.parametrize("event", [
    Started(resources={"device": "cpu", "dtype": "bf16"}, total_steps=8, resumed_from="j-epoch-1"),
    METRIC,
    CheckpointWritten(identifier="j-epoch-1", epoch=1, step=4, path="/x/epoch_1", train_loss=2.0,
                      validation_loss=1.8, perplexity=6.05, write_seconds=0.4),
    LogLine(message="hello", level="warning"),
    Completed(), Cancelled(), Failed(code=FailureCode.BAD_ROW, message="row 3: no answer"),
    Paused(step=12, resume_point="epoch-2-step-12"), Paused(step=8),
])
def test_every_event_reads_back_as_itself(event):
    assert parse_line(event.to_line()) == event


def test_the_wire_is_flat_json_with_the_event_name():
    line = json.loads(METRIC.to_line())
    assert line["event"] == "metric" and line["reward_margin"] == 0.25 and "extra" not in line


def test_nan_travels_as_null_and_a_resent_checkpoint_has_no_write_time():
    line = json.loads(StepMetric(**{**METRIC.__dict__, "loss": math.nan}).to_line())
    assert line["loss"] is None
    resent = CheckpointWritten(identifier="j-epoch-1", epoch=1, step=4, path="/x", train_loss=1.0,
                               validation_loss=1.0, perplexity=math.inf)
    assert "write_seconds" not in json.loads(resent.to_line()) and json.loads(resent.to_line())["perplexity"] is None


@pytest.mark.parametrize("line", [
    "Loading checkpoint shards: 100%", '["event"]', '{"no": "event"}', '{"event": "surprise"}',
    '{"event": "checkpoint", "identifier": "x"}', b"\xff\xfe",
])
def test_what_is_not_an_event_is_a_protocol_error(line):
    with pytest.raises(ProtocolError):
        parse_line(line)


def test_an_unknown_failure_code_reads_as_error():
    failed = parse_line('{"event": "failed", "code": "gremlins", "message": "x"}')
    assert isinstance(failed, Failed) and failed.code is FailureCode.ERROR and failed.message == "x"


def test_failure_codes_are_the_documented_tokens():
    assert {code.value for code in FailureCode} == {"bad_row", "disk_full", "out_of_memory", "invalid_config", "usage",
                                                    "error", "path_changed", "checkpoint_refused", "trainer_lost", "worker_lost"}
