"""The vLLM engine (``POSTTRAIN_SERVE_ENGINE=vllm``), as a real worker process on vLLM's CPU build.

Each answer is checked against the transformers engine's on the same requests: greedy text, seeded
sampling, stop strings, logprobs, two LoRA adapters and the base in one batch (vLLM's own runtime
LoRA), then what only the vLLM side has: one base loaded once for all adapters, refusals of what vLLM
cannot serve, and a reader that goes away aborting its request.

It needs the vLLM venv (``bash scripts/setup-vllm-venv``, which ``scripts/test`` runs): its
interpreter comes in ``POSTTRAIN_TEST_VLLM_PYTHON``. vLLM's CPU attention has no kernel for the
16-wide heads of the usual tiny model, so the model here has two 32-wide heads.
"""

from __future__ import annotations

import asyncio
import os
import time
from contextlib import aclosing
from pathlib import Path

import pytest

from posttrain.domain.serving import ErrorEvent, StartedEvent, TokenEvent
from posttrain.services.serving import ServingClient
from posttrain.settings import Settings
from tests.integration.test_serving_engine import collect, finish_of, make_adapter, request, served, text_of

pytestmark = pytest.mark.slow

VLLM_PYTHON = os.environ.get("POSTTRAIN_TEST_VLLM_PYTHON", "")
if not VLLM_PYTHON:
    pytest.skip("POSTTRAIN_TEST_VLLM_PYTHON is not set (bash scripts/setup-vllm-venv makes the venv; scripts/test "
                "sets it)", allow_module_level=True)

PROMPTS = ("The cat", "Once upon", "apple", "A long way")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from posttrain.trainer.tiny_model import create_tiny_model

    root = tmp_path_factory.mktemp("vllm-models")
    base = create_tiny_model(root / "base", num_heads=2)
    return {"base": str(base), "a": str(make_adapter(base, root / "a", seed=1)),
            "b": str(make_adapter(base, root / "b", seed=2, rank=4, targets=("q_proj", "k_proj", "down_proj"))),
            "dora": str(make_adapter(base, root / "dora", seed=3, dora=True)),
            "narrow": str(create_tiny_model(root / "narrow-heads"))}


def _client(home: Path, **settings) -> ServingClient:
    return ServingClient(Settings(home=home, serve_threads=1, serve_start_timeout_seconds=300, **settings))


@pytest.fixture(scope="module")
def vllm(tmp_path_factory):
    client = _client(tmp_path_factory.mktemp("vllm-home"), serve_engine="vllm", serve_python=Path(VLLM_PYTHON),
                     serve_kv_cache_bytes=128 * 1024**2, serve_max_lora_rank=16)
    yield client
    client.close()


@pytest.fixture(scope="module")
def transformers(tmp_path_factory):
    client = _client(tmp_path_factory.mktemp("transformers-home"), serve_engine="transformers")
    yield client
    client.close()


def both(vllm, transformers, req):
    async def go():
        return await collect(vllm, req), await collect(transformers, req)

    return asyncio.run(go())


def test_the_worker_runs_vllm_and_greedy_text_matches_transformers(vllm, transformers, models):
    for prompt in PROMPTS:
        ours, reference = both(vllm, transformers, request(served(models["base"]), prompt, max_tokens=8))
        assert text_of(ours) == text_of(reference), prompt
        assert finish_of(ours).finish_reason == finish_of(reference).finish_reason == "length"
        assert finish_of(ours).completion_tokens == 8
        assert isinstance(ours[0], StartedEvent) and ours[0].prompt_tokens == reference[0].prompt_tokens
    assert asyncio.run(vllm.stats())["engine"] == "vllm"
    assert asyncio.run(transformers.stats())["engine"] == "transformers"


