"""The serving worker against plain transformers ``generate()``, one request at a time, same model and adapter.

For 1, 8 and 32 concurrent streams (each sending ``--requests`` requests one after another), it
measures time to first token (p50/p99, from when the stream sent the request) and aggregate output
tokens a second, for the worker (through ServingClient, a real worker process) and for the
baseline (the same requests queued and run one by one with ``model.generate`` in this process).
Then mixed-adapter batches (half the streams on adapter A, half on B) against one adapter, in
alternating warm passes (the medians of ``ROUNDS`` of each).
Ratios are against the baseline measured in the same run.

Run: ``.venv/bin/python bench/serve.py --quick`` (a tiny model, a smoke run) or
``.venv/bin/python bench/serve.py --model PATH [--adapter PATH]`` on a quiet machine; with
``--engine vllm --serve-python .venv-vllm/bin/python`` the worker runs vLLM (``scripts/setup-vllm-venv``).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from contextlib import aclosing
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from posttrain.domain.serving import GenerationRequest, SamplingParams, ServedModel, TokenEvent
from posttrain.services.serving import ServingClient
from posttrain.settings import Settings

PROMPTS = ["The cat sees", "Tell me about the blue sea.", "Who has a red apple?", "One, two, three,",
           "The teacher writes a short story about", "Where is the brown box?", "A bird finds", "Hello!"]


#: Alternating single- and mixed-adapter passes for their comparison.
ROUNDS = 3


def percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def make_model(folder: Path, quick: bool) -> Path:
    from posttrain.trainer.tiny_model import create_tiny_model

    if quick:
        return create_tiny_model(folder / "model")
    return create_tiny_model(folder / "model", hidden_size=512, num_layers=8, num_heads=8, intermediate_size=1536,
                             max_position_embeddings=2048)


def make_adapter(base: Path, folder: Path, seed: int) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                      init_lora_weights=False))
    model.save_pretrained(folder)
    return folder


def baseline(base: Path, adapter: Path, streams: int, requests: int, max_tokens: int) -> dict:
    """Every stream's requests queued at t=0 and run one by one with generate() (no batching)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.generation.streamers import BaseStreamer

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()

    class FirstToken(BaseStreamer):
        def __init__(self):
            self.calls, self.first = 0, None

        def put(self, value):
            self.calls += 1
            if self.calls == 2 and self.first is None:  # the first call is the prompt
                self.first = time.perf_counter()

        def end(self):
            pass

    ttfts, tokens = [], 0
    start = time.perf_counter()
    arrival = [start] * streams  # a stream's next request is sent when its previous one finished
    with torch.inference_mode():
        for i in range(streams * requests):
            ids = tokenizer(PROMPTS[i % len(PROMPTS)], return_tensors="pt")
            streamer = FirstToken()
            out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False, streamer=streamer,
                                 pad_token_id=tokenizer.pad_token_id)
            finished = time.perf_counter()
            ttfts.append((streamer.first or finished) - arrival[i % streams])
            arrival[i % streams] = finished
            tokens += out.shape[1] - ids["input_ids"].shape[1]
    wall = time.perf_counter() - start
    return {"ttft": ttfts, "tokens": tokens, "wall": wall}


async def ours(client: ServingClient, models: list[ServedModel], streams: int, requests: int, max_tokens: int) -> dict:
    ttfts: list[float] = []
    tokens = 0

    async def stream(k: int) -> None:
        nonlocal tokens
        for r in range(requests):
            request = GenerationRequest(model=models[k % len(models)], prompt=PROMPTS[(k + r) % len(PROMPTS)],
                                        sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0))
            sent = time.perf_counter()
            first = None
            async with aclosing(client.generate(request)) as events:
                async for event in events:
                    if isinstance(event, TokenEvent):
                        tokens += 1
                        if first is None:
                            first = time.perf_counter()
                            ttfts.append(first - sent)

    await client.stats()  # this event loop's connection to the worker, opened before the clock starts
    start = time.perf_counter()
    await asyncio.gather(*(stream(k) for k in range(streams)))
    return {"ttft": ttfts, "tokens": tokens, "wall": time.perf_counter() - start}


