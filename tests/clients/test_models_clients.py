"""The models API through the clients people use, against a live server with a really trained
job: every ``llama-stack-client`` generation's ``models.list()``/``retrieve()`` parse it
(``tests/clients/driver.py --scenario models``), and ``posttrain models list|export`` download
what it trained. (The ``openai`` SDK's ``client.models`` is its ``models`` scenario in
test_openai_sdk.py.)"""

from __future__ import annotations

import json
import subprocess
import tarfile
import time

import pytest

from tests.acceptance.test_cli import cli, ok
from tests.clients.test_official_clients import CLIENT_VERSIONS, DRIVER, ROOT, VENVS, _client_env

pytestmark = [pytest.mark.clients, pytest.mark.slow]

ROWS = "".join(json.dumps({"messages": [{"role": "user", "content": f"colour {i}?"},
                                        {"role": "assistant", "content": "blue"}]}) + "\n" for i in range(8))


@pytest.fixture(scope="module")
def trained(live_server) -> dict:
    """An OpenAI job trained to succeeded on the live server (real trainer, 2 steps, 1 checkpoint)."""
    file = live_server.post("/v1/files", files={"file": ("t.jsonl", ROWS.encode())}, data={"purpose": "fine-tune"})
    assert file.status_code == 200, file.text
    job = live_server.post("/v1/fine_tuning/jobs", json={
        "model": live_server.tiny_model_path.name, "training_file": file.json()["id"], "suffix": "clients",
        "hyperparameters": {"n_epochs": 1, "batch_size": 4}}).json()
    deadline = time.monotonic() + 300
    while job["status"] not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, job
        time.sleep(1)
        job = live_server.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
    assert job["status"] == "succeeded", job
    return job


@pytest.mark.parametrize("version", CLIENT_VERSIONS)
def test_llama_stack_clients_parse_the_models_list(live_server, trained, version):
    python = VENVS / version / "bin" / "python"
    if not python.exists():
        pytest.skip(f"llama-stack-client {version}: venv missing (scripts/setup-client-venvs)")
    cmd = [str(python), str(DRIVER), "--base-url", live_server.base_url, "--model", str(live_server.tiny_model_path),
           "--scenario", "models", "--trained-model", trained["fine_tuned_model"]]
    proc = subprocess.run(cmd, cwd=ROOT, env=_client_env(), capture_output=True, text=True, timeout=180,
                          stdin=subprocess.DEVNULL)
    report = f"exit {proc.returncode}\n--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"
    assert proc.returncode == 0, report
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["ok"] and summary["version"] == version, report
    assert trained["fine_tuned_model"] in summary["models"] and live_server.tiny_model_path.name in summary["models"]
    assert summary["retrieved"] == sorted([live_server.tiny_model_path.name, trained["fine_tuned_model"]])


def test_cli_lists_and_exports_what_a_job_trained(live_server, trained, tmp_path):
    ft = trained["fine_tuned_model"]
    listed = ok(cli(live_server.base_url, "models", "list"))
    assert ft in listed and live_server.tiny_model_path.name in listed
    as_json = json.loads(ok(cli(live_server.base_url, "models", "list", "--json")))
    assert ft in [m["id"] for m in as_json["data"]]
    target = tmp_path / "adapter.tar.gz"
    ok(cli(live_server.base_url, "models", "export", ft, "--format", "adapter", "-o", str(target)))
    with tarfile.open(target) as tar:
        names = tar.getnames()
    assert any(n.endswith("/adapter_config.json") for n in names), names
    assert not any(n.endswith("training_state.pt") for n in names), names
    missing = cli(live_server.base_url, "models", "export", ft + "x", "-o", str(tmp_path / "x.tar.gz"))
    assert missing.returncode == 1 and "404" in missing.stderr and not (tmp_path / "x.tar.gz").exists()
