"""Dataset sources are read from real files in temporary folders, in every format and URI form a client sends."""

from __future__ import annotations

import base64
import csv
import datetime as dt
import glob
import json
import math
import mimetypes
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from posttrain.errors import DatasetSourceInvalid, PathOutsideRoots
from posttrain.services.dataset_sources import load_uri_rows, validate_rows

CHAT = [{"role": "user", "content": "Hello, world!"}, {"role": "assistant", "content": "Hi!"}]
ROWS = [{"messages": CHAT, "id": 1}, {"messages": CHAT[:1], "id": 2}]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "files"
    folder.mkdir()
    return folder


def load(uri: str, root: Path, **kwargs: object) -> list[dict]:
    return load_uri_rows(uri, file_roots=[root], **kwargs)  # type: ignore[arg-type]


def jsonl_bytes(rows: list[dict], *, ensure_ascii: bool = True) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=ensure_ascii) + "\n" for r in rows).encode()


def parquet_bytes(rows: list[dict]) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    return sink.getvalue().to_pybytes()


def data_uri(payload: bytes, mime: str) -> str:
    """What llama_stack_client's data_url_from_file builds: data:{mime};base64,{b64}."""
    return f"data:{mime};base64,{base64.b64encode(payload).decode()}"


def csv_bytes(rows: list[dict]) -> bytes:
    lines = [list(rows[0])] + [[json.dumps(v) if not isinstance(v, str) else v for v in r.values()] for r in rows]
    out = __import__("io").StringIO()
    csv.writer(out).writerows(lines)
    return out.getvalue().encode()


# --- local files ---------------------------------------------------------------------------------------------


def test_jsonl_by_plain_path_and_file_uri_skipping_blank_lines(root: Path) -> None:
    path = root / "chat.jsonl"
    path.write_bytes(b"\n" + jsonl_bytes(ROWS[:1]) + b"  \r\n" + jsonl_bytes(ROWS[1:]))
    assert load(str(path), root) == ROWS
    assert load(path.as_uri(), root) == ROWS
    assert load(f"file://localhost{path}", root) == ROWS


def test_file_uri_with_percent_encoded_space(root: Path) -> None:
    path = root / "my data.jsonl"
    path.write_bytes(jsonl_bytes(ROWS))
    assert load(path.as_uri(), root) == ROWS


@pytest.mark.parametrize("doc", [ROWS, {"rows": ROWS}, {"data": ROWS}])
def test_json_list_or_object_with_rows_or_data(root: Path, doc: object) -> None:
    (root / "d.json").write_text(json.dumps(doc))
    assert load(str(root / "d.json"), root) == ROWS


def test_json_object_without_rows_is_refused(root: Path) -> None:
    (root / "d.json").write_text(json.dumps({"messages": CHAT}))
    with pytest.raises(DatasetSourceInvalid, match="'rows'/'data' list"):
        load(str(root / "d.json"), root)


def test_csv_keeps_json_cells_as_strings(root: Path) -> None:
    (root / "d.csv").write_bytes(csv_bytes(ROWS))
    rows = load(str(root / "d.csv"), root)
    assert rows == [{"messages": json.dumps(CHAT), "id": "1"}, {"messages": json.dumps(CHAT[:1]), "id": "2"}]
    assert json.loads(rows[0]["messages"]) == CHAT


def test_csv_with_chat_completion_input_column_and_tsv(root: Path) -> None:
    (root / "d.csv").write_text('chat_completion_input,expected_answer\n"[{""role"": ""user""}]",Paris\n')
    assert load(str(root / "d.csv"), root) == [{"chat_completion_input": '[{"role": "user"}]', "expected_answer": "Paris"}]
    (root / "d.tsv").write_text("question\tanswer\nWhere?\tParis\n")
    assert load(str(root / "d.tsv"), root) == [{"question": "Where?", "answer": "Paris"}]


def test_csv_row_with_wrong_cell_count_names_line(root: Path) -> None:
    (root / "d.csv").write_text("a,b\n1,2\n3\n")
    with pytest.raises(DatasetSourceInvalid, match="line 3 has 1 cells"):
        load(str(root / "d.csv"), root)


