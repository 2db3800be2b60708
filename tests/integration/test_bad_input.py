"""Bad input is a 400, never a 500, and creates nothing: what an attacker sent a real server.

Lone surrogates, NaN and Infinity, integers past 64 bits, over-long ids and path components, and
forged event cursors, each through the real app on SQLite and PostgreSQL. After every refusal the
dataset and job lists still answer 200, unchanged, and no job folder was made.
"""

from __future__ import annotations

import json
from urllib.parse import quote

import pytest

from tests.integration.test_api import PREFERENCES, ROWS, assert_problem, dpo_request, lora_request, register

SFT = "/v1/post-training/supervised-fine-tune"
DPO = "/v1/post-training/preference-optimize"
LONE = "\\ud800"  # as it appears in the JSON text: the escape of a lone surrogate


def post_raw(client, path: str, text: str):
    """POST ``text`` as it is: json.dumps cannot write NaN in strict form or a lone surrogate escape."""
    return client.post(path, content=text.encode(), headers={"content-type": "application/json"})


def with_raw(body: dict, path: tuple, raw: str) -> str:
    """``body`` as JSON text with the value at ``path`` replaced by the raw JSON text ``raw``."""
    marker = "__RAW_VALUE__"
    target = body
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = marker
    return json.dumps(body).replace(json.dumps(marker), raw)


def snapshot(client, settings) -> tuple:
    datasets, jobs = client.get("/v1/datasets"), client.get("/v1/post-training/jobs")
    assert datasets.status_code == 200 and jobs.status_code == 200, (datasets.text, jobs.text)
    folders = sorted(p.name for p in settings.jobs_dir.iterdir()) if settings.jobs_dir.exists() else []
    return datasets.json(), jobs.json(), folders


@pytest.fixture
def ready(client, settings, tiny_model_path):
    register(client)
    register(client, "prefs", rows=PREFERENCES)
    return snapshot(client, settings)


def _register_body(**changes) -> dict:
    body = {"purpose": "post-training/messages", "source": {"type": "rows", "rows": [dict(r) for r in ROWS[:2]]},
            "dataset_id": "new-one"}
    body.update(changes)
    return body


# -- lone surrogates --------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "field"), [
    (("source", "rows", 0, "input_query"), "source.rows.0.input_query"),
    (("dataset_id",), "dataset_id"),
    (("metadata",), "metadata.note"),
])
def test_a_lone_surrogate_in_a_dataset_is_refused(client, settings, ready, path, field):
    raw = json.dumps({"note": "x"}).replace('"x"', f'"{LONE}"') if path == ("metadata",) else f'"{LONE}"'
    answer = post_raw(client, "/v1/datasets", with_raw(_register_body(), path, raw))
    assert_problem(answer, 400, field, "surrogate")
    assert snapshot(client, settings) == ready


def test_a_lone_surrogate_in_a_key_or_appended_row_is_refused(client, settings, ready):
    rows = '[{"input_query": "q", "expected_answer": "a", "' + LONE + '": 1}]'
    assert_problem(post_raw(client, "/v1/datasets", with_raw(_register_body(), ("source", "rows"), rows)), 400,
                   "source.rows.0", "surrogate")
    appended = post_raw(client, "/v1/datasetio/append-rows/toy",
                        '{"rows": [{"input_query": "' + LONE + '", "expected_answer": "a"}]}')
    assert_problem(appended, 400, "rows.0.input_query", "surrogate")
    assert snapshot(client, settings) == ready
    assert len(client.get("/v1/datasetio/iterrows/toy", params={"limit": -1}).json()["data"]) == len(ROWS)


@pytest.mark.parametrize("path", [("job_uuid",), ("training_config", "data_config", "dataset_id"), ("model",),
                                  ("logger_config",)])
def test_a_lone_surrogate_in_a_fine_tune_is_refused(client, settings, ready, tiny_model_path, path):
    raw = '{"type": "' + LONE + '"}' if path == ("logger_config",) else f'"{LONE}"'
    answer = post_raw(client, SFT, with_raw(lora_request(str(tiny_model_path), "toy"), path, raw))
    assert_problem(answer, 400, ".".join(path), "surrogate")
    assert snapshot(client, settings) == ready


# -- NaN and Infinity -------------------------------------------------------------------------


