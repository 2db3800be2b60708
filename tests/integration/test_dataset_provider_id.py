"""A dataset's ``provider_id`` is what a Llama Stack distribution reports for its source:
``huggingface`` for hub datasets, ``localfs`` for the rest. Through the real app over real stores."""

from __future__ import annotations

import base64
import json

import pytest

from tests.hub_standins import cache_dataset
from tests.spec import validate_response

ROWS = [{"messages": [{"role": "user", "content": "Hello, world!"}], "answer": "Hello, world!"},
        {"messages": [{"role": "user", "content": "What is the capital of France?"}], "answer": "Paris"}]


@pytest.fixture
def settings(tmp_path, database_url, tiny_model_path):
    """The shared settings, with a Hugging Face cache holding a stand-in for llamastack/simpleqa."""
    from posttrain.settings import Settings

    cache_dataset(tmp_path / "hf" / "datasets", "llamastack/simpleqa", ROWS)
    return Settings(home=tmp_path / "home", database_url=database_url, model_roots=[tiny_model_path.parent],
                    file_roots=[tmp_path / "files"], hf_cache=tmp_path / "hf" / "hub")


def sources(settings) -> dict[str, dict]:
    root = settings.allowed_file_roots[0]
    root.mkdir(parents=True, exist_ok=True)
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    encoded = base64.b64encode((root / "rows.jsonl").read_bytes()).decode()
    return {
        "hub": {"type": "uri", "uri": "huggingface://datasets/llamastack/simpleqa?split=train"},
        "hub-short": {"type": "uri", "uri": "huggingface://llamastack/simpleqa?split=train"},
        "rows": {"type": "rows", "rows": ROWS},
        "file": {"type": "uri", "uri": f"file://{root / 'rows.jsonl'}"},
        "data": {"type": "uri", "uri": f"data:application/jsonl;base64,{encoded}"},
    }


EXPECTED = {"hub": "huggingface", "hub-short": "huggingface", "rows": "localfs", "file": "localfs", "data": "localfs"}


def test_provider_id_names_the_source_kind_everywhere_a_dataset_is_shown(client, settings):
    for dataset_id, source in sources(settings).items():
        created = client.post("/v1/datasets", json={"purpose": "eval/messages-answer", "source": source,
                                                    "dataset_id": dataset_id})
        assert created.status_code == 200, created.text
        validate_response(created, "/v1/datasets")
        assert created.json()["provider_id"] == EXPECTED[dataset_id], dataset_id
        got = client.get(f"/v1/datasets/{dataset_id}")
        assert got.json()["provider_id"] == EXPECTED[dataset_id], dataset_id
        assert client.get(f"/v1beta/datasets/{dataset_id}").json()["provider_id"] == EXPECTED[dataset_id]
    listed = client.get("/v1/datasets")
    validate_response(listed, "/v1/datasets")
    assert {d["identifier"]: d["provider_id"] for d in listed.json()["data"]} == EXPECTED
    assert client.get("/v1/datasetio/iterrows/hub").json()["data"] == ROWS


def test_a_provider_id_in_the_request_is_refused_as_the_spec_has_none(client):
    """The spec's RegisterDatasetRequest is closed (additionalProperties: false) and names no provider_id."""
    response = client.post("/v1/datasets", json={"purpose": "eval/messages-answer", "provider_id": "localfs",
                                                 "source": {"type": "rows", "rows": ROWS}})
    assert response.status_code == 400, response.text
    assert "provider_id" in response.json()["detail"]
    assert client.get("/v1/datasets").json() == {"data": []}
