"""The serving worker, as a real process driven through ServingClient: batching, sampling, stop strings,
logprobs, mixed LoRA adapters on one base, the memory budget's LRU, disconnects and refusals.

Models are tiny (tests/fixtures_tiny.py); two LoRA adapters are made here with peft from deliberately
different random weights, so each changes the base's greedy text in its own way.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import aclosing

import pytest

from posttrain.domain.serving import (
    ErrorEvent,
    FinishedEvent,
    GenerationRequest,
    SamplingParams,
    ServedModel,
    StartedEvent,
    TokenEvent,
)
from posttrain.services.serving import ServingClient
from posttrain.settings import Settings
from tests.fixtures_tiny import build_tiny_gpt2, build_tiny_model

pytestmark = pytest.mark.slow


def make_adapter(base_path, folder, seed, *, rank=8, alpha=64, targets=("q_proj", "v_proj", "o_proj"), dora=False):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_path)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False,
                        use_dora=dora)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    peft_model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    base = build_tiny_model(tmp_path_factory)
    adapters = tmp_path_factory.mktemp("serve-adapters")
    return {"base": str(base),
            "a": str(make_adapter(base, adapters / "a", seed=1)),
            "b": str(make_adapter(base, adapters / "b", seed=2)),
            "gpt2": str(build_tiny_gpt2(tmp_path_factory))}


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    serving = ServingClient(Settings(home=tmp_path_factory.mktemp("serve-home"), serve_threads=1))
    yield serving
    serving.close()


def served(path, adapter=None, tokenizer=None):
    return ServedModel(id=adapter or path, base_path=path, adapter_path=adapter, tokenizer_path=tokenizer or path,
                       owned_by="system", created=0)


def request(model, prompt="The cat", **sampling):
    sampling.setdefault("max_tokens", 6)
    sampling.setdefault("temperature", 0.0)
    messages = sampling.pop("messages", None)
    return GenerationRequest(model=model, sampling=SamplingParams(**sampling), prompt=None if messages else prompt,
                             messages=messages)


async def collect(client, req):
    events = []
    async with aclosing(client.generate(req)) as stream:
        async for event in stream:
            events.append(event)
    return events


def text_of(events, index=0):
    return "".join(e.text for e in events if isinstance(e, TokenEvent) and e.index == index)


def finish_of(events, index=0):
    return [e for e in events if isinstance(e, FinishedEvent) and e.index == index][0]


def run(coro):
    return asyncio.run(coro)


def test_greedy_text_is_the_same_alone_and_in_a_batch(client, models):
    base = served(models["base"])
    alone = run(collect(client, request(base, max_tokens=8)))
    assert isinstance(alone[0], StartedEvent) and alone[0].prompt_tokens > 1

    async def together():
        return await asyncio.gather(collect(client, request(base, max_tokens=8)),
                                    collect(client, request(base, "A dog sees the blue sea and", max_tokens=5)),
                                    collect(client, request(base, "Hello", max_tokens=10, temperature=1.0, seed=3)))

    batched = run(together())[0]
    assert text_of(batched) == text_of(alone) and text_of(alone)
    assert finish_of(batched).completion_tokens == finish_of(alone).completion_tokens


def test_a_seed_gives_the_same_text_whatever_shares_the_batch(client, models):
    base = served(models["base"])
    seeded = request(base, "Who has", max_tokens=8, temperature=1.0, seed=7)
    alone = text_of(run(collect(client, seeded)))

    async def with_companions():
        return await asyncio.gather(collect(client, request(base, "Tell me about the sky", max_tokens=12,
                                                            temperature=1.0, seed=1)),
                                    collect(client, seeded),
                                    collect(client, request(base, "x", max_tokens=3, temperature=0.5, seed=99)))

    assert text_of(run(with_companions())[1]) == alone
    other_seed = request(base, "Who has", max_tokens=8, temperature=1.0, seed=8)
    assert text_of(run(collect(client, other_seed))) != alone


def test_nothing_after_a_stop_string_is_sent(client, models):
    base = served(models["base"])
    full = text_of(run(collect(client, request(base, max_tokens=12))))
    stop = full[len(full) // 2: len(full) // 2 + 2]
    events = run(collect(client, request(base, max_tokens=12, stop=(stop,))))
    assert text_of(events) == full[:full.find(stop)]
    assert finish_of(events).finish_reason == "stop"


def test_max_tokens_ends_with_length_and_n_gives_n_choices(client, models):
    base = served(models["base"])
    events = run(collect(client, request(base, max_tokens=4, temperature=1.0, seed=5, n=2)))
    finished = {e.index: e for e in events if isinstance(e, FinishedEvent)}
    assert set(finished) == {0, 1}
    assert all(f.finish_reason == "length" and f.completion_tokens == 4 for f in finished.values())
    assert [len([e for e in events if isinstance(e, TokenEvent) and e.index == i]) for i in (0, 1)] == [4, 4]
    assert text_of(events, 0) != text_of(events, 1)


def test_logprobs_are_the_models_with_the_chosen_token_on_top_when_greedy(client, models):
    events = run(collect(client, request(served(models["base"]), max_tokens=4, logprobs=True, top_logprobs=3)))
    tokens = [e for e in events if isinstance(e, TokenEvent)]
    assert len(tokens) == 4
    for token in tokens:
        assert token.logprob is not None and token.logprob <= 0
        assert len(token.top_logprobs) == 3
        values = [lp for _, lp in token.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert token.logprob == pytest.approx(values[0])
    plain = run(collect(client, request(served(models["base"]), max_tokens=2)))
    assert all(e.logprob is None and e.top_logprobs is None for e in plain if isinstance(e, TokenEvent))


def test_two_adapters_of_one_base_share_a_batch_each_giving_its_own_text(client, models, long_model):
    base, a, b = served(models["base"]), served(models["base"], models["a"]), served(models["base"], models["b"])
    alone = {name: text_of(run(collect(client, request(m, max_tokens=8)))) for name, m in
             (("base", base), ("a", a), ("b", b))}
    assert len(set(alone.values())) == 3, alone  # the adapters change the text, each its own way
    before = run(client.stats())["mixed_adapter_steps_total"]

    async def together():
        # Another base's long generation holds the worker, so all three wait and start in one prefill.
        async with aclosing(client.generate(request(served(long_model), max_tokens=4000, temperature=1.0,
                                                    seed=4))) as holder:
            assert isinstance(await anext(holder), StartedEvent)
            three = asyncio.gather(*(collect(client, request(m, max_tokens=8)) for m in (a, b, base)))
            for _ in range(500):
                if (await client.stats())["waiting_requests"] == 3:
                    break
                await asyncio.sleep(0.02)
        return await three

    got = run(together())
    assert [text_of(events) for events in got] == [alone["a"], alone["b"], alone["base"]]
    # All three run their 8 tokens: in the same passes from the prefill to the last.
    assert [finish_of(events).finish_reason for events in got] == ["length"] * 3
    stats = run(client.stats())
    assert stats["mixed_adapter_steps_total"] > before  # the worker's own count: one batch mixed them
    assert stats["last_mixed_step"]["adapter_paths"] == sorted([models["a"], models["b"]])
    assert stats["last_mixed_step"]["base_rows"] == 1 and stats["last_mixed_step"]["base_path"] == models["base"]
    bases = {b_["path"]: b_ for b_ in stats["bases"]}
    assert bases[models["base"]]["loads"] == 1
    assert sorted(ad["path"] for ad in stats["adapters"]) == sorted([models["a"], models["b"]])


@pytest.fixture(scope="module")
def long_model(tmp_path_factory):
    """Wider and with room for many tokens, so a generation outlasts its reader by far."""
    from posttrain.trainer.tiny_model import create_tiny_model

    return str(create_tiny_model(tmp_path_factory.mktemp("long-model") / "m", hidden_size=128, num_layers=4,
                                 intermediate_size=256, max_position_embeddings=4096))


def test_a_reader_that_goes_away_frees_its_slot(client, long_model):
    req = request(served(long_model), "The cat", max_tokens=4000, temperature=1.0, seed=11, n=2)
    before = run(client.stats())["cancelled_rows_total"]

    async def read_a_little():
        seen = 0
        async with aclosing(client.generate(req)) as stream:
            async for event in stream:
                seen += isinstance(event, TokenEvent)
                if seen == 4:
                    assert (await client.stats())["active_requests"] == 1
                    break
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            stats = await client.stats()
            if stats["active_requests"] == 0 and stats["active_rows"] == 0:
                return stats
            await asyncio.sleep(0.05)
        return stats

    stats = run(read_a_little())
    assert stats["active_requests"] == 0 and stats["active_rows"] == 0
    assert stats["cancelled_rows_total"] == before + 2  # both rows left early, not at their 4000th token


def test_refusals_come_instead_of_started(client, models):
    gpt2 = served(models["gpt2"])
    no_template = run(collect(client, request(gpt2, messages=({"role": "user", "content": "hi"},))))
    assert len(no_template) == 1 and isinstance(no_template[0], ErrorEvent)
    assert no_template[0].code == "no_chat_template"
    too_long = run(collect(client, request(gpt2, "hello " * 50, max_tokens=250)))
    assert isinstance(too_long[0], ErrorEvent) and too_long[0].code == "prompt_too_long"
    missing = run(collect(client, request(served(models["base"] + "-missing"))))
    assert isinstance(missing[0], ErrorEvent) and missing[0].code == "model_unloadable"
    chat = run(collect(client, request(served(models["base"]), messages=({"role": "user", "content": "hi"},))))
    assert isinstance(chat[0], StartedEvent) and isinstance(chat[-1], FinishedEvent)


def test_the_memory_budget_evicts_the_least_recently_used_base(tmp_path_factory, models):
    import torch
    from transformers import AutoModelForCausalLM

    from posttrain.trainer.tiny_model import create_tiny_model

    other = str(create_tiny_model(tmp_path_factory.mktemp("second-base") / "m", seed=1))
    size = sum(p.numel() * p.element_size() for p in AutoModelForCausalLM.from_pretrained(other).parameters())
    del torch
    serving = ServingClient(Settings(home=tmp_path_factory.mktemp("lru-home"), serve_memory_bytes=int(size * 1.6),
                                     serve_threads=1))
    try:
        first, second = served(models["base"]), served(other)
        run(collect(serving, request(first, max_tokens=2)))
        run(collect(serving, request(second, max_tokens=2)))
        stats = run(serving.stats())
        assert [b["path"] for b in stats["bases"]] == [other]
        assert stats["memory_bytes"] <= stats["memory_budget"]
        events = run(collect(serving, request(first, max_tokens=2)))
        assert isinstance(events[-1], FinishedEvent)
        stats = run(serving.stats())
        assert [(b["path"], b["loads"]) for b in stats["bases"]] == [(models["base"], 2)]
        assert stats["base_loads_total"] == 3
        run(serving.forget(models["base"]))
        assert run(serving.stats())["bases"] == []
    finally:
        serving.close()


def test_an_adapter_is_evicted_before_its_base_and_the_base_serves_on(tmp_path_factory, models):
    from pathlib import Path

    base_bytes = Path(models["base"], "model.safetensors").stat().st_size
    adapter_bytes = Path(models["a"], "adapter_model.safetensors").stat().st_size
    serving = ServingClient(Settings(home=tmp_path_factory.mktemp("lru-adapters"),
                                     serve_memory_bytes=base_bytes + int(adapter_bytes * 1.5), serve_threads=1))
    try:
        a, b = served(models["base"], models["a"]), served(models["base"], models["b"])
        text_a = text_of(run(collect(serving, request(a, max_tokens=6))))
        run(collect(serving, request(b, max_tokens=2)))
        stats = run(serving.stats())
        assert [ad["path"] for ad in stats["adapters"]] == [models["b"]]
        assert [(b_["path"], b_["loads"]) for b_ in stats["bases"]] == [(models["base"], 1)]
        assert text_of(run(collect(serving, request(a, max_tokens=6)))) == text_a  # reloaded, same weights
        run(serving.forget(models["a"]))  # the last adapter: the base runs plain again
        base_text = text_of(run(collect(serving, request(served(models["base"]), max_tokens=6))))
        assert base_text and base_text != text_a
        assert run(serving.stats())["adapters"] == []
    finally:
        serving.close()


def test_a_worker_that_died_is_started_again(tmp_path_factory, models):
    serving = ServingClient(Settings(home=tmp_path_factory.mktemp("restart-home"), serve_threads=1))
    try:
        assert run(serving.stats())["running"] is False  # nothing started before the first request
        run(serving.forget(models["base"]))  # a no-op while no worker runs
        first = run(collect(serving, request(served(models["base"]), max_tokens=3)))
        # The worker's socket, and the folder it lives in, are for this user alone.
        assert serving._socket.stat().st_mode & 0o077 == 0 and serving.folder.stat().st_mode & 0o077 == 0
        serving._process.kill()  # the worker this client started, by its own handle
        serving._process.wait()
        again = run(collect(serving, request(served(models["base"]), max_tokens=3)))
        assert text_of(again) == text_of(first) and serving.starts == 2
    finally:
        serving.close()
    assert not serving.running


def test_a_full_worker_refuses_as_overloaded_and_a_freed_slot_lets_the_waiting_one_start(tmp_path_factory,
                                                                                           long_model):
    serving = ServingClient(Settings(home=tmp_path_factory.mktemp("full-home"), serve_max_batch=1,
                                     serve_max_waiting=1, serve_threads=1))
    long_request = request(served(long_model), max_tokens=4000, temperature=1.0, seed=1)

    async def scenario():
        async with aclosing(serving.generate(long_request)) as first:
            assert isinstance(await anext(first), StartedEvent)
            waiting = asyncio.create_task(collect(serving, request(served(long_model), max_tokens=2)))
            for _ in range(500):  # the worker's own count, polled: it has no event to wait on
                if (await serving.stats())["waiting_requests"] >= 1:
                    break
                await asyncio.sleep(0.02)
            refused = await collect(serving, request(served(long_model), max_tokens=2))
        # The first reader went away: its slot goes to the waiting request, which now runs.
        return refused, await asyncio.wait_for(waiting, 60)

    try:
        refused, waited = run(scenario())
        assert len(refused) == 1 and isinstance(refused[0], ErrorEvent) and refused[0].code == "overloaded"
        assert isinstance(waited[0], StartedEvent) and isinstance(waited[-1], FinishedEvent)
    finally:
        serving.close()


def test_left_padding_changes_nothing_for_a_model_with_learned_positions(client, models, long_model):
    # GPT-2 adds a learned embedding per position: a left-padded row reads the right ones only if its
    # position ids skip the padding.
    gpt2 = served(models["gpt2"])
    short = request(gpt2, "a cat", max_tokens=6, logprobs=True)
    long_ = request(gpt2, "the teacher writes a short story about", max_tokens=6)
    alone = run(collect(client, short))

    async def prefilled_together():
        # Another base's long generation holds the worker, so both requests wait and start in one prefill.
        async with aclosing(client.generate(request(served(long_model), max_tokens=4000, temperature=1.0,
                                                    seed=2))) as holder:
            assert isinstance(await anext(holder), StartedEvent)
            both = asyncio.gather(collect(client, long_), collect(client, short))
            for _ in range(500):
                if (await client.stats())["waiting_requests"] == 2:
                    break
                await asyncio.sleep(0.02)
        return await both

    batched = run(prefilled_together())[1]
    assert text_of(batched) == text_of(alone) and text_of(alone)
    # The same distribution at every step, not just the same top token (a random GPT-2's top token hardly
    # depends on positions).
    logprobs = [[e.logprob for e in events if isinstance(e, TokenEvent)] for events in (batched, alone)]
    assert logprobs[0] == pytest.approx(logprobs[1], abs=1e-4)
