"""Datasets are never torn: a record always names a complete rows file of its own, whatever
races it or dies beside it (concurrent registrations, unregister racing a re-register, an append
that fails or is killed half-way), lists carry no rows, and what a killed write left behind is
removed at the next start. Real threads through the real app and service, a real killed process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from posttrain.errors import DuplicateDataset
from tests.conftest import REPO

PURPOSE = "post-training/messages"


def _rows(tag: str, n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"{tag}-{i}"}, {"role": "assistant", "content": "ok"}]}
            for i in range(n)]


def _file_rows(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def _register(client, dataset_id: str, rows: list[dict]):
    return client.post("/v1/datasets", json={"purpose": PURPOSE, "dataset_id": dataset_id,
                                             "source": {"type": "rows", "rows": rows}})


def _all_rows(client, dataset_id: str) -> list[dict]:
    response = client.get(f"/v1/datasetio/iterrows/{dataset_id}", params={"limit": -1})
    assert response.status_code == 200, response.text
    return response.json()["data"]


def _race(*calls):
    """Run the calls in threads released together; their results (or exceptions) in order."""
    barrier = threading.Barrier(len(calls))
    results: list = [None] * len(calls)

    def run(index, call):
        barrier.wait()
        try:
            results[index] = call()
        except Exception as exc:  # noqa: BLE001 - the test inspects what each call raised
            results[index] = exc

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_concurrent_registrations_of_one_id_one_wins_and_record_matches_file(services):
    store = services.datasets.store
    for attempt in range(30):
        dataset_id = f"same-{attempt}"
        a, b = _rows("a", 40), _rows("b", 41)
        results = _race(
            lambda rows=a, i=dataset_id: services.datasets.register(
                tenant="t", purpose=PURPOSE, source={"type": "rows", "rows": rows}, metadata={"who": "a"}, dataset_id=i),
            lambda rows=b, i=dataset_id: services.datasets.register(
                tenant="t", purpose=PURPOSE, source={"type": "rows", "rows": rows}, metadata={"who": "b"}, dataset_id=i),
        )
        won = [r for r in results if not isinstance(r, Exception)]
        lost = [r for r in results if isinstance(r, Exception)]
        assert len(won) == 1 and len(lost) == 1 and isinstance(lost[0], DuplicateDataset), results
        record = store.get(tenant="t", identifier=dataset_id)
        expected = a if record.metadata["who"] == "a" else b
        assert record.row_count == len(expected)
        assert _file_rows(record.rows_path) == expected
        rows, has_more = services.datasets.iterrows(tenant="t", dataset_id=dataset_id, start_index=0, limit=-1)
        assert rows == expected and not has_more
    # The loser's rows file is gone: one file per dataset.
    assert len(list(store.root.glob("*.jsonl"))) == 30


FLIP_SCRIPT = """
import sys, time
from pathlib import Path
from posttrain.errors import DatasetNotFound, DuplicateDataset
from posttrain.settings import Settings
from posttrain.services.container import build_services
services = build_services(Settings(home=sys.argv[1], database_url=sys.argv[2]))
store, tag, torn, turns = services.datasets.store, sys.argv[3], 0, 0
rows = [{"messages": [{"role": "user", "content": tag}, {"role": "assistant", "content": "ok"}]}] * 20
deadline = time.monotonic() + float(sys.argv[4])
while time.monotonic() < deadline:
    turns += 1
    try:
        services.datasets.register(tenant="t", purpose="post-training/messages",
                                   source={"type": "rows", "rows": rows}, metadata={}, dataset_id="flip")
    except DuplicateDataset:
        pass
    record = store.get(tenant="t", identifier="flip")
    # Torn: the record is there, the file it names is not, and the record is still the same one after.
    if record is not None and not Path(record.rows_path).exists():
        if store.get(tenant="t", identifier="flip") == record:
            torn += 1
    try:
        services.datasets.unregister(tenant="t", dataset_id="flip")
    except DatasetNotFound:
        pass