def test_parquet_nested_columns_become_lists_and_dicts(root: Path) -> None:
    table = pa.table(
        {
            "messages": pa.array([CHAT, CHAT[:1]], type=pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
            "scores": pa.array([[0.5, 1.0], []], type=pa.list_(pa.float64())),
            "day": pa.array([dt.date(2024, 5, 1), None], type=pa.date32()),
            "missing": pa.array([float("nan"), 2.0]),
        }
    )
    pq.write_table(table, root / "d.parquet")
    rows = load(str(root / "d.parquet"), root)
    assert rows == [
        {"messages": CHAT, "scores": [0.5, 1.0], "day": "2024-05-01", "missing": None},
        {"messages": CHAT[:1], "scores": [], "day": None, "missing": 2.0},
    ]
    json.dumps(rows, allow_nan=False)


def test_unknown_extension_is_sniffed(root: Path) -> None:
    (root / "a.txt").write_bytes(jsonl_bytes(ROWS))
    (root / "b.data").write_bytes(parquet_bytes(ROWS))
    assert load(str(root / "a.txt"), root) == ROWS
    assert load(str(root / "b.data"), root) == ROWS


# --- data: URIs -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mime", "payload"),
    [
        ("application/json", json.dumps(ROWS).encode()),
        ("application/jsonl", jsonl_bytes(ROWS)),
        ("application/x-ndjson", jsonl_bytes(ROWS)),
        ("application/vnd.apache.parquet", parquet_bytes(ROWS)),
        ("application/octet-stream", jsonl_bytes(ROWS)),
        ("application/octet-stream", json.dumps({"rows": ROWS}).encode()),
        ("application/octet-stream", parquet_bytes(ROWS)),
        ("None", jsonl_bytes(ROWS)),  # data_url_from_file when mimetypes knows no type
        ("", json.dumps(ROWS).encode()),
    ],
)
def test_data_uri_by_mime_or_sniffed(root: Path, mime: str, payload: bytes) -> None:
    assert load(data_uri(payload, mime), root) == ROWS


@pytest.mark.parametrize("mime", ["text/csv", "csv", "text/csv;charset=utf-8", "application/octet-stream", "text/plain"])
def test_data_uri_csv(root: Path, mime: str) -> None:
    rows = load(data_uri(b"question,answer\nWhere?,Paris\n", mime), root)
    assert rows == [{"question": "Where?", "answer": "Paris"}]


@pytest.mark.parametrize("suffix", [".csv", ".json", ".jsonl", ".parquet"])
def test_data_uri_as_llama_stack_client_builds_it(root: Path, tmp_path: Path, suffix: str) -> None:
    writers = {".csv": csv_bytes, ".json": lambda r: json.dumps(r).encode(), ".jsonl": jsonl_bytes, ".parquet": parquet_bytes}
    path = tmp_path / f"upload{suffix}"
    path.write_bytes(writers[suffix](ROWS))
    mime, _ = mimetypes.guess_type(str(path))
    rows = load(f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}", root)
    expected = [{"messages": json.dumps(r["messages"]), "id": str(r["id"])} for r in ROWS] if suffix == ".csv" else ROWS
    assert rows == expected


def test_data_uri_percent_encoded_without_base64(root: Path) -> None:
    assert load('data:application/json,%5B%7B%22a%22%3A%201%7D%5D', root) == [{"a": 1}]


def test_data_uri_bad_base64_or_no_comma(root: Path) -> None:
    with pytest.raises(DatasetSourceInvalid, match="base64"):
        load("data:application/json;base64,@@@", root)
    with pytest.raises(DatasetSourceInvalid, match="','"):
        load("data:application/json;base64", root)


# --- refusals -------------------------------------------------------------------------------------------------


