#!/usr/bin/env python3
"""Drive a posttrain server with an official ``llama-stack-client`` release.

Standalone on purpose: it imports only ``llama_stack_client`` and the standard
library, and runs inside one of the per-version venvs that
``scripts/setup-client-venvs`` creates under ``.venv-clients/<version>/``::

    .venv-clients/0.6.1/bin/python tests/clients/driver.py \
        --base-url http://127.0.0.1:8321 --model /path/to/tiny-model --scenario lora

Scenarios: ``lora``, ``cancel``, ``errors``, ``models`` (see the functions below). On success
the last line on stdout is one JSON object ``{"ok": true, "version": ..., ...}``;
on failure the traceback goes to stderr, a ``{"ok": false, ...}`` line to stdout,
and the exit status is 1.

Only the public client API is used. Where client generations differ (see
docs/client-compat.md) the small helpers right below branch on
``llama_stack_client.__version__`` (which namespace) and on the method
signatures (which arguments a method takes):

* 0.2.x: ``client.datasets`` / ``client.post_training`` at ``/v1/...``; job
  status/artifacts/cancel take ``job_uuid=``; ``appendrows`` is absent in
  0.2.12 (and 0.2.13), present in 0.2.23.
* 0.5.x, 0.6.x: ``client.beta.datasets`` at ``/v1beta/...`` and
  ``client.alpha.post_training`` at ``/v1alpha/...``; job
  status/artifacts/cancel take *no* ``job_uuid`` argument, so it is passed with
  the documented ``extra_query=`` (GET) / ``extra_body=`` (POST cancel);
  ``appendrows`` requires ``body_dataset_id=`` besides the path id.
"""

from __future__ import annotations

import argparse
import base64
import inspect
import json
import math
import re
import sys
import time
import traceback
import uuid
import warnings

import llama_stack_client
from llama_stack_client import LlamaStackClient

# 0.5+ marks datasets.register/unregister as deprecated (typing_extensions.deprecated).
warnings.simplefilter("ignore", DeprecationWarning)

VERSION: str = llama_stack_client.__version__


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


V = _version_tuple(VERSION)
LEGACY = V < (0, 3, 0)  # the /v1 generation: client.post_training at /v1/post-training/...


# --------------------------------------------------------------------------
# Version helpers (checked against 0.2.12, 0.2.13, 0.2.23, 0.3.0, 0.4.0, 0.5.4, 0.6.1)
# --------------------------------------------------------------------------


def datasets_api(client):
    # <= 0.3.x: client.datasets (/v1 in 0.2.x, /v1beta in 0.3.x); >= 0.4: client.beta.datasets (/v1beta)
    return client.datasets if V < (0, 4, 0) else client.beta.datasets


def post_training_api(client):
    # 0.2.x: client.post_training (/v1); >= 0.3: client.alpha.post_training (/v1alpha)
    return client.post_training if LEGACY else client.alpha.post_training


def _takes(method, name: str) -> bool:
    return name in inspect.signature(method).parameters


def has_append_rows(client) -> bool:
    # Absent in 0.2.12/0.2.13, present in 0.2.23 and later.
    return hasattr(datasets_api(client), "appendrows")


def append_rows(client, dataset_id: str, rows: list[dict]) -> None:
    api = datasets_api(client)
    if _takes(api.appendrows, "body_dataset_id"):
        # 0.5+: path id plus a body id (sent on the wire as "dataset_id").
        api.appendrows(dataset_id, body_dataset_id=dataset_id, rows=rows)
    else:
        api.appendrows(dataset_id, rows=rows)


def _job_call(client, name: str, job_uuid: str, *, in_body: bool = False):
    method = getattr(post_training_api(client).job, name)
    if _takes(method, "job_uuid"):  # <= 0.4.x
        return method(job_uuid=job_uuid)
    # 0.5+ methods take no job_uuid at all: pass it the documented way, with
    # extra_query (GET ...?job_uuid=) or extra_body (POST {"job_uuid": ...}).
    if in_body:
        return method(extra_body={"job_uuid": job_uuid})
    return method(extra_query={"job_uuid": job_uuid})


def job_status(client, job_uuid: str):
    return _job_call(client, "status", job_uuid)


def job_artifacts(client, job_uuid: str):
    return _job_call(client, "artifacts", job_uuid)


def job_cancel(client, job_uuid: str) -> None:
    _job_call(client, "cancel", job_uuid, in_body=True)


def job_list_uuids(client) -> list[str]:
    # 0.2.x declares List[Data] but casts to DataWrapper[Data], so the items
    # may come back as plain dicts; later versions return PostTrainingJob models.
    return [field(item, "job_uuid") for item in post_training_api(client).job.list()]


