"""The job's Weights & Biases run: the trainer's metric and checkpoint events, logged to W&B.

The recipe's ``wandb`` section (OpenAI's ``integrations: [{"type": "wandb", ...}]``) names the run;
the worker's ``POSTTRAIN_WANDB_MODE`` (in the ``TrainerSpec``) decides where it goes: files under
``POSTTRAIN_WANDB_DIR`` (offline, for ``wandb sync``) or the W&B server (online). Like the
TensorBoard log it wraps the Reporter, so every protocol event is forwarded unchanged and the
numbers in W&B are the job's own events.

The run's id is the job's id with ``resume="allow"``: a job resumed after a pause or a lost worker
continues the same run. W&B is never allowed to fail the training: wandb missing on this worker, no
network, no login, a full disk — the first failure is one ``warning`` event in the job's log, and
the job trains on without the run.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

from posttrain.domain.protocol import CheckpointWritten, LogLine, Started, StepMetric, TrainerEvent
from posttrain.domain.recipes import TrainerSpec

#: How long ``wandb.init`` may wait for its service (online: the W&B server) before it gives up.
INIT_TIMEOUT_SECONDS = 60.0

#: Step fields under OpenAI's metric names; the x axis and the run's plan are not logged.
_STEP_NAMES = {"loss": "train_loss", "lr": "learning_rate"}
_NOT_LOGGED = {"step", "total_steps"}
_RUN_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def step_metrics(fields: dict[str, Any]) -> dict[str, float]:
    """A ``metric`` event's numbers: ``train_loss``, ``learning_rate`` and the rest by their own name."""
    logged = {}
    for name, value in fields.items():
        number = _number(value)
        if name not in _NOT_LOGGED and number is not None:
            logged[_STEP_NAMES.get(name, name)] = number
    return logged


def checkpoint_metrics(fields: dict[str, Any]) -> dict[str, float]:
    """A ``checkpoint`` event's losses and accuracies, as ``checkpoint/<name>`` (the epoch's
    ``train_loss``, ``validation_loss``, ``perplexity``, ``full_valid_loss``, ...)."""
    return {f"checkpoint/{name}": number for name, value in fields.items()
            if name not in ("step", "write_seconds") and (number := _number(value)) is not None}


def run_id(job_uuid: str) -> str:
    """The W&B run id: the job's id where W&B accepts it, else a digest of it (still one per job)."""
    if _RUN_ID.fullmatch(job_uuid):
        return job_uuid
    return "job-" + hashlib.sha256(job_uuid.encode()).hexdigest()[:32]


class WandbReporter:
    """A Reporter (same ``emit``/``log``) that also logs the run's numbers to a W&B run.

    The run opens at ``started``: the model loaded, the job about to train (a job stopped while
    loading opens no run). ``close`` finishes it on every way out of the trainer.
    """

    def __init__(self, reporter: Any, *, spec: TrainerSpec) -> None:
        assert spec.recipe.wandb is not None
        self._reporter = reporter
        self._spec = spec
        self._wandb = spec.recipe.wandb
        self._run: Any = None
        self._broken = False

    # -- the Reporter interface ------------------------------------------------------------------

    def emit(self, event: TrainerEvent) -> None:
        self._reporter.emit(event)
        if isinstance(event, Started):
            self._open()
        elif isinstance(event, StepMetric):
            self._log(step_metrics(event.to_dict()), step=event.step)
        elif isinstance(event, CheckpointWritten) and event.write_seconds is not None:
            # Without write_seconds it is a checkpoint an earlier attempt wrote and logged, re-sent on resume.
            self._log(checkpoint_metrics(event.to_dict()), step=event.step)

    def log(self, message: str, *, level: str = "info") -> None:
        self.emit(LogLine(message=message, level=level))

    def close(self, *, exit_code: int = 0) -> None:
        """Finish the run (its summary and files written, online: uploaded); ``exit_code`` 1 marks
        a run whose trainer failed."""
        if self._run is not None:
            run, self._run = self._run, None
            try:
                run.finish(exit_code=exit_code)
            except Exception as exc:  # noqa: BLE001 - W&B must not fail the job (see _give_up)
                self._give_up(exc)

    # -- the run ---------------------------------------------------------------------------------

    def _open(self) -> None:
        if self._broken or self._run is not None:
            return
        spec = self._spec
        if spec.wandb_mode == "off":
            self._give_up(None, "this worker's POSTTRAIN_WANDB_MODE is off")
            return
        try:
            import wandb  # only a job that asked for a run pays for the import
        except ImportError as exc:
            self._give_up(exc, "wandb is not installed on this worker")
            return
        folder = Path(spec.wandb_dir or Path(spec.plan.output_dir) / "wandb")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            self._run = wandb.init(
                mode=spec.wandb_mode, dir=str(folder), project=self._wandb.project, entity=self._wandb.entity,
                name=self._wandb.name or spec.job_uuid, tags=list(self._wandb.tags),
                id=run_id(spec.job_uuid), resume="allow", config=self._config(), reinit="create_new",
                # stdout is the protocol's and stays so (no console capture); no git or code
                # snapshot of the trainer's working folder, which is the server's, not the job's.
                settings=wandb.Settings(console="off", silent=True, disable_git=True, save_code=False,
                                        init_timeout=INIT_TIMEOUT_SECONDS),
            )
        except Exception as exc:  # noqa: BLE001 - W&B must not fail the job (see _give_up)
            self._give_up(exc)

    def _config(self) -> dict[str, Any]:
        """The run's config: the job's resolved recipe (epochs, batch size, learning rate, adapter,
        seed, ...), its base model and its id."""
        recipe = self._spec.recipe.model_dump(mode="json", exclude={"wandb", "notes"})
        return {**recipe, "job_id": self._spec.job_uuid, "base_model": Path(self._spec.plan.model).name}

    def _log(self, metrics: dict[str, float], *, step: int) -> None:
        if self._run is None or not metrics:
            return
        try:
            self._run.log(metrics, step=step)
        except Exception as exc:  # noqa: BLE001 - W&B must not fail the job (see _give_up)
            self._give_up(exc)

    def _give_up(self, exc: BaseException | None, why: str | None = None) -> None:
        """Say once, in the job's events, that the W&B run is off and why; train on without it."""
        run, self._run = self._run, None
        if run is not None:
            try:
                run.finish(exit_code=1)
            except Exception:  # noqa: BLE001, S110 - already giving up; the warning below says why
                pass
        if not self._broken:
            self._broken = True
            reason = why or f"{type(exc).__name__}: {exc}"
            self._reporter.log(f"the job's Weights & Biases run ({self._wandb.project}) is off from here: "
                               f"{reason}", level="warning")


def reporter_for(spec: TrainerSpec, reporter: Any) -> Any:
    """``reporter`` itself, or wrapped in a W&B run when the recipe asks for one."""
    if spec.recipe.wandb is None:
        return reporter
    return WandbReporter(reporter, spec=spec)
