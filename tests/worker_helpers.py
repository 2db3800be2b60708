"""What the launcher and scheduler tests share: jobs with a plan a launcher can run, a launch
config that runs ``tests.stand_in_trainer`` in place of the trainer, and a patient wait."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from posttrain.domain.jobs import Job, JobKind
from posttrain.domain.recipes import JobPlan, build_recipe
from posttrain.store.jobs import JobStore, new_job_id
from posttrain.worker.launcher import LaunchConfig

REPO = Path(__file__).resolve().parents[1]
STAND_IN = "tests.stand_in_trainer"


def stand_in_importable(monkeypatch) -> None:
    """The trainer process inherits our environment: let it import ``tests.stand_in_trainer``."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))


def launch_config(**overrides: Any) -> LaunchConfig:
    values: dict[str, Any] = dict(lease_seconds=5.0, heartbeat_seconds=0.2, cancel_grace_seconds=3.0, nice=0,
                                  resume_point_seconds=0, trainer_module=STAND_IN)
    return LaunchConfig(**{**values, **overrides})


def submit(store: JobStore, jobs_dir: Path, job_uuid: str, *, max_attempts: int = 2) -> Job:
    """A scheduled job whose plan names real files in its own folder (``job_uuid``'s first word
    picks what the stand-in trainer does)."""
    job_id = new_job_id()
    folder = jobs_dir / job_id
    folder.mkdir(parents=True)
    (folder / "train.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    plan = JobPlan(recipe=build_recipe({"method": "sft"}), model=str(folder / "model"),
                   output_dir=str(folder / "checkpoints"), train_rows_path=str(folder / "train.jsonl"))
    return store.create(job_id=job_id, job_uuid=job_uuid, tenant="t", kind=JobKind.SFT,
                        request={"job_uuid": job_uuid}, plan=plan, max_attempts=max_attempts)


def output_dir(job: Job) -> Path:
    assert job.plan is not None
    return Path(job.plan.output_dir)


def wait_for(predicate: Callable[[], Any], *, timeout: float = 10.0, what: str = "the condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
