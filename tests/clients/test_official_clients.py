"""Drive a live posttrain server with every generation of the official
``llama-stack-client`` package, each in its own venv under ``.venv-clients/``
(created by ``scripts/setup-client-venvs``; see docs/client-compat.md).

The client code runs in a subprocess (``tests/clients/driver.py``) because the
releases need different Python versions and must not share an environment
with the server. The ``live_server`` fixture (tests/conftest.py) provides
``.base_url`` and ``.tiny_model_path``.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VENVS = ROOT / ".venv-clients"
DRIVER = Path(__file__).resolve().with_name("driver.py")

# Keep in sync with scripts/setup-client-venvs.
CLIENT_VERSIONS = ("0.2.12", "0.2.23", "0.5.4", "0.6.1")
SCENARIOS = ("lora", "cancel", "errors")
# Wall-clock limits for one driver run (job polling inside the driver is 180 s).
TIMEOUT_S = {"lora": 420, "cancel": 300, "errors": 300}

pytestmark = [pytest.mark.clients, pytest.mark.slow]


def _client_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "LLAMA_STACK_BASE_URL", "LLAMA_STACK_CLIENT_LOG")}
    # httpx honours HTTP(S)_PROXY; never route the local server through a proxy.
    no_proxy = ",".join(x for x in (env.get("NO_PROXY") or env.get("no_proxy"), "127.0.0.1", "localhost", "::1") if x)
    env["NO_PROXY"] = env["no_proxy"] = no_proxy
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("version", CLIENT_VERSIONS)
def test_official_client(request: pytest.FixtureRequest, version: str, scenario: str) -> None:
    python = VENVS / version / "bin" / "python"
    if not python.exists():
        pytest.skip(f"llama-stack-client {version}: venv {python.parent.parent} is missing "
                    f"(create it with scripts/setup-client-venvs)")
    # Resolved only after the skip check, so a missing venv does not start a server.
    server = request.getfixturevalue("live_server")

    cmd = [str(python), str(DRIVER), "--base-url", str(server.base_url),
           "--model", str(server.tiny_model_path), "--scenario", scenario]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=_client_env(), capture_output=True, text=True,
                              timeout=TIMEOUT_S[scenario], stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        pytest.fail(f"driver {version}/{scenario} timed out after {TIMEOUT_S[scenario]}s\n"
                    f"--- stdout ---\n{out[-6000:]}\n--- stderr ---\n{err[-6000:]}")

    report = (f"driver {version}/{scenario} exited {proc.returncode}\n"
              f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-10000:]}")
    assert proc.returncode == 0, report
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert lines, report
    try:
        summary = json.loads(lines[-1])
    except json.JSONDecodeError:
        pytest.fail(f"last stdout line is not the JSON summary\n{report}")
    assert summary.get("ok") is True, report
    assert summary.get("version") == version, report
    assert summary.get("scenario") == scenario, report
    if scenario == "lora":
        assert summary["checkpoints"] == 2, report
    if scenario == "cancel":
        assert summary["states_seen"][-1] == "cancelled", report