def test_path_outside_roots_names_path_and_roots(root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere.jsonl"
    outside.write_bytes(jsonl_bytes(ROWS))
    with pytest.raises(PathOutsideRoots) as info:
        load(str(outside), root)
    assert str(outside) in info.value.detail and str(root.resolve()) in info.value.detail
    with pytest.raises(PathOutsideRoots):
        load(outside.as_uri(), root)


@pytest.mark.parametrize("template", ["{root}/../elsewhere.jsonl", "{root}/sub/../ok.jsonl", "ok.jsonl", "file:ok.jsonl"])
def test_relative_paths_and_dotdot_are_refused(root: Path, tmp_path: Path, template: str) -> None:
    (root / "sub").mkdir()
    (root / "ok.jsonl").write_bytes(jsonl_bytes(ROWS))
    (tmp_path / "elsewhere.jsonl").write_bytes(jsonl_bytes(ROWS))
    with pytest.raises(PathOutsideRoots, match="absolute"):
        load(template.format(root=root), root)


def test_symlink_out_of_root_is_refused_and_inside_is_followed(root: Path, tmp_path: Path) -> None:
    target = tmp_path / "secret.jsonl"
    target.write_bytes(jsonl_bytes(ROWS))
    (root / "link.jsonl").symlink_to(target)
    with pytest.raises(PathOutsideRoots, match=r"link\.jsonl") as info:  # the link's target is not told
        load(str(root / "link.jsonl"), root)
    assert "secret" not in info.value.detail
    (root / "real.jsonl").write_bytes(jsonl_bytes(ROWS))
    (root / "alias.jsonl").symlink_to(root / "real.jsonl")
    assert load(str(root / "alias.jsonl"), root) == ROWS


def test_missing_file_and_directory_are_refused_like_a_file_outside(root: Path) -> None:
    with pytest.raises(PathOutsideRoots, match="missing, not a file") as missing:
        load(str(root / "nope.jsonl"), root)
    (root / "dir.jsonl").mkdir()
    with pytest.raises(PathOutsideRoots, match="missing, not a file") as folder:
        load(str(root / "dir.jsonl"), root)
    assert missing.value.detail.replace("nope", "dir") == folder.value.detail


def test_file_uri_with_remote_host_is_refused(root: Path) -> None:
    with pytest.raises(DatasetSourceInvalid, match="only local files"):
        load(f"file://fileserver{root}/a.jsonl", root)


def test_broken_jsonl_line_is_named(root: Path) -> None:
    (root / "d.jsonl").write_text('{"a": 1}\n\n{"a": 2\n')
    with pytest.raises(DatasetSourceInvalid, match="line 3 is not valid JSON"):
        load(str(root / "d.jsonl"), root)


@pytest.mark.parametrize("content", ['{"a": 1}\n[1, 2]\n', '{"a": 1}\n"text"\n'])
def test_non_object_row_is_named_by_index(root: Path, content: str) -> None:
    (root / "d.jsonl").write_text(content)
    with pytest.raises(DatasetSourceInvalid, match="row 1 is a"):
        load(str(root / "d.jsonl"), root)


@pytest.mark.parametrize("uri", ["https://mywebsite.com/mydata.jsonl", "http://x/y.csv", "lsfs://mydata.jsonl", "s3://b/k.parquet"])
def test_unsupported_schemes(root: Path, uri: str) -> None:
    with pytest.raises(DatasetSourceInvalid, match="is not supported by this server"):
        load(uri, root)


def test_max_rows(root: Path) -> None:
    (root / "d.jsonl").write_bytes(jsonl_bytes(ROWS))
    assert load(str(root / "d.jsonl"), root, max_rows=2) == ROWS
    with pytest.raises(DatasetSourceInvalid, match="limit of 1"):
        load(str(root / "d.jsonl"), root, max_rows=1)


def test_binary_parquet_cell_that_is_not_text_is_refused(root: Path) -> None:
    pq.write_table(pa.table({"blob": pa.array([b"ok", b"\xff\xfe"])}), root / "d.parquet")
    with pytest.raises(DatasetSourceInvalid, match="row 1 holds binary"):
        load(str(root / "d.parquet"), root)


# --- Hugging Face cache ---------------------------------------------------------------------------------------


def test_huggingface_not_cached_is_refused_without_downloading(root: Path, tmp_path: Path) -> None:
    before = os.environ.get("HF_HUB_OFFLINE")
    with pytest.raises(DatasetSourceInvalid, match=r"not in the local cache.*does not download"):
        load("huggingface://llamastack/simpleqa?split=train", root, hf_cache=tmp_path / "empty")
    assert os.environ.get("HF_HUB_OFFLINE") == before


def test_huggingface_bad_repo_id(root: Path) -> None:
    with pytest.raises(DatasetSourceInvalid, match="names no dataset"):
        load("huggingface://../etc?split=train", root)


@pytest.mark.parametrize(("cache", "given"), [("cache", "cache"), ("hf_home/datasets", "hf_home/hub")])
def test_huggingface_cached_dataset_is_read(root: Path, tmp_path: Path, cache: str, given: str) -> None:
    """``given`` is what the caller passes: a datasets cache, or the hub cache whose sibling holds the splits."""
    from datasets.packaged_modules.json.json import Json

    (tmp_path / "src.jsonl").write_bytes(jsonl_bytes(ROWS))
    source = {"train": str(tmp_path / "src.jsonl")}
    builder = Json(cache_dir=str(tmp_path / "build"), data_files=source, dataset_name="simpleqa", hash="0" * 16)
    builder.download_and_prepare()
    # Lay the prepared split out as load_dataset("llamastack/simpleqa") leaves it in the datasets cache.
    (tmp_path / cache / "llamastack___simpleqa").mkdir(parents=True)
    prepared = glob.glob(str(tmp_path / "build" / "simpleqa" / "default-*"))[0]
    shutil.move(prepared, tmp_path / cache / "llamastack___simpleqa" / "default")
    assert load("huggingface://llamastack/simpleqa?split=train", root, hf_cache=tmp_path / given) == ROWS
    with pytest.raises(DatasetSourceInvalid, match="limit of 1"):
        load("huggingface://llamastack/simpleqa", root, hf_cache=tmp_path / given, max_rows=1)
    with pytest.raises(DatasetSourceInvalid, match=f"split=test.*{cache}"):
        load("huggingface://llamastack/simpleqa?split=test", root, hf_cache=tmp_path / given)


SIMPLEQA = [{"input_query": f"Question {i}?", "expected_answer": f"Answer {i}"} for i in range(12)]


@pytest.mark.parametrize("uri", [
    "huggingface://datasets/llamastack/simpleqa?split=train",  # Llama Stack's docs, tests and distributions
    "huggingface://datasets/llamastack/simpleqa/?split=train",
    "huggingface://llamastack/simpleqa?split=train",  # this server's first form, still read
])
def test_huggingface_uri_forms_name_the_same_repo(root: Path, tmp_path: Path, uri: str) -> None:
    from tests.hub_standins import cache_dataset

    cache_dataset(tmp_path / "hf" / "datasets", "llamastack/simpleqa", SIMPLEQA)
    assert load(uri, root, hf_cache=tmp_path / "hf" / "hub") == SIMPLEQA


def test_huggingface_split_slice_is_read(root: Path, tmp_path: Path) -> None:
    """``split=train[:20]``, as Llama Stack's DPO test asks: load_dataset's slice syntax, from the cache."""
    from tests.hub_standins import cache_dataset

    cache_dataset(tmp_path / "hf" / "datasets", "trl-internal-testing/hh-rlhf-helpful-base-trl-style", SIMPLEQA)
    uri = "huggingface://datasets/trl-internal-testing/hh-rlhf-helpful-base-trl-style?split=train[:5]"
    assert load(uri, root, hf_cache=tmp_path / "hf" / "hub") == SIMPLEQA[:5]


@pytest.mark.parametrize("uri", ["huggingface://datasets/", "huggingface://datasets/../etc", "huggingface://"])
def test_huggingface_datasets_prefix_alone_names_no_dataset(root: Path, uri: str) -> None:
    with pytest.raises(DatasetSourceInvalid, match=r"names no dataset.*huggingface://datasets/<owner>/<name>"):
        load(uri, root)


def test_module_import_does_not_load_datasets_or_pyarrow() -> None:
    code = "import sys, posttrain.services.dataset_sources as m; print([n for n in ('datasets', 'pyarrow') if n in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --- validate_rows --------------------------------------------------------------------------------------------


def test_validate_rows_accepts_json_objects() -> None:
    assert validate_rows(ROWS) == ROWS
    assert validate_rows([]) == []


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        ({"messages": CHAT}, "must be a list"),
        ([{"a": 1}, {"a": 2}, "x"], "row 2 is a str"),
        ([{"a": 1}, {1: "b"}], "row 1 has a non-string key"),
        ([{"a": [1, {"b": float("nan")}]}], "row 0 holds nan at '/a/1/b'"),
        ([{"a": {1, 2}}], "row 0 holds a set"),
    ],
)
def test_validate_rows_names_first_bad_index(rows: object, match: str) -> None:
    with pytest.raises(DatasetSourceInvalid, match=match):
        validate_rows(rows)