def field(obj, name: str):
    """Read ``name`` from a response model or a plain dict (0.2.x leaves
    checkpoints as ``List[object]``, i.e. dicts). Missing -> AssertionError."""
    if isinstance(obj, dict):
        assert name in obj, f"response object lacks {name!r}: {obj!r}"
        return obj[name]
    try:
        return getattr(obj, name)
    except AttributeError:
        raise AssertionError(f"response object lacks {name!r}: {obj!r}") from None


def opt_field(obj, name: str):
    if isinstance(obj, dict):
        return obj.get(name)
    return getattr(obj, name, None)


# --------------------------------------------------------------------------
# Data and configs
# --------------------------------------------------------------------------

WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
         "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
         "eighteen", "nineteen", "twenty"]


def toy_rows(n: int, offset: int = 0) -> list[dict]:
    """Toy instruct task: spell a number in words."""
    return [
        {"input_query": f"Write the number {i + 1} in words.", "expected_answer": WORDS[i % len(WORDS)]}
        for i in range(offset, offset + n)
    ]


def jsonl_data_uri(rows: list[dict]) -> str:
    payload = "".join(json.dumps(r) + "\n" for r in rows).encode()
    return "data:application/jsonl;base64," + base64.b64encode(payload).decode()


def lora_config() -> dict:
    return {
        "type": "LoRA",
        "lora_attn_modules": ["q_proj", "v_proj"],
        "apply_lora_to_mlp": False,
        "apply_lora_to_output": False,
        "rank": 4,
        "alpha": 8,
    }


def training_config(dataset_id: str, n_epochs: int, max_steps_per_epoch: int) -> dict:
    return {
        "n_epochs": n_epochs,
        "max_steps_per_epoch": max_steps_per_epoch,
        "gradient_accumulation_steps": 1,
        "max_validation_steps": 1,
        "data_config": {
            "dataset_id": dataset_id,
            "batch_size": 4,
            "shuffle": True,
            "data_format": "instruct",
        },
        "optimizer_config": {
            "optimizer_type": "adamw",
            "lr": 1e-3,
            "weight_decay": 0.0,
            "num_warmup_steps": 0,
        },
        "dtype": "fp32",
    }


def new_id(prefix: str) -> str:
    return f"{prefix}-{VERSION.replace('.', '_')}-{uuid.uuid4().hex[:10]}"


def register_rows(client, dataset_id: str, rows: list[dict]):
    return datasets_api(client).register(
        purpose="post-training/messages",
        source={"type": "rows", "rows": rows},
        dataset_id=dataset_id,
        metadata={"created_by": "tests/clients/driver.py", "client_version": VERSION},
    )


def submit_sft(client, model: str, job_uuid: str, dataset_id: str, n_epochs: int, max_steps_per_epoch: int):
    return post_training_api(client).supervised_fine_tune(
        job_uuid=job_uuid,
        model=model,
        algorithm_config=lora_config(),
        training_config=training_config(dataset_id, n_epochs, max_steps_per_epoch),
        hyperparam_search_config={},
        logger_config={},
    )


def wait_for(client, job_uuid: str, wanted: set[str], timeout_s: float, fail_on: set[str]) -> tuple[object, list[str]]:
    """Poll job status until it is in ``wanted``; returns (status, seen states)."""
    deadline = time.monotonic() + timeout_s
    seen: list[str] = []
    while True:
        st = job_status(client, job_uuid)
        assert field(st, "job_uuid") == job_uuid, st
        s = field(st, "status")
        if not seen or seen[-1] != s:
            seen.append(s)
        if s in wanted:
            return st, seen
        if s in fail_on:
            raise AssertionError(f"job {job_uuid} reached {s!r} while waiting for {sorted(wanted)}; states {seen}")
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_uuid} not in {sorted(wanted)} after {timeout_s}s; states {seen}")
        time.sleep(0.5)


def expect_status_error(exc_type, code: int, fn, what: str):
    try:
        fn()
    except exc_type as e:
        assert getattr(e, "status_code", code) == code, f"{what}: status {e.status_code}, want {code}"  # noqa: PT017 - no pytest here
        return e
    except llama_stack_client.APIStatusError as e:
        raise AssertionError(f"{what}: got HTTP {e.status_code} ({type(e).__name__}), want {code}: {e}") from e
    raise AssertionError(f"{what}: no error raised, want HTTP {code}")


def check_checkpoint(cp, job_uuid: str) -> dict:
    for name in ("identifier", "created_at", "epoch", "post_training_job_id", "path"):
        field(cp, name)
    assert field(cp, "post_training_job_id") == job_uuid, cp
    m = field(cp, "training_metrics")
    assert m is not None, f"checkpoint without training_metrics: {cp!r}"
    out = {}
    for name in ("epoch", "train_loss", "validation_loss", "perplexity"):
        val = field(m, name)
        assert isinstance(val, (int, float)) and not isinstance(val, bool), f"training_metrics.{name}={val!r}"
        assert math.isfinite(val), f"training_metrics.{name}={val!r}"
        out[name] = val
    return out


