"""A stand-in for ``python -m posttrain.trainer``: speaks the trainer protocol on stdout
(docs/trainer-protocol.md) without torch, so the launcher and scheduler tests run a real process
in well under a second.

Run as ``python -m tests.stand_in_trainer SPEC.json`` (``LaunchConfig.trainer_module``). What it
does is chosen by the first word of the spec's ``job_uuid``:

- ``completes``: started, two metrics, a checkpoint (a real folder), completed; exit 0
- ``slow``: the same, taking about a second
- ``fails``: started, failed with code ``bad_row``; exit 1
- ``crashes``: started, a metric, a line on stderr, then exit 3 with no final event
- ``runs``: started, then a metric every 50 ms until SIGTERM; then, as the real trainer may while
  it stops, one more checkpoint and metric, and ``cancelled``; exit 0
- ``pauses``: like ``runs``, and on SIGUSR1 ``paused`` (after the last metric's step, with a resume
  point label, as the real trainer reports it); exit 0
- ``loads``: waits (loading, as it were) up to 60 s for SIGTERM before it has ``started``; then
  ``cancelled``; exit 0

It writes ``ran.json`` (start and end times) and, on SIGTERM, ``sigterm`` into the spec's
``output_dir``: the side channel a test reads to see what the process lived through.
Only the standard library is imported.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

#: What every metric event carries besides its step, loss and plan (docs/trainer-protocol.md).
STEP = {"lr": 1e-4, "tokens_per_s": 100.0, "tokens": 50, "padding_fraction": 0.0, "step_seconds": 0.5}


def _say(event: str, **fields) -> None:
    if event == "metric":
        fields = {**STEP, **fields}
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def _checkpoint(spec: dict, output: Path, epoch: int, step: int) -> None:
    folder = output / f"epoch_{epoch}"
    folder.mkdir(parents=True, exist_ok=True)
    _say("checkpoint", identifier=f"{spec['job_uuid']}-epoch-{epoch}", epoch=epoch, step=step, path=str(folder),
         train_loss=1.0, validation_loss=1.1, perplexity=3.0, write_seconds=0.0)


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    output = Path(spec["plan"]["output_dir"])
    output.mkdir(parents=True, exist_ok=True)
    behaviour = spec["job_uuid"].split("-")[0]
    started_at = time.time()
    stopping = []
    pausing: list[float] = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(time.time()))
    signal.signal(signal.SIGUSR1, lambda *_: pausing.append(time.time()))
    if behaviour == "loads":
        deadline = time.monotonic() + 60
        while not stopping and time.monotonic() < deadline:
            time.sleep(0.02)
        _say("cancelled")
        return 0
    _say("started", resources={"device": "cpu", "dtype": "fp32"}, total_steps=2, resumed_from=None)
    code = 0
    if behaviour in ("completes", "slow"):
        for step in (1, 2):
            if behaviour == "slow":
                time.sleep(0.5)
            _say("metric", step=step, epoch=1, loss=2.0 / step, total_steps=2)
        _checkpoint(spec, output, epoch=1, step=2)
        _say("completed")
    elif behaviour == "fails":
        _say("failed", code="bad_row", message="row 2: messages is empty")
        code = 1
    elif behaviour == "crashes":
        _say("metric", step=1, epoch=1, loss=2.0, total_steps=2)
        sys.stderr.write("simulated crash in the trainer\n")
        code = 3
    elif behaviour == "pauses":
        step = 0
        deadline = time.monotonic() + 60
        while not stopping and not pausing and time.monotonic() < deadline:
            step += 1
            _say("metric", step=step, epoch=1, loss=1.0, total_steps=10_000)
            time.sleep(0.05)
        if pausing:
            _say("paused", step=step, resume_point=f"epoch-1-step-{step}")
        else:
            _say("cancelled")
    elif behaviour == "runs":
        step = 0
        deadline = time.monotonic() + 60
        while not stopping and time.monotonic() < deadline:
            step += 1
            _say("metric", step=step, epoch=1, loss=1.0, total_steps=10_000)
            time.sleep(0.05)
        if stopping:
            (output / "sigterm").write_text(str(stopping[0]))
        _checkpoint(spec, output, epoch=1, step=step)
        _say("metric", step=step + 1, epoch=1, loss=1.0, total_steps=10_000)
        _say("cancelled")
    else:
        _say("failed", code="error", message=f"the stand-in trainer has no behaviour {behaviour!r}")
        code = 1
    (output / "ran.json").write_text(json.dumps({"start": started_at, "end": time.time()}))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
