"""Llama Stack v0.2.23's own post-training and datasets integration tests, run unmodified against
a live posttrain server (``pytest ... --stack-config=http://127.0.0.1:PORT``).

The tests are vendored verbatim in ``tests/llama_stack_upstream/v0.2.23/`` and run in
``.venv-llama-stack-tests/`` (``scripts/setup-llama-stack-tests``: Python 3.12, llama-stack 0.2.23,
which they import). They name Hugging Face hub ids; there is no hub here, so the server gets
offline stand-ins where a download would have put them (``tests/hub_standins``):

- ``HuggingFaceTB/SmolLM2-135M-Instruct`` (SFT): the tiny Llama (SmolLM2 is a Llama);
- ``distilgpt2`` (DPO): a tiny GPT-2 (``model_type`` gpt2, ``Conv1D`` attention, no chat template);
- ``llamastack/simpleqa``: rows in its columns (``input_query``, ``expected_answer``,
  ``chat_completion_input``);
- ``trl-internal-testing/hh-rlhf-helpful-base-trl-style``: preference rows in its TRL layout
  (``prompt`` text, ``chosen``/``rejected`` conversations).
"""

from __future__ import annotations

import json
import os
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.clients.test_official_clients import _client_env
from tests.conftest import start_server, stop_server
from tests.fixtures_tiny import build_tiny_gpt2
from tests.hub_standins import cache_dataset, cache_model

ROOT = Path(__file__).resolve().parents[2]
UPSTREAM = ROOT / "tests" / "llama_stack_upstream" / "v0.2.23"
PYTHON = ROOT / ".venv-llama-stack-tests" / "bin" / "python"
TEST_PATHS = ("tests/integration/datasets", "tests/integration/post_training")
EXPECTED_TESTS = 5  # 3 datasets (hub, rows, data: URI), SFT, DPO
TIMEOUT_S = 900

pytestmark = [pytest.mark.clients, pytest.mark.slow]


def simpleqa_rows() -> list[dict]:
    rows = []
    for i in range(12):
        question, answer = f"What is {i} plus {i}?", str(2 * i)
        rows.append({"input_query": question, "expected_answer": answer,
                     "chat_completion_input": json.dumps([{"role": "user", "content": question}])})
    return rows


def hh_rlhf_rows() -> list[dict]:
    rows = []
    for i in range(24):
        prompt = f"Can you name the colour of thing number {i}?"
        user = {"role": "user", "content": prompt}
        rows.append({"prompt": prompt,
                     "chosen": [user, {"role": "assistant", "content": "It is red."}],
                     "rejected": [user, {"role": "assistant", "content": "I do not know."}]})
    return rows


@pytest.fixture
def hub_server(tmp_path, tmp_path_factory, tiny_model_path):
    """A live server whose Hugging Face caches hold the stand-ins for every id the tests name."""
    hf_home = tmp_path / "hf"
    cache_model(hf_home / "hub", "HuggingFaceTB/SmolLM2-135M-Instruct", tiny_model_path)
    cache_model(hf_home / "hub", "distilgpt2", build_tiny_gpt2(tmp_path_factory))
    cache_dataset(hf_home / "datasets", "llamastack/simpleqa", simpleqa_rows())
    cache_dataset(hf_home / "datasets", "trl-internal-testing/hh-rlhf-helpful-base-trl-style", hh_rlhf_rows())
    home = tmp_path / "home"
    home.mkdir()
    server = start_server(home, tiny_model_path, extra_env={
        "POSTTRAIN_HF_CACHE": str(hf_home / "hub"), "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1"})
    yield server
    stop_server(server)


def test_llama_stack_own_post_training_and_datasets_tests_pass(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    if not PYTHON.exists():
        reason = (f"{PYTHON.parent.parent} is missing: create it with scripts/setup-llama-stack-tests "
                  "(Python 3.12, llama-stack 0.2.23)")
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    server = request.getfixturevalue("hub_server")  # after the skip check: no venv, no server
    report = tmp_path / "upstream.xml"
    env = _client_env()
    env.pop("LLAMA_STACK_CONFIG", None)
    cmd = [str(PYTHON), "-m", "pytest", *TEST_PATHS, f"--stack-config={server.base_url}", f"--junitxml={report}",
           "-v", "-p", "no:cacheprovider"]
    try:
        proc = subprocess.run(cmd, cwd=UPSTREAM, env=env, capture_output=True, text=True, timeout=TIMEOUT_S,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        pytest.fail(f"Llama Stack's tests timed out after {TIMEOUT_S}s\n{out[-8000:]}\n"
                    f"--- server log ---\n{(server.home / 'server.log').read_text()[-4000:]}")
    shown = (f"exit {proc.returncode}\n--- stdout ---\n{proc.stdout[-10000:]}\n--- stderr ---\n{proc.stderr[-4000:]}\n"
             f"--- server log ---\n{(server.home / 'server.log').read_text()[-4000:]}")
    assert report.is_file(), shown
    suite = ET.parse(report).getroot()  # noqa: S314 - the report pytest just wrote
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    passed = [case.get("name") for case in suite.iter("testcase") if not list(case)]
    assert counts == {"tests": EXPECTED_TESTS, "failures": 0, "errors": 0, "skipped": 0}, f"{counts}\n{shown}"
    assert len(passed) == EXPECTED_TESTS and proc.returncode == 0, shown