# --------------------------------------------------------------------------
# Scenarios
# --------------------------------------------------------------------------


def scenario_lora(client, args) -> dict:
    ds = datasets_api(client)
    rows = toy_rows(16)
    dataset_id = new_id("lsc-lora")
    reg = register_rows(client, dataset_id, rows)
    assert field(reg, "identifier") == dataset_id, reg
    assert field(reg, "purpose") == "post-training/messages", reg

    # Second dataset from a data: URI holding JSONL.
    uri_id = new_id("lsc-uri")
    reg2 = ds.register(
        purpose="post-training/messages",
        source={"type": "uri", "uri": jsonl_data_uri(toy_rows(6, offset=4))},
        dataset_id=uri_id,
    )
    assert field(reg2, "identifier") == uri_id, reg2
    page = ds.iterrows(uri_id, start_index=0, limit=10)
    assert len(page.data) == 6 and page.has_more is False, page
    assert page.data[0]["input_query"] == toy_rows(1, offset=4)[0]["input_query"], page.data[0]

    listed = [field(d, "identifier") for d in ds.list()]
    assert dataset_id in listed and uri_id in listed, listed

    got = ds.retrieve(dataset_id)
    assert field(got, "identifier") == dataset_id, got
    assert field(got, "purpose") == "post-training/messages", got
    assert field(field(got, "source"), "type") == "rows", got

    page = ds.iterrows(dataset_id, start_index=0, limit=5)
    assert len(page.data) == 5 and page.has_more is True, page
    assert page.data == rows[:5], page.data
    page = ds.iterrows(dataset_id, start_index=12, limit=10)
    assert len(page.data) == 4 and page.has_more is False, page
    assert page.data == rows[12:], page.data

    appended = 0
    if has_append_rows(client):
        extra = toy_rows(4, offset=16)
        append_rows(client, dataset_id, extra)
        page = ds.iterrows(dataset_id, start_index=16, limit=10)
        assert page.data == extra and page.has_more is False, page
        appended = len(extra)

    job_uuid = str(uuid.uuid4())
    sub = submit_sft(client, args.model, job_uuid, dataset_id, n_epochs=2, max_steps_per_epoch=2)
    assert field(sub, "job_uuid") == job_uuid, sub
    st, seen = wait_for(client, job_uuid, {"completed"}, args.job_timeout, fail_on={"failed", "cancelled"})

    cps = field(st, "checkpoints")
    assert len(cps) == 2, f"want 2 checkpoints (one per epoch), got {len(cps)}: {cps!r}"
    metrics = [check_checkpoint(cp, job_uuid) for cp in cps]

    art = job_artifacts(client, job_uuid)
    assert field(art, "job_uuid") == job_uuid, art
    art_cps = field(art, "checkpoints")
    assert len(art_cps) == 2, art
    for cp in art_cps:
        check_checkpoint(cp, job_uuid)

    uuids = job_list_uuids(client)
    assert job_uuid in uuids, uuids

    ds.unregister(uri_id)
    listed = [field(d, "identifier") for d in ds.list()]
    assert uri_id not in listed and dataset_id in listed, listed

    return {
        "dataset_id": dataset_id,
        "appended_rows": appended,
        "job_uuid": job_uuid,
        "states_seen": seen,
        "checkpoints": len(cps),
        "metrics": metrics,
    }


def scenario_cancel(client, args) -> dict:
    dataset_id = new_id("lsc-cancel")
    register_rows(client, dataset_id, toy_rows(16))
    job_uuid = str(uuid.uuid4())
    submit_sft(client, args.model, job_uuid, dataset_id, n_epochs=50, max_steps_per_epoch=50)
    _, seen = wait_for(client, job_uuid, {"in_progress"}, args.job_timeout, fail_on={"completed", "failed", "cancelled"})
    t0 = time.monotonic()
    job_cancel(client, job_uuid)
    _, seen2 = wait_for(client, job_uuid, {"cancelled"}, 60, fail_on={"completed", "failed"})
    cancel_s = time.monotonic() - t0
    time.sleep(3)
    s = field(job_status(client, job_uuid), "status")
    assert s == "cancelled", f"status changed to {s!r} after cancellation"
    assert job_uuid in job_list_uuids(client)
    states = seen + [x for x in seen2 if x != seen[-1]]
    return {"job_uuid": job_uuid, "states_seen": states, "cancel_seconds": round(cancel_s, 2)}


