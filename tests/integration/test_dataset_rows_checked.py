"""Rows are checked where the user sends them: a row that fits no layout the trainer reads is
refused at registration or append with a 400 naming it, and nothing is written (all or nothing)."""

from __future__ import annotations

import base64
import csv
import io
import json

import pytest

from posttrain.demo import colour_rows
from posttrain.domain.rows import EXPECTED_ANY
from posttrain.services.access import DEFAULT_TENANT
from tests.integration.test_api import assert_problem, register

GOOD = colour_rows(repeat=1)
BAD = {"instruction": "Say hi", "output": "hi"}  # Alpaca's columns: no layout we read
REFUSAL = f"row 2: no known layout fits the columns ['instruction', 'output']; expected one of: {EXPECTED_ANY}"


def _nothing_registered(client, settings, dataset_id: str) -> None:
    assert_problem(client.get(f"/v1/datasets/{dataset_id}"), 404, dataset_id)
    assert client.get("/v1/datasets").json() == {"data": []}
    assert not settings.datasets_dir.exists() or not any(settings.datasets_dir.iterdir())


def _body(source: dict, dataset_id: str, purpose: str = "post-training/messages") -> dict:
    return {"purpose": purpose, "dataset_id": dataset_id, "source": source}


@pytest.mark.parametrize("prefix", ["/v1", "/v1beta"])
def test_inline_rows_that_fit_no_layout_register_nothing(client, settings, prefix):
    rows = [*GOOD[:2], BAD, *GOOD[2:]]
    body = assert_problem(client.post(f"{prefix}/datasets", json=_body({"type": "rows", "rows": rows}, "mixed")), 400)
    assert body["detail"] == REFUSAL
    _nothing_registered(client, settings, "mixed")


def test_a_file_whose_rows_fit_no_layout_registers_nothing(client, settings):
    root = settings.allowed_file_roots[0]
    root.mkdir(parents=True, exist_ok=True)
    (root / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [*GOOD[:2], BAD]))
    answer = client.post("/v1/datasets", json=_body({"type": "uri", "uri": f"file://{root / 'mixed.jsonl'}"}, "from-file"))
    assert assert_problem(answer, 400)["detail"] == REFUSAL
    out = io.StringIO()
    csv.writer(out).writerows([["instruction", "output"], ["Say hi", "hi"]])
    (root / "alpaca.csv").write_text(out.getvalue())
    answer = client.post("/v1/datasets", json=_body({"type": "uri", "uri": str(root / "alpaca.csv")}, "from-csv"))
    assert_problem(answer, 400, "row 0:", "['instruction', 'output']", EXPECTED_ANY)
    encoded = base64.b64encode(json.dumps([GOOD[0], {"dialog": "[{not json"}]).encode()).decode()
    source = {"type": "uri", "uri": f"data:application/json;base64,{encoded}"}
    answer = client.post("/v1/datasets", json=_body(source, "from-data"))
    assert_problem(answer, 400, "row 1: column 'dialog' is not valid JSON", EXPECTED_ANY)
    for dataset_id in ("from-file", "from-csv", "from-data"):
        _nothing_registered(client, settings, dataset_id)


@pytest.mark.parametrize("path", ["/v1/datasetio/append-rows/toy", "/v1beta/datasetio/append-rows/toy"])
def test_an_append_with_a_row_that_fits_no_layout_appends_nothing(client, services, path):
    register(client, "toy", rows=GOOD)
    appended = [{"prompt": "What colour is snow?", "completion": "White."}, {"messages": []}]
    answer = client.post(path, json={"rows": appended})
    assert_problem(answer, 400, "row 1: column 'messages' must be a non-empty list of messages", EXPECTED_ANY)
    assert client.get("/v1/datasets/toy").status_code == 200
    assert services.datasets.get(tenant=DEFAULT_TENANT, dataset_id="toy").row_count == len(GOOD)
    everything = client.get("/v1/datasetio/iterrows/toy", params={"limit": -1}).json()
    assert (everything["data"], everything["has_more"]) == (GOOD, False)
    # The same rows, fixed, append whole.
    chat = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    assert client.post(path, json={"rows": [appended[0], chat]}).status_code == 200
    assert len(client.get("/v1/datasetio/iterrows/toy", params={"limit": -1}).json()["data"]) == len(GOOD) + 2


@pytest.mark.parametrize(
    ("purpose", "rows"),
    [
        ("post-training/messages", []),
        ("post-training/messages", [{"prompt": "Q?", "chosen": "good", "rejected": "bad"}]),
        ("eval/question-answer", [{"question": "Q?", "answer": "A."}]),
        # Llama Stack's own integration test registers exactly these (v0.2.23 tests/integration/datasets).
        ("eval/messages-answer", [{"messages": [{"role": "user", "content": "Hello, world!"}], "answer": "Hello, world!"},
                                  {"messages": [{"role": "user", "content": "What is the capital of France?"}],
                                   "answer": "Paris"}]),
        ("eval/messages-answer", [{"input_query": "Q?", "generated_answer": "G", "expected_answer": "A.",
                                   "chat_completion_input": json.dumps([{"role": "user", "content": "Q?"}])}]),
    ],
)
def test_rows_of_every_layout_still_register(client, purpose, rows):
    answer = client.post("/v1/datasets", json=_body({"type": "rows", "rows": rows}, "ok", purpose))
    assert answer.status_code == 200, answer.text
    page = client.get("/v1/datasetio/iterrows/ok", params={"limit": -1}).json()
    assert (page["data"], page["has_more"]) == (rows, False)
