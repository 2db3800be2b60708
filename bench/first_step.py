"""Time from submit to the first optimizer step of a tiny LoRA job, with and without a warm trainer.

Run: .venv/bin/python bench/first_step.py
Prints, for POSTTRAIN_WARM_TRAINERS=1 and =0, the seconds from the submit call returning to the
first `metric` event, for three jobs each (the server idle between them).
"""
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.conftest import start_server, stop_server
from tests.integration.test_api import lora_request
from posttrain.demo import colour_rows
from posttrain.trainer.tiny_model import create_tiny_model
from datetime import datetime
model = Path(tempfile.mkdtemp()) / "tiny"; create_tiny_model(model)
for warm in ("1", "0"):
    home = Path(tempfile.mkdtemp())
    s = start_server(home, model, extra_env={"POSTTRAIN_WARM_TRAINERS": warm, "POSTTRAIN_POLL_SECONDS": "0.5"})
    s.post("/v1/datasets", json={"purpose": "post-training/messages", "dataset_id": "d", "source": {"type": "rows", "rows": colour_rows()}})
    times = []
    for i in range(3):
        time.sleep(8)  # let the pool warm up
        body = lora_request(str(model), "d"); t0 = time.time()
        s.post("/v1/post-training/supervised-fine-tune", json=body)
        while True:
            ev = s.get("/v1/post-training/job/events", params={"job_uuid": body["job_uuid"]}).json()["data"]
            if any(e["type"] == "metric" for e in ev): break
            time.sleep(0.05)
        times.append(time.time() - t0)
        while s.get("/v1/post-training/job/status", params={"job_uuid": body["job_uuid"]}).json()["status"] != "completed": time.sleep(0.2)
    stop_server(s)
    print("warm" if warm == "1" else "cold", [round(t, 2) for t in times])