def scenario_errors(client, args) -> dict:
    ds = datasets_api(client)
    # 404: unknown job
    unknown = str(uuid.uuid4())
    expect_status_error(llama_stack_client.NotFoundError, 404, lambda: job_status(client, unknown),
                        "status of unknown job")
    expect_status_error(llama_stack_client.NotFoundError, 404, lambda: ds.retrieve(new_id("lsc-missing")),
                        "retrieve of unknown dataset")

    # 400: bad register bodies (the client does not validate; the server must)
    expect_status_error(
        llama_stack_client.BadRequestError, 400,
        lambda: ds.register(purpose="not/a-purpose", source={"type": "rows", "rows": toy_rows(2)},
                            dataset_id=new_id("lsc-bad")),
        "register with an unknown purpose")
    expect_status_error(
        llama_stack_client.BadRequestError, 400,
        lambda: ds.register(purpose="post-training/messages", source={"type": "uri"}, dataset_id=new_id("lsc-bad")),
        "register with a uri source lacking uri")

    # 409: same job_uuid twice
    dataset_id = new_id("lsc-errors")
    register_rows(client, dataset_id, toy_rows(16))
    job_uuid = str(uuid.uuid4())
    submit_sft(client, args.model, job_uuid, dataset_id, n_epochs=1, max_steps_per_epoch=1)
    t0 = time.monotonic()
    expect_status_error(
        llama_stack_client.ConflictError, 409,
        lambda: submit_sft(client, args.model, job_uuid, dataset_id, n_epochs=1, max_steps_per_epoch=1),
        "second submission with the same job_uuid")
    conflict_s = time.monotonic() - t0
    # Do not leave the tiny job behind for later scenarios (best effort).
    try:
        wait_for(client, job_uuid, {"completed", "failed", "cancelled"}, args.job_timeout, fail_on=set())
    except AssertionError:
        job_cancel(client, job_uuid)
    return {"job_uuid": job_uuid, "conflict_seconds": round(conflict_s, 2)}


def scenario_models(client, args) -> dict:
    """``models.list()`` parses the server's list (OpenAI's shape with the Llama Stack fields) and
    ``models.retrieve()`` each of a base and a trained checkpoint (``--trained-model``)."""
    listed = list(client.models.list())
    # 0.2.x parse Model (identifier, model_type, provider_id, type); 0.5+ OpenAI's (id, owned_by, created).
    ids = [field(m, "identifier") if LEGACY else field(m, "id") for m in listed]
    base = args.model.rstrip("/").rsplit("/", 1)[-1]
    assert base in ids, ids
    for m in listed:
        if LEGACY:
            assert field(m, "type") == "model" and field(m, "api_model_type") == "llm", m
            assert field(m, "provider_id") == "posttrain", m
        else:
            assert isinstance(field(m, "created"), int) and field(m, "owned_by"), m
    retrieved = {}
    for wanted in (base, args.trained_model):
        if wanted is None:
            continue
        assert wanted in ids, (wanted, ids)
        got = client.models.retrieve(wanted)
        assert field(got, "identifier") == wanted and field(got, "provider_id") == "posttrain", got
        retrieved[wanted] = opt_field(got, "provider_resource_id")
    expect_status_error(llama_stack_client.NotFoundError, 404,
                        lambda: client.models.retrieve("no-such-model"), "retrieve an unknown model")
    return {"models": ids, "retrieved": sorted(retrieved)}


SCENARIOS = {"lora": scenario_lora, "cancel": scenario_cancel, "errors": scenario_errors, "models": scenario_models}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--model", required=True, help="model path/id sent as supervised_fine_tune(model=...)")
    ap.add_argument("--scenario", required=True, choices=sorted(SCENARIOS))
    ap.add_argument("--trained-model", default=None, help="a fine-tuned model id the models scenario retrieves")
    ap.add_argument("--job-timeout", type=float, default=180.0, help="seconds to wait for a job state")
    ap.add_argument("--max-retries", type=int, default=None,
                    help="client max_retries (default: the client's own default, 2)")
    args = ap.parse_args(argv)

    kwargs = {"base_url": args.base_url}
    if args.max_retries is not None:
        kwargs["max_retries"] = args.max_retries
    t0 = time.monotonic()
    try:
        client = LlamaStackClient(**kwargs)
        details = SCENARIOS[args.scenario](client, args)
    except BaseException as e:  # noqa: BLE001 - report everything, exit 1
        traceback.print_exc()
        print(json.dumps({"ok": False, "version": VERSION, "scenario": args.scenario,
                          "error": f"{type(e).__name__}: {e}"[:2000]}), flush=True)
        return 1
    print(json.dumps({"ok": True, "version": VERSION, "scenario": args.scenario,
                      "elapsed_s": round(time.monotonic() - t0, 2), **details}, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
