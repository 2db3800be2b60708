"""The CLI's live view of a GRPO job: its reward (and KL, and validation reward) in the per-job
line and the final summary, from the metric events the server streams; an SFT job's line has none.
And ``posttrain jobs submit`` sends a config with a grader to our reinforcement endpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from posttrain.remote.watching import JobView, describe
from tests.conftest import REPO


def _metric(step: int, **extra: float) -> dict:
    return {"type": "metric", "created_at": f"2026-01-01T00:00:0{step}Z",
            "data": {"step": step, "epoch": 1, "total_steps": 4, "loss": 0.1, "lr": 1e-3, "tokens_per_s": 10.0, **extra}}


def test_the_live_line_shows_a_grpo_jobs_reward_and_kl():
    view = JobView("grpo-job", "in_progress")
    view.apply(_metric(1, reward_mean=0.125, reward_std=0.3, kl=0.004))
    view.apply(_metric(2, reward_mean=0.5, reward_std=0.3, kl=0.008, valid_reward_mean=0.375))
    view.apply(_metric(3, reward_mean=0.625, reward_std=0.3, kl=0.01))
    info = view.info()
    assert "reward 0.6250" in info and "kl 0.0100" in info and "val reward 0.3750" in info, info
    view.apply({"type": "end", "data": {"status": "completed"}})
    assert "reward 0.6250" in view.summary()
    line = describe(_metric(2, reward_mean=0.5, kl=0.008))
    assert "reward 0.5000" in line and "kl 0.0080" in line, line


def test_an_sft_jobs_line_has_no_reward():
    view = JobView("sft-job", "in_progress")
    view.apply(_metric(1))
    assert "reward" not in view.info() and "reward" not in describe(_metric(1))


def test_a_config_with_a_grader_goes_to_the_reinforcement_endpoint(tmp_path):
    config = tmp_path / "rft.yaml"
    config.write_text(json.dumps({"job_uuid": "rft-1", "model": "/m", "training_config": {"n_epochs": 1},
                                  "grader": {"type": "string_check", "name": "g", "input": "{{sample.output_text}}",
                                             "reference": "red", "operation": "eq"}}))
    env = {**os.environ, "POSTTRAIN_URL": "http://127.0.0.1:9"}
    result = subprocess.run([sys.executable, "-m", "posttrain", "jobs", "submit", str(config), "--dry-run"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    head, body = result.stdout.split("\n", 1)
    assert head == "POST /v1/posttrain/reinforcement-fine-tune"
    assert json.loads(body)["grader"]["type"] == "string_check"
