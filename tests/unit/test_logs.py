"""Structured logs: one JSON object per line, keyed by a stable event name."""

from __future__ import annotations

import json
import logging

from posttrain.logs import JSONFormatter


def test_json_lines_carry_the_action_as_event_and_the_extras():
    record = logging.LogRecord("posttrain.worker", logging.INFO, __file__, 1, "claimed job %s", ("j1",), None)
    record.action = "job_claimed"
    record.job_id = "j1"
    line = json.loads(JSONFormatter().format(record))
    assert line["event"] == "job_claimed" and line["message"] == "claimed job j1" and line["job_id"] == "j1"
    assert line["level"] == "info" and line["logger"] == "posttrain.worker" and line["ts"].endswith("+00:00")
