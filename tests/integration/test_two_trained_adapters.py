"""Two LoRA adapters of one base, each trained here on its own mapping, answered in one batch.

A real ``posttrain serve`` trains two LoRA jobs on the tiny model (the same prompts, different
answers), then the official ``openai`` SDK asks both adapters and the base the same prompts at once.
A long generation on another base holds the serving worker meanwhile, so every request waits and
all start in one prefill when it is let go. The worker's own accounting shows the batch mixed both
adapters and the base, and that the base's weights were loaded once for both adapters.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.serving_helpers import submit_mapping, wait_for_mapping, worker_stats

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SDK_PYTHON = ROOT / ".venv-openai" / "3.57.0" / "bin" / "python"  # the newest release of tests/clients

PROMPTS = ("apple", "sea")
#: adapter -> its mapping. One-token answers ("Yes", "no" are single tokens of the tiny tokenizer).
MAPPINGS = {"yes": dict.fromkeys(PROMPTS, "Yes"), "no": dict.fromkeys(PROMPTS, "no")}
#: LoRA on every attention projection and the output layer. The base is random: its last hidden
#: state is mostly the current token's, so an adapter learns what to say after the assistant header
#: (and to stop after it) in a few dozen steps, at a learning rate far above a pretrained model's.
LORA = {"type": "LoRA", "lora_attn_modules": ["q_proj", "k_proj", "v_proj", "output_proj"],
        "apply_lora_to_mlp": False, "apply_lora_to_output": True, "rank": 8, "alpha": 16}
TRAINING = {"repeat": 8, "epochs": 2, "batch_size": 2, "learning_rate": 1e-2}  # 16 steps per job

#: Run in the SDK's own venv: wait for "go" on stdin, then send every chat at once, one thread each.
SDK_SCRIPT = """
import json, sys, threading
from openai import OpenAI
base_url, asks = sys.argv[1], json.loads(sys.argv[2])
client = OpenAI(base_url=base_url + "/v1", api_key="unused-on-an-open-server", max_retries=0, timeout=120)
answers = [None] * len(asks)
go = threading.Barrier(len(asks))
def ask(i, model, prompt):
    go.wait()
    done = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                          temperature=0, max_tokens=8)
    answers[i] = {"model": done.model, "content": done.choices[0].message.content,
                  "finish_reason": done.choices[0].finish_reason}
