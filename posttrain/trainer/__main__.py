"""Entry point: ``python -m posttrain.trainer SPEC.json`` (see docs/trainer-protocol.md).

stdout belongs to the protocol alone: we keep a private handle on the real stdout and point both
``sys.stdout`` and file descriptor 1 at stderr before importing any library, so stray prints, C
extensions and progress bars cannot corrupt the launcher's JSON-lines stream. Every exit path
emits exactly one terminal event: completed, cancelled, paused (the epoch loop emits that one,
with where it stopped) or failed.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from typing import TYPE_CHECKING

from posttrain.domain.protocol import Cancelled, Completed, Failed, FailureCode

if TYPE_CHECKING:  # pydantic is a library too: imported once stdout is the protocol's alone
    from posttrain.domain.recipes import TrainerSpec


def _take_stdout():
    """Return a private text stream on the real stdout; route everything else to stderr."""
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8", buffering=1)
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = sys.stderr
    return protocol


def _quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' own bars follow it too


def _wait_warm() -> str | None:
    """Warm mode: import the training stack now, then wait for one job on stdin.

    The launcher sends one JSON line ``{"spec": path, "stderr": path}``; from then on this process
    is exactly a trainer started with that spec, its library output going to the job's own log.
    """
    import threading

    received: dict[str, bytes] = {}
    arrived = threading.Event()

    def wait_for_line() -> None:
        # Watch stdin from the start: if the worker dies while we import, leave at once.
        data = b""
        while b"\n" not in data:
            chunk = os.read(0, 65536)
            if not chunk:
                os._exit(0)
            data += chunk
        received["line"] = data
        arrived.set()

    threading.Thread(target=wait_for_line, name="warm-stdin", daemon=True).start()
    _quiet_libraries()
    import peft  # noqa: F401 - imported for their start-up cost, before the job arrives
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import posttrain.trainer.dpo
    import posttrain.trainer.grpo
    import posttrain.trainer.sft  # noqa: F401

    arrived.wait()
    line = received["line"]
    if not line.strip():
        return None
    job = json.loads(line)
    log_fd = os.open(job["stderr"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log_fd, 2)
    os.dup2(log_fd, 1)  # fd 1 already stood for stderr; the protocol has its own handle
    os.close(log_fd)
    return job["spec"]


def _run(spec: TrainerSpec, *, reporter, stop) -> str:
    """The method's trainer, imported only now (the imports are the slow part of a start)."""
    from posttrain.domain.recipes import JobKind
    from posttrain.trainer import distributed
    from posttrain.trainer.errors import TrainerConfigError

    if distributed.world().distributed and spec.recipe.method not in (JobKind.SFT, JobKind.DPO):
        raise TrainerConfigError(f"a {spec.recipe.method.value} job trains on one device; only SFT and DPO jobs "
                                 f"run on several (this one was started on {distributed.world().size})")

    for note in spec.recipe.notes:
        reporter.log(note, level="warning")
    if spec.recipe.method is JobKind.DPO:
        from posttrain.trainer.dpo import run_dpo

        return run_dpo(spec=spec, reporter=reporter, stop=stop)
    if spec.recipe.method is JobKind.GRPO:
        from posttrain.trainer.grpo import run_grpo

        return run_grpo(spec=spec, reporter=reporter, stop=stop)
    from posttrain.trainer.sft import run_sft

    return run_sft(spec=spec, reporter=reporter, stop=stop)


def _run_logged(spec: TrainerSpec, *, reporter, stop) -> str:
    """Run, with the job's TensorBoard log and W&B run when the recipe asks for them. Both are
    closed on every way out (done, paused, cancelled, failed), so what they hold is on disk to
    look at; the W&B run is marked failed when the trainer raised."""
    from posttrain.trainer import tensorboard_log, wandb_log

    logged = tensorboard_log.reporter_for(spec, reporter)
    run_reporter = wandb_log.reporter_for(spec, logged)
    failed = True
    try:
        outcome = _run(spec, reporter=run_reporter, stop=stop)
        failed = False
        return outcome
    finally:
        if run_reporter is not logged:
            run_reporter.close(exit_code=1 if failed else 0)
        if logged is not reporter:
            logged.close()