def test_validate_rows_deep_nesting_and_max_rows() -> None:
    deep: object = "leaf"
    for _ in range(50_000):
        deep = [deep]
    assert validate_rows([{"x": deep}]) == [{"x": deep}]
    with pytest.raises(DatasetSourceInvalid, match="limit of 1"):
        validate_rows([{}, {}], max_rows=1)


# --- properties -----------------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
json_rows = st.lists(st.dictionaries(st.text(max_size=8), json_values, max_size=5), max_size=6)
# Parquet needs one schema for every row: fixed columns, nested list-of-struct like a chat column.
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system"]), "content": st.text()})
parquet_rows = st.lists(
    st.fixed_dictionaries(
        {
            "id": st.integers(-(2**63), 2**63 - 1),
            "text": st.text(),
            "score": st.floats(allow_nan=False, allow_infinity=False),
            "tags": st.lists(st.text(max_size=5), max_size=3),
            "messages": st.lists(message, min_size=1, max_size=3),
        }
    ),
    min_size=1,
    max_size=6,
)
quick = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@quick
@given(rows=json_rows, ensure_ascii=st.booleans())
def test_jsonl_and_json_round_trip(root: Path, rows: list[dict], ensure_ascii: bool) -> None:
    (root / "p.jsonl").write_bytes(jsonl_bytes(rows, ensure_ascii=ensure_ascii))
    (root / "p.json").write_text(json.dumps(rows, ensure_ascii=ensure_ascii), encoding="utf-8")
    assert load(str(root / "p.jsonl"), root) == rows
    assert load((root / "p.json").as_uri(), root) == rows
    assert load(data_uri(jsonl_bytes(rows, ensure_ascii=ensure_ascii), "application/jsonl"), root) == rows
    assert load(data_uri(json.dumps(rows).encode(), "application/octet-stream"), root) == rows


