"""Datasets stored before lone surrogates were refused at the door still list (issue 12, class 5).

Such a record (``"\\ud800"`` in its metadata) made the tenant's whole ``GET /v1/datasets`` a 500,
since no UTF-8 response can encode the character: the listing now answers 200 with it replaced by
U+FFFD, and so does the record's own GET.
"""

from __future__ import annotations

from sqlalchemy import update

from posttrain.store.tables import datasets

ROWS = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]


def test_a_stored_lone_surrogate_in_metadata_lists_as_a_replacement_character(client, services):
    for dataset_id in ("good", "old-bad"):
        response = client.post("/v1/datasets", json={"purpose": "post-training/messages", "dataset_id": dataset_id,
                                                     "source": {"type": "rows", "rows": ROWS},
                                                     "metadata": {"note": "fine"}})
        assert response.status_code == 200, response.text
    # What a record written before the fix holds: written straight into the store's table.
    with services.engine.begin() as conn:
        changed = conn.execute(update(datasets).where(datasets.c.identifier == "old-bad")
                               .values(metadata={"note": "bad \ud800 text", "key \udfff": ["x\ud800"]}))
        assert changed.rowcount == 1

    listed = client.get("/v1/datasets")
    assert listed.status_code == 200, listed.text
    by_id = {d["identifier"]: d for d in listed.json()["data"]}
    assert by_id["good"]["metadata"] == {"note": "fine"}
    assert by_id["old-bad"]["metadata"] == {"note": "bad \ufffd text", "key \ufffd": ["x\ufffd"]}

    one = client.get("/v1/datasets/old-bad")
    assert one.status_code == 200, one.text
    assert one.json()["metadata"]["note"] == "bad \ufffd text"
    # The record itself is left as it was: only what is answered is replaced.
    assert services.datasets.store.get(tenant="default", identifier="old-bad").metadata["note"] == "bad \ud800 text"