def row(name, result):
    rate = result["tokens"] / result["wall"]
    print(f"{name:<28} {percentile(result['ttft'], 0.5) * 1000:>9.1f} {percentile(result['ttft'], 0.99) * 1000:>9.1f}"
          f" {rate:>10.1f}")
    return rate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, few tokens: a smoke run")
    parser.add_argument("--model", type=Path, help="a base model folder (default: a generated small Llama)")
    parser.add_argument("--adapter", type=Path, help="a LoRA adapter of it (default: a random one)")
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--requests", type=int, default=None, help="requests per stream")
    parser.add_argument("--streams", default="1,8,32")
    parser.add_argument("--threads", type=int, default=None, help="torch threads, for both sides")
    parser.add_argument("--engine", default="transformers", choices=["transformers", "vllm"],
                        help="the worker's engine (vllm: with --serve-python, e.g. .venv-vllm/bin/python)")
    parser.add_argument("--serve-python", type=Path, default=None, help="the worker's interpreter")
    args = parser.parse_args()
    max_tokens = args.max_tokens or (16 if args.quick else 128)
    requests = args.requests or (1 if args.quick else 4)
    streams = [int(s) for s in args.streams.split(",")]

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        folder = Path(tmp)
        base = args.model or make_model(folder, args.quick)
        adapter_a = args.adapter or make_adapter(base, folder / "adapter-a", seed=1)
        adapter_b = make_adapter(base, folder / "adapter-b", seed=2)
        served_a = ServedModel(id="a", base_path=str(base), adapter_path=str(adapter_a), tokenizer_path=str(base),
                               owned_by="system", created=0)
        served_b = ServedModel(id="b", base_path=str(base), adapter_path=str(adapter_b), tokenizer_path=str(base),
                               owned_by="system", created=0)
        client = ServingClient(Settings(home=folder / "home", serve_threads=args.threads, serve_engine=args.engine,
                                        serve_python=args.serve_python, serve_start_timeout_seconds=600))
        try:
            asyncio.run(ours(client, [served_a, served_b], 2, 1, 4))  # start the worker, load base and adapters
            print(f"{'':<28} {'TTFT p50':>9} {'TTFT p99':>9} {'tokens/s':>10}   (ms, ms, output tokens a second)")
            rates = {}
            for n in streams:
                base_rate = row(f"generate() x{n}, one by one", baseline(base, adapter_a, n, requests, max_tokens))
                # One short untimed pass at this width first: the measured pass then starts warm,
                # as the mixed-adapter pass after it does (its first batch of 8 is otherwise slower).
                asyncio.run(ours(client, [served_a], n, 1, 8))
                result = asyncio.run(ours(client, [served_a], n, requests, max_tokens))
                rate = row(f"worker, {n} streams", result)
                rates[n] = (rate, base_rate, percentile(result["ttft"], 0.99))
                print(f"{'':<28} ratio worker/baseline: {rate / base_rate:.2f}x")
            # Mixed against single adapter at one width: alternating warm passes, ROUNDS of each, so
            # neither side is the first (or only) batch of its kind; the medians are compared.
            mixed_n = 8 if 8 in streams else streams[-1]
            asyncio.run(ours(client, [served_a, served_b], mixed_n, 1, 8))
            singles, mixes = [], []
            for _ in range(ROUNDS):
                singles.append(row(f"worker, {mixed_n} streams, A", asyncio.run(
                    ours(client, [served_a], mixed_n, requests, max_tokens))))
                mixes.append(row(f"worker, {mixed_n} streams, A+B", asyncio.run(
                    ours(client, [served_a, served_b], mixed_n, requests, max_tokens))))
            single, mixed = statistics.median(singles), statistics.median(mixes)
            print(f"{'':<28} mixed/single adapter (medians of {ROUNDS}): {mixed / single:.2f}x")
        finally:
            client.close()
    targets = []
    if 8 in rates:
        targets.append(("8 streams >= 3x baseline tokens/s", rates[8][0] >= 3 * rates[8][1]))
    if 1 in rates:
        targets.append(("TTFT p99 < 250 ms at 1 stream", rates[1][2] < 0.25))
    targets.append(("mixed adapters within 20% of one adapter", mixed >= 0.8 * single))
    for name, met in targets:
        print(f"{name}: {'target met' if met else 'target missed'}")
    if args.quick:
        print("(--quick: a smoke run on a tiny model; the figures say nothing about a real one)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
