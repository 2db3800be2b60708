"""The job's TensorBoard log (logger_config {"type": "tensorboard"}): the trainer's metric and
checkpoint events as scalars in <output_dir>/tensorboard, read back from the event files the way
TensorBoard reads them, through a real trainer process, a resume, and a real server."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest

from posttrain.domain.protocol import CheckpointWritten, LogLine, Started, StepMetric
from tests.integration.test_api import lora_request
from tests.integration.test_trainer_process import kinds, make_spec, run
from tests.trainer_specs import typed_spec, typed_spec_file

pytestmark = [
    # peft 0.21 still reads transformers' deprecated alias when generating from a PeftModel.
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]


def read_records(folder: Path) -> list[list]:
    """Every event of every file in ``folder``, file by file in name order (as TensorBoard loads
    them). A file is TFRecord framed: 8-byte little-endian length, 4-byte CRC, data, 4-byte CRC."""
    from tensorboardX.proto.event_pb2 import Event

    files = []
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, pos, events = path.read_bytes(), 0, []
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            events.append(Event.FromString(data[pos + 12:pos + 12 + length]))
            pos += 12 + length + 4
        files.append(events)
    return files


def raw_scalars(folder: Path) -> list[tuple[str, int, float]]:
    """(tag, step, value) of every scalar written, duplicates included."""
    return [(value.tag, event.step, value.simple_value)
            for events in read_records(folder) for event in events for value in event.summary.value]


def merged_scalars(folder: Path) -> dict[str, dict[int, float]]:
    """What TensorBoard shows: scalars by tag and step, where a session START at step S (what
    tensorboardX's purge_step writes) drops whatever was logged before at step S or later."""
    from tensorboardX.proto.event_pb2 import SessionLog

    shown: dict[str, dict[int, float]] = {}
    for events in read_records(folder):
        for event in events:
            if event.HasField("session_log") and event.session_log.status == SessionLog.START:
                shown = {tag: {s: v for s, v in steps.items() if s < event.step} for tag, steps in shown.items()}
            for value in event.summary.value:
                shown.setdefault(value.tag, {})[event.step] = value.simple_value
    return shown


def with_tensorboard(spec: Path, logger_config: dict | None = None) -> Path:
    data = json.loads(spec.read_text())
    data["logger_config"] = logger_config if logger_config is not None else {"type": "tensorboard"}
    spec.write_text(json.dumps(data))
    return spec


# -- the wrapper, in process ------------------------------------------------------------------


def step_metric(*, step: int, loss: float, lr: float, tokens_per_s: float, **extra: float) -> StepMetric:
    return StepMetric(step=step, epoch=1, loss=loss, lr=lr, tokens_per_s=tokens_per_s, tokens=10, padding_fraction=0.0,
                      step_seconds=0.1, total_steps=2, extra=extra)


class Recorder:
    def __init__(self) -> None:
        self.events: list[dict] = []

    def emit(self, event) -> None:
        self.events.append(json.loads(event.to_line()))

    def log(self, message: str, *, level: str = "info") -> None:
        self.emit(LogLine(message=message, level=level))


def test_the_wrapper_forwards_every_event_and_logs_the_numbers(tmp_path):
    from posttrain.trainer.tensorboard_log import TensorBoardReporter

    inner, logdir = Recorder(), tmp_path / "out" / "tensorboard"
    reporter = TensorBoardReporter(inner, logdir=logdir)
    reporter.emit(Started(resources={"device": "cpu"}, total_steps=2, resumed_from=None))
    reporter.log("hello")
    reporter.emit(step_metric(step=1, loss=2.5, lr=1e-3, tokens_per_s=100.0, reward_margin=0.25, reward_accuracy=0.5))
    reporter.emit(step_metric(step=2, loss=2.0, lr=5e-4, tokens_per_s=120.0, reward_margin=0.5, reward_accuracy=1.0))
    reporter.emit(CheckpointWritten(identifier="j-epoch-1", epoch=1, step=2, path="/x", train_loss=2.25,
                                    validation_loss=1.5, perplexity=4.48, write_seconds=0.1,
                                    extra={"validation_reward_margin": 0.75}))
    reporter.close()

    assert inner.events[0]["resources"] == {"device": "cpu", "tensorboard_dir": str(logdir)}
    assert [e["event"] for e in inner.events] == ["started", "log", "metric", "metric", "checkpoint"]
    assert inner.events[2] == {"event": "metric", "step": 1, "epoch": 1, "loss": 2.5, "lr": 1e-3, "tokens_per_s": 100.0,
                               "tokens": 10, "padding_fraction": 0.0, "step_seconds": 0.1, "total_steps": 2,
                               "reward_margin": 0.25, "reward_accuracy": 0.5}
    shown = merged_scalars(logdir)
    assert shown["train/loss"] == {1: 2.5, 2: 2.0}
    assert shown["train/reward_margin"] == {1: 0.25, 2: 0.5} and shown["train/lr"][2] == pytest.approx(5e-4)
    assert shown["validation/loss"] == {2: 1.5} and shown["validation/perplexity"] == {2: pytest.approx(4.48)}
    assert shown["train/epoch_loss"] == {2: 2.25} and shown["validation/reward_margin"] == {2: 0.75}
    assert "train/step" not in shown and "train/total_steps" not in shown and shown["train/tokens"] == {1: 10, 2: 10}


def test_a_grpo_jobs_rewards_are_train_scalars_and_its_validation_reward_a_validation_one(tmp_path):
    from posttrain.trainer.tensorboard_log import TensorBoardReporter

    logdir = tmp_path / "tensorboard"
    reporter = TensorBoardReporter(Recorder(), logdir=logdir)
    reporter.emit(step_metric(step=1, loss=0.1, lr=1e-3, tokens_per_s=50.0, reward_mean=0.25, reward_std=0.4,
                              kl=0.01, entropy=2.0, completion_length=5.0, **{"reward/is_red": 0.25}))
    reporter.emit(step_metric(step=2, loss=0.05, lr=1e-3, tokens_per_s=50.0, reward_mean=0.75, reward_std=0.4,
                              kl=0.02, entropy=1.5, completion_length=4.0, valid_reward_mean=0.5,
                              **{"reward/is_red": 0.75}))
    reporter.close()
    shown = merged_scalars(logdir)
    assert shown["train/reward_mean"] == {1: 0.25, 2: 0.75} and shown["train/reward/is_red"] == {1: 0.25, 2: 0.75}
    assert shown["train/kl"] == {1: pytest.approx(0.01), 2: pytest.approx(0.02)}
    assert shown["train/entropy"] == {1: 2.0, 2: 1.5} and shown["train/completion_length"] == {1: 5.0, 2: 4.0}
    assert shown["validation/reward_mean"] == {2: 0.5} and "train/valid_reward_mean" not in shown


def test_nothing_is_written_before_the_first_step(tmp_path):
    from posttrain.trainer.tensorboard_log import TensorBoardReporter

    reporter = TensorBoardReporter(Recorder(), logdir=tmp_path / "tensorboard")
    reporter.emit(Started(resources={}, total_steps=2, resumed_from="j-epoch-1"))
    reporter.emit(CheckpointWritten(identifier="j-epoch-1", epoch=1, step=2, path="/x", train_loss=1.0,
                                    validation_loss=1.0, perplexity=2.7))  # re-sent on resume: no write_seconds
    reporter.close()
    assert (tmp_path / "tensorboard").is_dir() and list((tmp_path / "tensorboard").iterdir()) == []


def test_the_log_is_written_only_when_the_recipe_asks_for_it(tiny_model_path, tmp_path):
    from posttrain.trainer.tensorboard_log import TensorBoardReporter, reporter_for

    spec = typed_spec(json.loads(make_spec(tmp_path, tiny_model_path).read_text()))
    inner = Recorder()
    assert reporter_for(spec, inner) is inner
    logged = spec.model_copy(update={"plan": spec.plan.model_copy(update={
        "recipe": spec.recipe.model_copy(update={"tensorboard": True})})})
    wrapped = reporter_for(logged, inner)
    assert isinstance(wrapped, TensorBoardReporter) and wrapped.logdir == (tmp_path / "out" / "tensorboard").resolve()
    wrapped.close()


# -- a real trainer -----------------------------------------------------------------------------


@pytest.mark.slow
def test_a_trainer_run_logs_every_step_and_checkpoint_and_a_resume_appends(tiny_model_path, tmp_path):
    first, code = run(with_tensorboard(make_spec(tmp_path, tiny_model_path, n_epochs=1, max_steps_per_epoch=3)),
                      tmp_path)
    assert code == 0, (tmp_path / "stderr.txt").read_text()[-3000:]
    logdir = tmp_path / "out" / "tensorboard"
    assert first[0]["resources"]["tensorboard_dir"] == str(logdir.resolve())
    shown = merged_scalars(logdir)
    metrics = [e for e in first if e["event"] == "metric"]
    assert shown["train/loss"] == {m["step"]: pytest.approx(m["loss"], rel=1e-6) for m in metrics}
    assert sorted(shown["train/loss"]) == [1, 2, 3] and set(shown["train/tokens_per_s"]) == {1, 2, 3}
    checkpoint = next(e for e in first if e["event"] == "checkpoint")
    assert shown["validation/loss"] == {3: pytest.approx(checkpoint["validation_loss"], rel=1e-6)}
    assert shown["validation/perplexity"] == {3: pytest.approx(checkpoint["perplexity"], rel=1e-6)}
    assert shown["train/epoch_loss"] == {3: pytest.approx(checkpoint["train_loss"], rel=1e-6)}
    # Checkpoint folders are still found alongside the log folder.
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["epoch_1", "tensorboard"]

    # What an attempt killed mid-epoch 2 left: steps 4 and 5 that the resumed run trains again.
    from tensorboardX import SummaryWriter

    time.sleep(1.1)  # event files are named by the second: keep the files in the order they were written
    stale = SummaryWriter(logdir=str(logdir), filename_suffix=".stale")
    stale.add_scalar("train/loss", 99.0, global_step=4)
    stale.add_scalar("train/loss", 99.0, global_step=5)
    stale.close()
    assert merged_scalars(logdir)["train/loss"][5] == 99.0
    time.sleep(1.1)

    events, code = run(with_tensorboard(make_spec(tmp_path, tiny_model_path, n_epochs=2, max_steps_per_epoch=3)),
                       tmp_path)
    assert code == 0, (tmp_path / "stderr.txt").read_text()[-3000:]
    assert kinds(events) == ["started", "checkpoint", "metric", "metric", "metric", "checkpoint", "completed"]
    assert events[0]["resources"]["tensorboard_dir"] == str(logdir.resolve())
    assert len(list(logdir.glob("events.out.tfevents.*"))) == 3
    shown = merged_scalars(logdir)
    resumed = {e["step"]: e["loss"] for e in events if e["event"] == "metric"}
    assert sorted(shown["train/loss"]) == [1, 2, 3, 4, 5, 6]
    assert {s: shown["train/loss"][s] for s in (4, 5, 6)} == {s: pytest.approx(v, rel=1e-6) for s, v in resumed.items()}
    assert sorted(shown["validation/loss"]) == [3, 6]
    # The checkpoint re-sent on resume is not logged a second time.
    assert [step for tag, step, _ in raw_scalars(logdir) if tag == "validation/loss"] == [3, 6]


@pytest.mark.slow
def test_a_trainer_asked_for_another_logger_fails_as_invalid_config(tiny_model_path, tmp_path):
    """A hand-written spec whose recipe asks for a logger the recipe has no field for: the trainer
    refuses the whole spec (invalid_config, naming the field) before it trains anything."""
    typed = typed_spec_file(with_tensorboard(make_spec(tmp_path, tiny_model_path)))
    spec = json.loads(typed.read_text())
    spec["plan"]["recipe"]["wandb"] = True
    typed.write_text(json.dumps(spec))
    events, code = run(typed, tmp_path)
    assert code == 1 and events[-1]["event"] == "failed" and events[-1]["code"] == "invalid_config"
    assert "wandb" in events[-1]["message"]
    assert not (tmp_path / "out" / "tensorboard").exists()


# -- through the server ------------------------------------------------------------------------


@pytest.mark.slow
def test_a_job_submitted_with_a_tensorboard_log_shows_where_it_is(live_server):
    rows = [{"question": f"What is the colour of thing {i}?", "answer": "Blue."} for i in range(8)]
    assert live_server.post("/v1/datasets", json={"purpose": "post-training/messages", "dataset_id": "tb-e2e",
                                                  "source": {"type": "rows", "rows": rows}}).status_code == 200
    body = lora_request(str(live_server.tiny_model_path), "tb-e2e", logger_config={"type": "tensorboard"})
    assert live_server.post("/v1/post-training/supervised-fine-tune", json=body).status_code == 200
    deadline = time.monotonic() + 180
    while True:
        status = live_server.get("/v1/post-training/job/status", params={"job_uuid": body["job_uuid"]}).json()
        if status["status"] in ("completed", "failed", "cancelled") or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert status["status"] == "completed", status
    logdir = Path(status["resources_allocated"]["tensorboard_dir"])
    assert logdir.is_absolute() and logdir.name == "tensorboard"
    checkpoint = Path(status["checkpoints"][0]["path"])
    assert logdir.parent == checkpoint.parent
    shown = merged_scalars(logdir)
    assert sorted(shown["train/loss"]) == [1, 2] and sorted(shown["validation/loss"]) == [2]