def main(argv: list[str] | None = None) -> int:
    from posttrain.trainer import distributed
    from posttrain.trainer.reporting import Reporter, StopFlag, StopRequested

    argv = sys.argv[1:] if argv is None else argv
    protocol = _take_stdout()
    # One job on several ranks: rank 0 alone speaks the protocol (trainer/distributed.py).
    reporting = distributed.is_reporting_rank()
    reporter = Reporter(protocol if reporting else open(os.devnull, "w", encoding="utf-8"))  # noqa: SIM115
    if argv == ["--warm"]:
        job = _wait_warm()
        if job is None:
            return 0  # the pool closed our stdin: nothing to do
        argv = [job]
    stop = StopFlag()
    stop.install()
    if len(argv) != 1:
        reporter.emit(Failed(code=FailureCode.USAGE, message="usage: python -m posttrain.trainer SPEC.json"))
        return 1
    try:
        spec = _read_spec(argv[0])
        if spec.cuda_visible_devices is not None:  # before torch initialises CUDA
            os.environ["CUDA_VISIBLE_DEVICES"] = spec.cuda_visible_devices
        _quiet_libraries()
        world = distributed.init_from_env(device=spec.device)
        # The other ranks write no TensorBoard or W&B log of their own: rank 0's is the job's.
        outcome = (_run_logged if world.reporting else _run)(spec, reporter=reporter, stop=stop)
    except StopRequested:
        outcome = "cancelled"
    except Exception as exc:  # noqa: BLE001 - every failure becomes one protocol event
        traceback.print_exc(file=sys.stderr)
        if distributed.lost_peer(exc):
            # Not the job's failure: the attempt ends (no terminal event), the launcher requeues it.
            reporter.log(f"rank {distributed.world().rank} lost a peer rank: {exc}", level="warning")
            return 1
        reporter.emit(Failed(code=_failure_code(exc), message=str(exc) or type(exc).__name__))
        return 1
    distributed.close()
    if outcome == "cancelled":
        reporter.emit(Cancelled())
    elif outcome == "paused":
        _exit_now()  # the epoch loop reported it, with the step and the resume point
    else:
        reporter.emit(Completed())
    return 0


def _exit_now() -> None:
    """Leave without the interpreter's teardown once paused: everything that matters is on disk
    (the resume point is fsynced, the ``paused`` line flushed), and the teardown of the loaded
    libraries took seconds on the tiny model, seconds the slot stayed taken after the pause."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _read_spec(path: str) -> TrainerSpec:
    """The typed spec in ``path``; a spec it does not accept fails as ``invalid_config``, naming the
    first field wrong."""
    from pydantic import ValidationError

    from posttrain.domain.recipes import TrainerSpec, recipe_error
    from posttrain.trainer.errors import TrainerConfigError

    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    try:
        return TrainerSpec.model_validate_json(text)
    except ValidationError as exc:
        raise TrainerConfigError(f"the spec file {path} is not a trainer spec: {recipe_error(exc).detail}") from None


def _failure_code(exc: Exception) -> FailureCode:
    """The ``FailureCode`` a failure reports: the trainer's own errors name theirs."""
    from posttrain.trainer.errors import TrainerError
    from posttrain.trainer.formats import RowFormatError

    if isinstance(exc, TrainerError):
        return exc.code
    if isinstance(exc, RowFormatError):
        return FailureCode.BAD_ROW
    # torch's (CUDA or CPU allocator) OOM; a failure before torch was imported is none. Not imported
    # here: a bad row fails before the slow imports, and its failed event should not wait for them.
    torch = sys.modules.get("torch")
    if isinstance(exc, MemoryError) or (torch is not None and isinstance(exc, torch.OutOfMemoryError)):
        return FailureCode.OUT_OF_MEMORY
    return FailureCode.ERROR


if __name__ == "__main__":
    sys.exit(main())
