"""Time from submit to the first optimizer step of a tiny LoRA job, with and without a warm trainer.

Run: .venv/bin/python bench/first_step.py [--jobs 3]
For POSTTRAIN_WARM_TRAINERS=1 and =0 in turn, a real server is started; each job is submitted after
the server has been idle for a few seconds, and the seconds from the submit call to the job's first
`metric` event are printed, with the median and the warm/cold ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from posttrain.demo import colour_rows
from posttrain.trainer.tiny_model import create_tiny_model
from tests.conftest import start_server, stop_server
from tests.integration.test_api import lora_request


def first_step_seconds(server, model: Path) -> float:
    body = lora_request(str(model), "demo")
    started = time.monotonic()
    assert server.post("/v1/post-training/supervised-fine-tune", json=body).status_code == 200
    while not any(e["type"] == "metric" for e in
                  server.get("/v1/post-training/job/events", params={"job_uuid": body["job_uuid"]}).json()["data"]):
        time.sleep(0.05)
    elapsed = time.monotonic() - started
    while server.get("/v1/post-training/job/status", params={"job_uuid": body["job_uuid"]}).json()["status"] != "completed":
        time.sleep(0.2)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=3)
    parser.add_argument("--idle", type=float, default=8.0, help="seconds of idle before each submit")
    args = parser.parse_args()
    model = Path(tempfile.mkdtemp()) / "tiny-llama"
    create_tiny_model(model)
    medians = {}
    for mode, warm in (("warm", "1"), ("cold", "0")):
        server = start_server(Path(tempfile.mkdtemp()), model, extra_env={"POSTTRAIN_WARM_TRAINERS": warm})
        try:
            server.post("/v1/datasets", json={"purpose": "post-training/messages", "dataset_id": "demo",
                                              "source": {"type": "rows", "rows": colour_rows()}})
            times = []
            for _ in range(args.jobs):
                time.sleep(args.idle)
                times.append(first_step_seconds(server, model))
        finally:
            stop_server(server)
        medians[mode] = statistics.median(times)
        print(f"{mode}: submit -> first step {', '.join(f'{t:.2f}' for t in times)} s (median {medians[mode]:.2f} s)")
    print(f"warm/cold: {medians['warm'] / medians['cold']:.2f}; target < 5 s warm: "
          f"{'met' if medians['warm'] < 5 else 'missed'}")


if __name__ == "__main__":
    main()