print(torn, turns, flush=True)
"""


def test_processes_racing_unregister_and_re_register_never_tear_a_record(settings, database_url):
    """Two real processes register and unregister one id as fast as they can, in parallel (not
    threads taking turns): neither ever finds a record whose file is gone."""
    from posttrain.services.container import build_services

    build_services(settings).close()
    processes = [subprocess.Popen([sys.executable, "-c", FLIP_SCRIPT, str(settings.home), database_url, tag, "6"],
                                  cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE)
                 for tag in ("a", "b")]
    reports = [process.communicate(timeout=120)[0].split() for process in processes]
    assert all(process.returncode == 0 for process in processes)
    torn = [int(report[0]) for report in reports]
    assert all(int(report[1]) > 20 for report in reports), reports
    assert torn == [0, 0], f"records found naming a removed file: {reports}"


def test_delete_racing_re_register_through_the_app_never_answers_500(client):
    assert _register(client, "flip", _rows("0", 3)).status_code == 200
    for attempt in range(40):
        results = _race(lambda: client.delete("/v1/datasets/flip"),
                        lambda a=attempt: _register(client, "flip", _rows(str(a), 3)))
        assert all(r.status_code in (200, 204, 404, 409) for r in results), [r.text for r in results]
        if client.get("/v1/datasets/flip").status_code == 404:
            assert _register(client, "flip", _rows(str(attempt), 3)).status_code == 200
        assert client.get("/v1/datasetio/iterrows/flip").status_code == 200
    assert client.get("/v1/datasets").status_code == 200


def test_an_append_with_a_bad_row_changes_nothing(client):
    good = _rows("g", 4)
    assert _register(client, "d", good).status_code == 200
    response = client.post("/v1/datasetio/append-rows/d", json={"rows": [*_rows("new", 3), "not a row", *_rows("x", 2)]})
    assert response.status_code == 400, response.text
    assert _all_rows(client, "d") == good


def test_an_append_that_fails_half_way_through_its_write_changes_nothing(services):
    """The store is handed rows it cannot write past the third (a value JSON cannot hold): the
    write fails after good rows went out, and the dataset is as it was, ghost rows and all."""
    good = _rows("g", 4)
    services.datasets.register(tenant="t", purpose=PURPOSE, source={"type": "rows", "rows": good},
                               metadata={}, dataset_id="d")
    before = {p.name for p in services.datasets.store.root.iterdir()}
    with pytest.raises(TypeError):
        services.datasets.store.append(tenant="t", identifier="d", rows=[*_rows("new", 3), {"bad": object()}])
    record = services.datasets.store.get(tenant="t", identifier="d")
    assert record.row_count == 4 and _file_rows(record.rows_path) == good
    rows, _ = services.datasets.iterrows(tenant="t", dataset_id="d", start_index=0, limit=-1)
    assert rows == good
    assert {p.name for p in services.datasets.store.root.iterdir()} == before, "the partial file must go"


START_SCRIPT = """
import sys
from posttrain.settings import Settings
from posttrain.services.container import build_services
build_services(Settings(home=sys.argv[1], database_url=sys.argv[2])).close()
"""


def _age(folder: Path, seconds: float) -> None:
    """Make everything in ``folder`` (and the folder) look last changed ``seconds`` ago."""
    then = time.time() - seconds
    for path in [folder, *folder.rglob("*")]:
        os.utime(path, (then, then))


def _start_a_new_process(home: Path, database_url: str) -> None:
    """What a server does first at start, in a process of its own (started after the files it judges)."""
    subprocess.run([sys.executable, "-c", START_SCRIPT, str(home), database_url], cwd=REPO,
                   env={**os.environ, "PYTHONPATH": str(REPO)}, check=True)


APPEND_SCRIPT = textwrap.dedent("""
    import sys
    from posttrain.settings import Settings
    from posttrain.services.container import build_services
    services = build_services(Settings(home=sys.argv[1], database_url=sys.argv[2]))
    rows = [{"messages": [{"role": "user", "content": "big-%d " % i + "x" * 100},
                          {"role": "assistant", "content": "ok"}]} for i in range(200_000)]
    print("appending", flush=True)
    services.datasets.store.append(tenant="t", identifier="d", rows=rows)
    print("appended", flush=True)
