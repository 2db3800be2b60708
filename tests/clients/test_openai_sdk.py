"""Drive a live posttrain server with the official ``openai`` SDK, code written as for OpenAI with
only ``base_url`` changed: the newest release and the newest 1.x, each in its own venv under
``.venv-openai/`` (``scripts/setup-openai-venvs``), through ``tests/clients/openai_driver.py``."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.clients.test_official_clients import _client_env
from tests.serving_helpers import PAIRS, train_mapping

ROOT = Path(__file__).resolve().parents[2]
VENVS = ROOT / ".venv-openai"
DRIVER = Path(__file__).resolve().with_name("openai_driver.py")

# Keep in sync with scripts/setup-openai-venvs.
SDK_VERSIONS = ("3.57.0", "1.109.1")
TIMEOUT_S = {"lifecycle": 420, "dpo": 420, "pause": 540, "errors": 120, "models": 420, "chat": 240}

pytestmark = [pytest.mark.clients, pytest.mark.slow]


@pytest.fixture(scope="module")
def trained_mapping(live_server) -> dict:
    """The live server's tiny model fine-tuned on ``PAIRS`` (once for both SDK releases)."""
    return train_mapping(live_server.base_url, live_server.tiny_model_path)


@pytest.mark.parametrize("scenario", ["lifecycle", "dpo", "pause", "errors", "models", "chat"])
@pytest.mark.parametrize("version", SDK_VERSIONS)
def test_openai_sdk(request: pytest.FixtureRequest, version: str, scenario: str) -> None:
    python = VENVS / version / "bin" / "python"
    if not python.exists():
        pytest.skip(f"openai {version}: venv {python.parent.parent} is missing (create it with scripts/setup-openai-venvs)")
    server = request.getfixturevalue("live_server")
    cmd = [str(python), str(DRIVER), "--base-url", server.base_url, "--model", server.tiny_model_path.name,
           "--scenario", scenario]
    if scenario == "chat":
        trained = request.getfixturevalue("trained_mapping")
        cmd[cmd.index("--model") + 1] = trained["fine_tuned_model"]
        cmd += ["--pairs", json.dumps(PAIRS), "--base", server.tiny_model_path.name]
    env = {k: v for k, v in _client_env().items() if not k.startswith("OPENAI_")}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S[scenario],
                          stdin=subprocess.DEVNULL)
    report = (f"driver {version}/{scenario} exited {proc.returncode}\n"
              f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-10000:]}")
    assert proc.returncode == 0, report
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["ok"] is True and summary["version"] == version and summary["scenario"] == scenario, report
    if scenario == "chat":
        assert summary["answers"] == PAIRS, report
    if scenario == "models":
        assert summary["status"] == "succeeded" and summary["checkpoints"] == 2, report
    if scenario in ("lifecycle", "dpo"):
        assert summary["status"] == "succeeded" and summary["checkpoints"] == 1, report
    if scenario == "pause":
        # The SDKs' status literal lacks pausing/paused; both keep the string as the server sent it.
        assert summary["status"] == "succeeded" and summary["checkpoints"] == 2, report
        assert summary["first_pause_status"] in ("pausing", "paused"), report