threads = [threading.Thread(target=ask, args=(i, *pair)) for i, pair in enumerate(asks)]
print("ready", flush=True)
sys.stdin.readline()
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print(json.dumps(answers))
"""


@pytest.fixture(scope="module")
def two_adapters(tmp_path_factory, tiny_model_path):
    """The server, its two LoRA fine-tunes of the tiny model (trained side by side) and the holder base."""
    from posttrain.trainer.tiny_model import create_tiny_model
    from tests.conftest import start_server, stop_server

    home = tmp_path_factory.mktemp("two-adapters")
    # Another base, with room for a generation long enough to hold the worker (model roots: home/models).
    create_tiny_model(home / "models" / "tiny-holder", max_position_embeddings=4096)
    server = start_server(home, tiny_model_path, extra_env={"POSTTRAIN_WORKER_SLOTS": "2"})
    try:
        with httpx.Client(base_url=server.base_url, timeout=60) as http:
            jobs = {name: submit_mapping(http, tiny_model_path, pairs, algorithm_config=LORA, **TRAINING)
                    for name, pairs in MAPPINGS.items()}
            trained = {name: wait_for_mapping(http, job, timeout_s=600) for name, job in jobs.items()}
        yield {"server": server, "home": home, "trained": trained}
    finally:
        stop_server(server)


def test_two_trained_adapters_answer_their_own_mappings_from_one_batch_on_one_base(two_adapters, tiny_model_path):
    if not SDK_PYTHON.exists():
        pytest.skip(f"the openai SDK venv {SDK_PYTHON.parent.parent} is missing (scripts/setup-openai-venvs)")
    server, home, trained = two_adapters["server"], two_adapters["home"], two_adapters["trained"]
    base = tiny_model_path.name
    models = {name: trained[name]["fine_tuned_model"] for name in MAPPINGS}
    adapter_paths = sorted(str(Path(trained[name]["checkpoint_path"]).resolve()) for name in MAPPINGS)
    assert all(Path(path, "adapter_config.json").is_file() for path in adapter_paths), adapter_paths
    asks = [(models[name], prompt) for name in MAPPINGS for prompt in PROMPTS] + [(base, p) for p in PROMPTS]

    sdk = subprocess.Popen([str(SDK_PYTHON), "-c", SDK_SCRIPT, server.base_url, json.dumps(asks)], cwd=ROOT,
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env={k: v for k, v in server.env.items() if not k.startswith(("OPENAI_", "PYTHON"))})
    try:
        assert sdk.stdout is not None and sdk.stdin is not None
        assert sdk.stdout.readline().strip() == "ready", sdk.stderr.read() if sdk.stderr else ""
        # Greedy: the random holder never says its end-of-sequence token, so it runs until let go.
        holder = {"model": "tiny-holder", "prompt": "The cat", "max_tokens": 4000, "temperature": 0, "stream": True}
        with httpx.Client(base_url=server.base_url, timeout=120) as http, \
                http.stream("POST", "/v1/completions", json=holder) as holding:
            assert holding.status_code == 200, holding.read()
            lines = holding.iter_lines()  # kept: a dropped line iterator would close the stream
            for line in lines:
                if '"text"' in line:
                    break  # it is generating
            before = worker_stats(home)
            assert before["mixed_adapter_steps_total"] == 0 and before["active_rows"] == 1, before
            sdk.stdin.write("go\n")
            sdk.stdin.flush()
            deadline = time.monotonic() + 120
            while (stats := worker_stats(home))["waiting_requests"] < len(asks):
                assert stats["active_rows"] == 1, f"the holder ended before every request was waiting: {stats}"
                assert time.monotonic() < deadline, stats
                time.sleep(0.05)
        # The holder's reader went away: its rows leave, and every waiting request starts in one prefill.
        out, err = sdk.communicate(timeout=120)
    finally:
        if sdk.poll() is None:
            sdk.kill()
            sdk.wait()
    assert sdk.returncode == 0, err
    answers = json.loads(out.strip().splitlines()[-1])
    said = {ask: a["content"] for a, ask in zip(answers, asks, strict=True)}
    assert [a["model"] for a in answers] == [model for model, _ in asks], answers
    for name, mapping in MAPPINGS.items():
        assert {p: said[models[name], p] for p in PROMPTS} == mapping, (name, said)
    assert all(said[base, p] not in {m[p] for m in MAPPINGS.values()} for p in PROMPTS), said
    assert all(a["finish_reason"] in ("stop", "length") for a in answers), answers

    stats = worker_stats(home)
    # One batch held both adapters' rows and the base's.
    assert stats["mixed_adapter_steps_total"] >= 1, stats
    mixed = stats["last_mixed_step"]
    assert mixed["base_path"] == str(tiny_model_path.resolve()) and mixed["adapter_paths"] == adapter_paths, mixed
    assert mixed["base_rows"] >= 1, mixed
    # The base's weights are in memory once, for both adapters (and the holder's base beside them).
    bases = {b["path"]: b for b in stats["bases"]}
    tiny = bases[str(tiny_model_path.resolve())]
    assert tiny["loads"] == 1 and stats["base_loads_total"] == 2, stats
    assert sorted(a["path"] for a in stats["adapters"]) == adapter_paths, stats
    assert all(a["base_path"] == tiny["path"] for a in stats["adapters"]), stats
    weights = (tiny_model_path / "model.safetensors").stat().st_size
    assert weights * 0.9 < tiny["bytes"] < weights * 1.1, (tiny, weights)  # one copy of the weights
    resident = (sum(b["bytes"] + b["stack_bytes"] for b in stats["bases"])  # stacks: the mixed batch's LoRA weights
                + sum(a["bytes"] for a in stats["adapters"]))
    assert tiny["stack_bytes"] > 0, stats
    assert stats["memory_bytes"] == resident, stats
