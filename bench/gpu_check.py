"""The GPU path end to end, as one short script for a machine with a GPU (issue 3's device check).

    .venv/bin/python bench/gpu_check.py                 # POSTTRAIN_DEVICE=cuda (run time: bench/README.md)
    .venv/bin/python bench/gpu_check.py --device cpu    # the same checks on a CPU (to try the script)

It starts a real ``posttrain serve`` on the device, builds the tiny test model, and runs a bf16 SFT
LoRA job, an fp16 full fine-tune and a DPO job on the LoRA checkpoint, each to completion. For
each it prints the status, the effective device/dtype, the GPU it was pinned to
(``cuda_visible_devices``), the train/validation losses per checkpoint, and whether the loss fell;
then it loads the LoRA checkpoint with transformers + peft on the device and generates. It exits 1
if any job does not complete or a check fails. Follow it with
``bench/train_throughput.py --quick --device cuda`` for the throughput figures.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from posttrain.demo import colour_rows
from posttrain.trainer.tiny_model import create_tiny_model
from tests.conftest import start_server, stop_server
from tests.integration.test_api import dpo_request, lora_request


def _wait(server, job_uuid: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = server.get("/v1/post-training/job/status", params={"job_uuid": job_uuid}).json()
        if status["status"] in ("completed", "failed", "cancelled"):
            return status
        time.sleep(0.5)
    return status


def _report(name: str, status: dict, failures: list[str], *, device: str) -> None:
    resources = status.get("resources_allocated") or {}
    losses = [(c["epoch"], (c.get("training_metrics") or {}).get("train_loss"),
               (c.get("training_metrics") or {}).get("validation_loss")) for c in status.get("checkpoints", [])]
    print(f"{name}: {status['status']}; device {resources.get('device')} dtype {resources.get('dtype')} "
          f"(asked {resources.get('requested_dtype')}), gpu {resources.get('cuda_visible_devices')}")
    for epoch, train, validation in losses:
        print(f"  epoch {epoch}: train loss {train:.4f}, validation loss {validation:.4f}")
    if status["status"] != "completed":
        failures.append(f"{name} ended {status['status']}")
    elif resources.get("device") != device:
        failures.append(f"{name} ran on {resources.get('device')}, not {device}")
    elif len(losses) > 1 and not losses[-1][1] < losses[0][1]:
        failures.append(f"{name}: the train loss did not fall")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = parser.parse_args()
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        home = Path(tmp)
        model = create_tiny_model(home / "models" / "tiny")
        server = start_server(home, model, extra_env={"POSTTRAIN_DEVICE": args.device})
        try:
            server.post("/v1/datasets", json={"purpose": "post-training/messages", "dataset_id": "colours",
                                              "source": {"type": "rows", "rows": colour_rows(repeat=4)}})
            lora = lora_request(str(model), "colours")
            lora["training_config"].update(n_epochs=3, max_steps_per_epoch=8, dtype="bf16")
            lora["training_config"]["optimizer_config"]["lr"] = 1e-2
            full = lora_request(str(model), "colours")
            full.pop("algorithm_config")
            full["training_config"].update(n_epochs=2, max_steps_per_epoch=8, dtype="fp16")
            for body in (lora, full):
                assert server.post("/v1/post-training/supervised-fine-tune", json=body).status_code == 200
            lora_status = _wait(server, lora["job_uuid"])
            _report("SFT LoRA bf16", lora_status, failures, device=args.device)
            _report("SFT full fp16", _wait(server, full["job_uuid"]), failures, device=args.device)
            if lora_status["status"] == "completed":
                _dpo(server, model, lora_status, failures, device=args.device)
                _generate(lora_status["checkpoints"][-1]["path"], model, failures, device=args.device)
        finally:
            stop_server(server)
    print("GPU check: " + ("passed" if not failures else "FAILED: " + "; ".join(failures)))
    return 1 if failures else 0


def _dpo(server, model: Path, lora_status: dict, failures: list[str], *, device: str) -> None:
    rows = [{"prompt": r["input_query"], "chosen": r["expected_answer"], "rejected": "I do not know."}
            for r in colour_rows(repeat=2)]
    server.post("/v1/datasets", json={"purpose": "post-training/messages", "dataset_id": "prefs",
                                      "source": {"type": "rows", "rows": rows}})
    body = dpo_request(lora_status["checkpoints"][-1]["path"], "prefs", beta=0.1, loss_type="sigmoid")
    body["training_config"].update(n_epochs=2, max_steps_per_epoch=8)
    answer = server.post("/v1/post-training/preference-optimize", json=body)
    if answer.status_code != 200:
        failures.append(f"DPO refused: {answer.text[:300]}")
        return
    _report("DPO on the LoRA checkpoint", _wait(server, body["job_uuid"]), failures, device=device)


def _generate(adapter: str, model: Path, failures: list[str], *, device: str) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(adapter)
    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    tuned = PeftModel.from_pretrained(base.to(device), adapter).eval()
    inputs = tokenizer("What is the colour of the sky?", return_tensors="pt").to(device)
    with torch.no_grad():
        out = tuned.generate(**inputs, max_new_tokens=8, do_sample=False)
    text = tokenizer.decode(out[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    print(f"LoRA checkpoint on {device} generates: {text!r}")
    if out.shape[1] <= inputs["input_ids"].shape[1]:
        failures.append("the LoRA checkpoint generated nothing")


if __name__ == "__main__":
    sys.exit(main())