@quick
@given(rows=parquet_rows)
def test_parquet_round_trip(root: Path, rows: list[dict]) -> None:
    (root / "p.parquet").write_bytes(parquet_bytes(rows))
    assert load(str(root / "p.parquet"), root) == rows
    assert load(data_uri(parquet_bytes(rows), "application/octet-stream"), root) == rows


anything = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text() | st.binary(max_size=4),
    lambda children: st.lists(children, max_size=3)
    | st.tuples(children)
    | st.dictionaries(st.text(max_size=4) | st.integers(), children, max_size=3)
    | st.frozensets(st.integers(), max_size=2),
    max_leaves=10,
)


@settings(max_examples=50, deadline=None)
@given(value=anything | st.lists(anything, max_size=4) | st.lists(st.dictionaries(st.text(max_size=4), anything), max_size=4))
def test_validate_rows_only_raises_dataset_source_invalid(value: object) -> None:
    try:
        rows = validate_rows(value)
    except DatasetSourceInvalid:
        return
    text = json.dumps(rows, allow_nan=False)
    assert json.loads(text) == rows
    assert not any(isinstance(x, float) and math.isnan(x) for r in rows for x in r.values())


def test_jsonl_string_holding_unicode_line_separators(root: Path) -> None:
    rows = [{"text": "a\u2028b\u2029c\x85d\x1ce"}, {"text": "next"}]
    (root / "d.jsonl").write_bytes(jsonl_bytes(rows, ensure_ascii=False))
    assert load(str(root / "d.jsonl"), root) == rows


def test_symlink_loop_and_nul_byte_are_refused_cleanly(root: Path) -> None:
    (root / "loop.jsonl").symlink_to(root / "loop.jsonl")
    with pytest.raises(PathOutsideRoots):
        load(str(root / "loop.jsonl"), root)
    with pytest.raises(PathOutsideRoots):
        load(f"{root}/a\x00.jsonl", root)


def test_huggingface_offline_switch_is_restored(root: Path, tmp_path: Path) -> None:
    import datasets
    import huggingface_hub.constants

    before = (datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE, os.environ.get("HF_DATASETS_OFFLINE"))
    with pytest.raises(DatasetSourceInvalid):
        load("huggingface://owner/nothing", root, hf_cache=tmp_path)
    after = (datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE, os.environ.get("HF_DATASETS_OFFLINE"))
    assert after == before


uri_prefixes = st.sampled_from(["", "/", "file://", "file:", "file://localhost/", "data:", "data:;base64,", "lsfs://", "x:"])


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prefix=uri_prefixes, rest=st.text(max_size=40))
def test_any_uri_fails_only_with_service_errors(root: Path, prefix: str, rest: str) -> None:
    uri = prefix + rest
    if uri.lower().startswith("huggingface:"):
        return
    try:
        rows = load(uri, root)
    except (DatasetSourceInvalid, PathOutsideRoots):
        return
    assert all(isinstance(r, dict) for r in rows)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mime=st.sampled_from(["application/octet-stream", "text/csv", "application/json", "application/jsonl", "parquet"]),
       payload=st.binary(max_size=64) | st.just(b"PAR1") | st.text(max_size=40).map(str.encode))
def test_any_data_payload_fails_only_with_dataset_source_invalid(root: Path, mime: str, payload: bytes) -> None:
    try:
        rows = load(data_uri(payload, mime), root)
    except DatasetSourceInvalid:
        return
    json.dumps(rows, allow_nan=False)