def test_each_adapter_answers_as_peft_does_and_all_share_one_batch_on_one_base(vllm, models, transformers):
    requests = [request(served(models["base"], adapter), prompt, max_tokens=8)
                for adapter in (None, models["a"], models["b"]) for prompt in PROMPTS[:2]]

    async def together(client):
        return await asyncio.gather(*(collect(client, r) for r in requests))

    ours, reference = asyncio.run(together(vllm)), asyncio.run(together(transformers))
    texts = [text_of(events) for events in ours]
    assert texts == [text_of(events) for events in reference]
    assert len(set(texts[0::2])) == 3, "the base and the two adapters answer alike: the adapters were not applied"
    stats = asyncio.run(vllm.stats())
    assert stats["base_loads_total"] == 1 and [b["path"] for b in stats["bases"]] == [models["base"]]
    assert {a["path"] for a in stats["adapters"]} == {models["a"], models["b"]}
    assert stats["mixed_adapter_steps_total"] > 0
    assert set(stats["last_mixed_step"]["adapter_paths"]) <= {models["a"], models["b"]}


def test_seeds_stop_strings_n_and_logprobs_behave_as_in_the_transformers_engine(vllm, transformers, models):
    base = served(models["base"])
    seeded = request(base, "The cat", max_tokens=10, temperature=1.0, seed=7, n=2)
    first, _ = both(vllm, transformers, seeded)
    again, _ = both(vllm, transformers, seeded)
    assert [text_of(first, i) for i in (0, 1)] == [text_of(again, i) for i in (0, 1)]
    assert text_of(first, 0) != text_of(first, 1), "choice 1 drew the same tokens as choice 0"

    greedy, _ = both(vllm, transformers, request(base, "Once upon", max_tokens=10))
    stop = text_of(greedy)[3:5]
    ours, reference = both(vllm, transformers, request(base, "Once upon", max_tokens=10, stop=(stop,)))
    assert text_of(ours) == text_of(reference) == text_of(greedy)[: text_of(greedy).index(stop)]
    assert finish_of(ours).finish_reason == "stop"

    ours, reference = both(vllm, transformers, request(base, "apple", max_tokens=4, logprobs=True, top_logprobs=3))
    mine = [e for e in ours if isinstance(e, TokenEvent)]
    theirs = [e for e in reference if isinstance(e, TokenEvent)]
    assert [e.token_id for e in mine] == [e.token_id for e in theirs]
    for got, want in zip(mine, theirs, strict=True):
        assert got.logprob == pytest.approx(want.logprob, abs=1e-3)
        assert got.top_logprobs is not None and want.top_logprobs is not None
        assert [text for text, _ in got.top_logprobs] == [text for text, _ in want.top_logprobs]
        assert got.top_logprobs[0][1] == pytest.approx(got.logprob, abs=1e-6), "greedy: the chosen token tops the list"


def test_what_vllm_cannot_serve_is_refused_by_name_and_the_worker_serves_on(vllm, models):
    dora = asyncio.run(collect(vllm, request(served(models["base"], models["dora"]))))
    assert isinstance(dora[0], ErrorEvent) and dora[0].code == "model_unloadable" and "DoRA" in dora[0].message
    narrow = asyncio.run(collect(vllm, request(served(models["narrow"]))))
    assert isinstance(narrow[0], ErrorEvent) and narrow[0].code == "model_unloadable", narrow
    assert "vLLM cannot" in narrow[0].message
    too_long = asyncio.run(collect(vllm, request(served(models["base"]), max_tokens=600)))
    assert isinstance(too_long[0], ErrorEvent) and too_long[0].code == "prompt_too_long"
    fine = asyncio.run(collect(vllm, request(served(models["base"]), max_tokens=3)))
    assert finish_of(fine).completion_tokens == 3


def test_a_reader_that_goes_away_aborts_its_request(vllm, models):
    async def leave_early():
        async with aclosing(vllm.generate(request(served(models["base"]), max_tokens=400, temperature=1.0))) as stream:
            async for event in stream:
                if isinstance(event, TokenEvent):
                    break
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            stats = await vllm.stats()
            if stats["active_requests"] == 0 and stats["active_rows"] == 0:
                return stats
            await asyncio.sleep(0.05)
        return stats

    before = asyncio.run(vllm.stats())["cancelled_rows_total"]
    stats = asyncio.run(leave_early())
    assert stats["active_rows"] == 0 and stats["active_requests"] == 0
    assert stats["cancelled_rows_total"] == before + 1  # it left early, not at its 400th token