@pytest.mark.parametrize("raw", ["NaN", "Infinity", "-Infinity", "1e400"])
@pytest.mark.parametrize("field", ["lr", "weight_decay"])
def test_non_finite_optimizer_numbers_are_refused(client, settings, ready, tiny_model_path, raw, field):
    body = lora_request(str(tiny_model_path), "toy")
    answer = post_raw(client, SFT, with_raw(body, ("training_config", "optimizer_config", field), raw))
    assert_problem(answer, 400, f"training_config.optimizer_config.{field}", "finite")
    assert snapshot(client, settings) == ready


@pytest.mark.parametrize("raw", ["NaN", "Infinity", "-1e999"])
def test_non_finite_beta_and_rows_are_refused(client, settings, ready, tiny_model_path, raw):
    body = dpo_request(str(tiny_model_path), "prefs")
    assert_problem(post_raw(client, DPO, with_raw(body, ("algorithm_config", "beta"), raw)), 400,
                   "algorithm_config.beta", "finite")
    answer = post_raw(client, "/v1/datasets", with_raw(_register_body(), ("metadata",), '{"score": ' + raw + "}"))
    assert_problem(answer, 400, "metadata.score", "finite")
    assert snapshot(client, settings) == ready


def test_the_schemas_refuse_non_finite_numbers_on_their_own():
    """Defence in depth: a body that reached the schemas by another road is refused there too."""
    from pydantic import ValidationError

    from posttrain.api.schemas import OptimizerConfig
    from posttrain.domain.recipes import Optimizer

    for model, values in ((OptimizerConfig, {"optimizer_type": "adamw", "lr": 1e-3, "num_warmup_steps": 0}),
                          (Optimizer, {})):
        with pytest.raises(ValidationError, match="finite"):
            model.model_validate({**values, "weight_decay": float("nan")})


# -- numbers, nesting and encodings no store can hold -----------------------------------------


@pytest.mark.parametrize(("raw", "words"), [
    ("99999999999999999999", ["training_config.n_epochs", "out of range"]),
    ("-9223372036854775809", ["training_config.n_epochs", "out of range"]),
    ("1" * 5000, ["body", "too long"]),
])
def test_integers_past_64_bits_are_refused(client, settings, ready, tiny_model_path, raw, words):
    body = lora_request(str(tiny_model_path), "toy")
    assert_problem(post_raw(client, SFT, with_raw(body, ("training_config", "n_epochs"), raw)), 400, *words)
    assert snapshot(client, settings) == ready


@pytest.mark.parametrize("depth", [100, 100_000])
def test_deep_nesting_is_refused(client, settings, ready, depth):
    nested = "[" * depth + "]" * depth
    answer = post_raw(client, "/v1/datasets", with_raw(_register_body(), ("metadata",), '{"deep": ' + nested + "}"))
    assert_problem(answer, 400, "nested too deeply")
    assert snapshot(client, settings) == ready


def test_a_body_that_is_not_utf8_or_not_json_is_refused(client, settings, ready):
    bad = json.dumps(_register_body()).encode().replace(b"new-one", b"new-\xed\xa0\x80")  # a UTF-8-encoded surrogate
    answer = client.post("/v1/datasets", content=bad, headers={"content-type": "application/json"})
    assert_problem(answer, 400, "UTF-8")
    assert_problem(post_raw(client, "/v1/datasets", '{"purpose": '), 400, "not valid JSON", "character")
    assert snapshot(client, settings) == ready


# -- cursors -----------------------------------------------------------------------------------


def _submitted_job(client, tiny_model_path) -> str:
    body = lora_request(str(tiny_model_path), "toy")
    assert client.post(SFT, json=body).status_code == 200
    return body["job_uuid"]


@pytest.mark.parametrize("after", ["99999999999999999999", "9223372036854775808", "-1"])
def test_event_cursors_past_64_bits_are_refused(client, ready, tiny_model_path, after):
    job_uuid = _submitted_job(client, tiny_model_path)
    assert_problem(client.get("/v1/post-training/job/events", params={"job_uuid": job_uuid, "after": after}),
                   400, "after")
    stream = client.get("/v1/post-training/job/events", params={"job_uuid": job_uuid, "after": after},
                        headers={"accept": "text/event-stream"})
    assert_problem(stream, 400, "after")
    biggest = client.get("/v1/post-training/job/events", params={"job_uuid": job_uuid, "after": str(2**63 - 1)})
    assert biggest.status_code == 200 and biggest.json()["data"] == []