""")


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def _kill_mid_append(home: Path, database_url: str) -> None:
    """Start a real process appending many rows to dataset d and SIGKILL it while its new rows
    file is being written."""
    process = subprocess.Popen([sys.executable, "-c", APPEND_SCRIPT, str(home), database_url], cwd=REPO,
                               env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE)
    start_bytes = _folder_bytes(home / "datasets")
    try:
        assert process.stdout.readline().strip() == b"appending"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if _folder_bytes(home / "datasets") > start_bytes + 100_000:
                break
            time.sleep(0.005)
        else:
            raise AssertionError("the append never started writing")
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait()


def test_a_killed_append_leaves_the_dataset_whole_and_its_leftovers_go_at_start(settings, database_url):
    from posttrain.services.container import build_services

    good = _rows("g", 4)
    services = build_services(settings)
    try:
        services.datasets.register(tenant="t", purpose=PURPOSE, source={"type": "rows", "rows": good},
                                   metadata={}, dataset_id="d")
    finally:
        services.close()
    known = {p.name for p in settings.datasets_dir.iterdir()}
    _kill_mid_append(settings.home, database_url)

    # A fresh process sees the dataset exactly as before the append, and its start removes the partial
    # file once it is older than the grace another server sharing the folder is given.
    _start_a_new_process(settings.home, database_url)
    assert {p.name for p in settings.datasets_dir.iterdir()} != known, "a fresh leftover is kept for a while"
    _age(settings.datasets_dir, 3600)
    _start_a_new_process(settings.home, database_url)
    assert {p.name for p in settings.datasets_dir.iterdir()} == known
    services = build_services(settings)
    try:
        record = services.datasets.store.get(tenant="t", identifier="d")
        assert record.row_count == 4 and _file_rows(record.rows_path) == good
        rows, has_more = services.datasets.iterrows(tenant="t", dataset_id="d", start_index=0, limit=-1)
        assert rows == good and not has_more
    finally:
        services.close()


def test_a_reader_never_sees_a_partial_append(services):
    good = _rows("g", 50)
    services.datasets.register(tenant="t", purpose=PURPOSE, source={"type": "rows", "rows": good},
                               metadata={}, dataset_id="d")
    batch = _rows("new", 2000)
    seen: list[int] = []
    done = threading.Event()

    def read():
        while not done.is_set():
            rows, _ = services.datasets.iterrows(tenant="t", dataset_id="d", start_index=0, limit=-1)
            seen.append(len(rows))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for _ in range(5):
            services.datasets.append_rows(tenant="t", dataset_id="d", rows=batch)
    finally:
        done.set()
        reader.join()
    assert seen and all((n - 50) % 2000 == 0 for n in seen), sorted(set(seen))


def test_listing_datasets_carries_no_rows(client):
    rows = _rows("r", 300)
    assert _register(client, "big", rows).status_code == 200
    listed = client.get("/v1/datasets")
    assert listed.status_code == 200
    (entry,) = listed.json()["data"]
    assert entry["source"] == {"type": "rows", "rows": []}
    got = client.get("/v1/datasets/big").json()
    assert got["source"] == {"type": "rows", "rows": []}
    assert _all_rows(client, "big") == rows


def test_start_removes_orphans_of_a_killed_process_and_nothing_else(settings, database_url, services):
    """Temp files, unrecorded rows files and job folders with no jobs row, left before the
    process started, go; a dataset's rows and files not ours stay."""
    services.datasets.register(tenant="t", purpose=PURPOSE, source={"type": "rows", "rows": _rows("k", 3)},
                               metadata={}, dataset_id="keep")
    kept_rows = {p.name for p in settings.datasets_dir.iterdir()}
    (settings.datasets_dir / ".tmp-abc123.jsonl").write_text('{"half": ')
    (settings.datasets_dir / "old-0123456789abcdef.jsonl.tmp").write_text("{}\n")
    (settings.datasets_dir / "gone-0123456789abcdef-0123456789ab.jsonl").write_text("{}\n")
    orphan_job = settings.jobs_dir / "job-orphan"
    orphan_job.mkdir()
    (orphan_job / "train.jsonl").write_text("{}\n")
    unrelated = settings.datasets_dir / "notes.txt"
    unrelated.write_text("not ours")
    _age(settings.datasets_dir, 3600)
    _age(settings.jobs_dir, 3600)
    (settings.datasets_dir / ".tmp-fresh.jsonl").write_text("{}\n")  # maybe another server's write under way
    _start_a_new_process(settings.home, database_url)
    assert {p.name for p in settings.datasets_dir.iterdir()} == kept_rows | {"notes.txt", ".tmp-fresh.jsonl"}
    assert not orphan_job.exists()
    rows, _ = services.datasets.iterrows(tenant="t", dataset_id="keep", start_index=0, limit=-1)
    assert rows == _rows("k", 3)