@pytest.mark.parametrize("last_event_id", ["é".encode("latin-1"), "²".encode(), b"99999999999999999999", b"1x"])
def test_a_forged_last_event_id_is_refused_before_the_stream_starts(client, ready, tiny_model_path, last_event_id):
    job_uuid = _submitted_job(client, tiny_model_path)
    answer = client.get("/v1/post-training/job/events", params={"job_uuid": job_uuid},
                        headers={"accept": "text/event-stream", "last-event-id": last_event_id})
    assert_problem(answer, 400, "Last-Event-ID")


@pytest.mark.parametrize("param", ["start_index", "limit"])
def test_row_page_bounds_past_64_bits_are_refused(client, ready, param):
    assert_problem(client.get("/v1/datasetio/iterrows/toy", params={param: "99999999999999999999"}), 400, param)
    assert client.get("/v1/datasetio/iterrows/toy", params={param: 1}).status_code == 200


# -- long ids and path components --------------------------------------------------------------


def test_over_long_ids_are_refused(client, settings, ready, tiny_model_path):
    assert_problem(client.post("/v1/datasets", json=_register_body(dataset_id="d" * 256)), 400, "dataset_id", "255")
    for path in (("job_uuid",), ("training_config", "data_config", "dataset_id"),
                 ("training_config", "data_config", "validation_dataset_id")):
        body = lora_request(str(tiny_model_path), "toy")
        answer = post_raw(client, SFT, with_raw(body, path, json.dumps("x" * 300)))
        assert_problem(answer, 400, ".".join(path), "255")
    assert snapshot(client, settings) == ready
    longest = "é" * 255  # the limit counts characters, as the store's column does
    assert client.post("/v1/datasets", json=_register_body(dataset_id=longest)).status_code == 200
    assert client.get(f"/v1/datasets/{quote(longest)}").json()["identifier"] == longest


def test_over_long_path_components_are_refused(client, settings, ready, tiny_model_path):
    root = settings.allowed_file_roots[0]
    long_name = "a" * 300
    answer = client.post("/v1/datasets", json=_register_body(source={"type": "uri", "uri": f"file://{root}/{long_name}.jsonl"}))
    assert_problem(answer, 400, "long")
    for field, value in (("model", f"{tiny_model_path.parent}/{long_name}"), ("model", f"org/{long_name}"),
                         ("checkpoint_dir", f"{root}/{long_name}"),
                         ("checkpoint_dir", f"{root}/" + "é/" * 1500),  # 3000 characters, 4500 bytes
                         ("checkpoint_dir", f"{root}/" + "deep/" * 750)):  # fits PATH_MAX, its checkpoints would not
        body = lora_request(str(tiny_model_path), "toy")
        body[field] = value
        assert_problem(client.post(SFT, json=body), 400, field, "bytes")
    body = dpo_request(str(tiny_model_path), "prefs")
    body["finetuned_model"] = f"{tiny_model_path.parent}/{'é' * 200}"  # 400 bytes, 200 characters
    assert_problem(client.post(DPO, json=body), 400, "finetuned_model", "bytes")
    assert snapshot(client, settings) == ready


# -- job_uuids with a slash -------------------------------------------------------------------


def test_a_job_uuid_with_a_slash_is_reached_by_every_route(client, tiny_model_path):
    """Kept, not refused: the query routes every released client calls reach such a job already,
    and the path routes (no released client calls them) now reach it too, as sent or encoded."""
    register(client)
    body = lora_request(str(tiny_model_path), "toy", job_uuid="team/sft-1")
    assert client.post(SFT, json=body).status_code == 200
    for path in ("team/sft-1", quote("team/sft-1", safe="")):
        status = client.get(f"/v1alpha/post-training/jobs/{path}/status")
        assert status.status_code == 200 and status.json()["job_uuid"] == "team/sft-1", status.text
        artifacts = client.get(f"/v1alpha/post-training/jobs/{path}/artifacts")
        assert artifacts.status_code == 200 and artifacts.json()["job_uuid"] == "team/sft-1"
    assert client.post("/v1alpha/post-training/jobs/team/sft-1/cancel").status_code == 200
    assert client.get("/v1/post-training/job/status", params={"job_uuid": "team/sft-1"}).json()["status"] == "cancelled"
    assert_problem(client.get("/v1alpha/post-training/jobs/team/other/status"), 404, "team/other")
