"""The search driver: runs one hyperparameter search (a parent job) by queueing its trials as
ordinary child jobs and pruning the ones not worth finishing.

A search is claimed like any job, by any worker's scheduler, which runs this driver in a thread
in place of a trainer (it takes no slot: the trials do, on whichever workers claim them). The
driver holds the parent's lease as a launcher holds a job's; a worker lost mid-search lets the
lease expire, the parent is requeued, and the next driver carries on.

The store is the search's only record. Each tick the driver rebuilds an in-memory Optuna study
from the trials' stored values (``search.params``) and per-epoch metrics (their checkpoint
events), so a restart loses nothing; it asks Optuna for trial ``n`` with a sampler seeded by
``seed + n``, so a driver that died between asking and queueing asks again for the same values.
A trial is named ``<parent job_uuid>.trial-<n>``, unique per tenant, so no trial is queued twice.

Pruning: Optuna's ``MedianPruner`` judges each running trial's newest epoch metric against the
finished trials' at the same epoch; a trial it prunes is cancelled with the error code ``pruned``.
When every trial has ended, the best finished trial's checkpoints become the parent's.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from pathlib import Path
from typing import Any, TypedDict

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState, create_trial

from posttrain.domain.jobs import Job, JobStatus
from posttrain.domain.pins import pin_folder, pin_problem
from posttrain.domain.protocol import FailureCode
from posttrain.domain.search import Choice, IntRange, LogUniform, SearchConfig, apply
from posttrain.errors import DuplicateJob, LeaseLost, StoreUnavailable, TransitionRefused
from posttrain.store.jobs import JobStore, new_job_id

log = logging.getLogger("posttrain.worker")
optuna.logging.set_verbosity(optuna.logging.WARNING)

#: The error code of a trial the pruner stopped (its status is ``cancelled``).
PRUNED = "pruned"


def trial_uuid(parent: Job, number: int) -> str:
    return f"{parent.job_uuid}.trial-{number}"


def distributions(config: SearchConfig) -> dict[str, BaseDistribution]:
    """Optuna's distribution for each searched request path."""
    made: dict[str, BaseDistribution] = {}
    for path, param in config.search_space.items():
        if isinstance(param, Choice):
            made[path] = CategoricalDistribution(list(param.values))
        elif isinstance(param, IntRange):
            made[path] = IntDistribution(param.low, param.high, step=param.step, log=param.log)
        else:
            made[path] = FloatDistribution(param.low, param.high, log=isinstance(param, LogUniform))
    return made


def epoch_values(config: SearchConfig, metrics: dict[int, dict[str, Any]]) -> dict[int, float]:
    """A trial's metric per epoch, where it reported a number."""
    return {epoch: float(data[config.metric]) for epoch, data in sorted(metrics.items())
            if isinstance(data.get(config.metric), int | float)}


def frozen(config: SearchConfig, trial: Job, values: dict[int, float]) -> FrozenTrial | None:
    """The Optuna record of one stored trial; None while it has not ended."""
    params = (trial.search or {}).get("params", {})
    common: dict[str, Any] = dict(params=params, distributions=distributions(config), intermediate_values=values)
    if trial.status is JobStatus.COMPLETED and values:
        return create_trial(state=TrialState.COMPLETE, value=values[max(values)], **common)
    if trial.error_code == PRUNED:
        return create_trial(state=TrialState.PRUNED, **common)
    if trial.is_terminal:
        return create_trial(state=TrialState.FAIL, **common)
    return None


def study_of(config: SearchConfig, trials: list[Job], metrics: dict[str, dict[int, float]],
             seed: int) -> optuna.Study:
    """An in-memory study holding every ended trial, its sampler seeded with ``seed``."""
    sampler: optuna.samplers.BaseSampler
    if config.sampler == "random":
        sampler = optuna.samplers.RandomSampler(seed=seed)
    else:
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(1, min(10, config.num_trials // 2)))
    study = optuna.create_study(direction="minimize" if config.mode == "min" else "maximize", sampler=sampler)
    for trial in trials:
        record = frozen(config, trial, metrics[trial.id])
        if record is not None:
            study.add_trial(record)
    return study


def pruner_of(config: SearchConfig) -> optuna.pruners.BasePruner | None:
    if config.pruner == "none":
        return None
    return optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=config.prune_after_epochs)


def set_path(request: dict[str, Any], path: str, value: Any) -> None:
    """Put ``value`` at the dotted ``path`` of a request body (the trial's record of what it ran)."""
    node = request
    *parents, last = path.split(".")
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[last] = value


class _Held(TypedDict):
    job_id: str
    owner: str
    attempt: int


class SearchFailed(Exception):
    """The search cannot go on (a trial's name is taken, its folder was swapped): fail the parent."""

    def __init__(self, code: FailureCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class SearchDriver:
    """One search, one thread (``run``), holding the parent job's lease until it ends."""

    gpu: str | None = None  # the scheduler gives drivers no GPU

    def __init__(self, *, job: Job, owner: str, store: JobStore, lease_seconds: float, tick_seconds: float) -> None:
        assert job.search is not None and job.plan is not None, "a claimed search is read with its config and plan"
        self.job = job
        self.owner = owner
        self.store = store
        self.attempt = job.attempt
        self.lease_seconds = lease_seconds
        self.tick_seconds = tick_seconds
        self.config = SearchConfig.model_validate(job.search)
        self._shutdown = threading.Event()
        self._reported: dict[str, Any] | None = None

    def request_shutdown(self) -> None:
        """The worker is stopping: give the search back to the queue (its trials go on)."""
        self._shutdown.set()

    def run(self) -> None:
        lease = _Held(job_id=self.job.id, owner=self.owner, attempt=self.attempt)
        try:
            while True:
                if self._shutdown.is_set():
                    self.store.release(**lease, reason="worker shut down", count_attempt=False)
                    return
                try:
                    status = self.store.renew_lease(**lease, lease_seconds=self.lease_seconds)
                    if status is JobStatus.PAUSING:
                        self.store.park(**lease, reason="search paused; its running trials go on")
                        return
                    if self.tick():
                        return
                except StoreUnavailable as exc:  # the lease still runs: try again next tick
                    log.warning("search %s waits for the store: %s", self.job.job_uuid, exc,
                                extra={"action": "store_unavailable", "job_id": self.job.id})
                self._shutdown.wait(self.tick_seconds)
        except LeaseLost:
            log.info("search %s moved on", self.job.job_uuid, extra={"action": "search_stopped", "job_id": self.job.id})
        except SearchFailed as exc:
            self._end(JobStatus.FAILED, exc.code.value, str(exc))
            for trial in self.store.trials(parent_job_id=self.job.id):  # none trains on for a failed search
                if not trial.is_terminal:
                    try:
                        self.store.cancel(job_id=trial.id, reason=f"its search failed: {exc}")
                    except TransitionRefused:
                        pass
        except Exception as exc:
            log.exception("search driver failed for %s", self.job.job_uuid, extra={"action": "search_failed"})
            try:
                self.store.release(**lease, reason=f"search driver error: {exc}")
            except LeaseLost:
                pass

    # -- one tick -------------------------------------------------------------------------------

    def tick(self) -> bool:
        """Prune, queue what is due, report; True once the search has ended."""
        config = self.config
        trials = self.store.trials(parent_job_id=self.job.id)
        metrics = {job_id: epoch_values(config, m)
                   for job_id, m in self.store.epoch_metrics(job_ids=[t.id for t in trials]).items()}
        study = study_of(config, trials, metrics, seed=config.seed + len(trials))
        self._prune(study, trials, metrics)
        open_trials = sum(1 for t in trials if not t.is_terminal)
        while len(trials) < config.num_trials and open_trials < config.max_concurrent_trials:
            study = study_of(config, trials, metrics, seed=config.seed + len(trials))
            params = study.ask(distributions(config)).params
            trial = self._queue(len(trials), params)
            trials.append(trial)
            metrics[trial.id] = {}
            open_trials += 1
        summary = self._summary(self.store.trials(parent_job_id=self.job.id), metrics)
        if summary != self._reported:
            self.store.set_resources(job_id=self.job.id, owner=self.owner, attempt=self.attempt,
                                     resources={"search": summary})
            self._reported = summary
        if len(trials) < config.num_trials or any(not t.is_terminal for t in self.store.trials(parent_job_id=self.job.id)):
            return False
        self._finish(summary)
        return True

    def _prune(self, study: optuna.Study, trials: list[Job], metrics: dict[str, dict[int, float]]) -> None:
        pruner = pruner_of(self.config)
        if pruner is None:
            return
        for trial in trials:
            values = metrics[trial.id]
            if trial.status is not JobStatus.IN_PROGRESS or not values:
                continue
            record = create_trial(state=TrialState.RUNNING, params=(trial.search or {}).get("params", {}),
                                  distributions=distributions(self.config), intermediate_values=values)
            if not pruner.prune(study, record):
                continue
            epoch = max(values)
            reason = (f"pruned after epoch {epoch}: its {self.config.metric} {values[epoch]:.6g} is worse than the "
                      f"median of the finished trials at that epoch")
            try:
                self.store.prune(job_id=trial.id, reason=reason)
            except TransitionRefused:
                continue  # it ended meanwhile
            log.info("trial %s %s", trial.job_uuid, reason, extra={"action": "trial_pruned", "job_id": trial.id})

    def _queue(self, number: int, params: dict[str, Any]) -> Job:
        """Queue trial ``number``: the parent's plan with ``params`` in its recipe, its own folder
        for the rows and resume points, and its checkpoints under the parent's output folder."""
        parent, plan = self.job, self.job.plan
        assert plan is not None
        output_pin = next((p for p in plan.pins if p.role == "output_dir"), None)
        problem = pin_problem(output_pin) if output_pin is not None else None
        if problem:
            raise SearchFailed(FailureCode.PATH_CHANGED, problem)
        folder = Path(plan.train_rows_path).parent / "trials" / f"trial-{number}"
        folder.mkdir(parents=True, exist_ok=True)
        train_rows = _linked(Path(plan.train_rows_path), folder / "train.jsonl")
        validation_rows = (_linked(Path(plan.validation_rows_path), folder / "validation.jsonl")
                           if plan.validation_rows_path else None)
        output = Path(plan.output_dir) / f"trial-{number}"
        output.mkdir(exist_ok=True)
        if os.path.realpath(output) != str(output) or output.is_symlink():
            raise SearchFailed(FailureCode.PATH_CHANGED, f"the trial's checkpoint folder {output} is not a plain folder")
        pins = [p for p in plan.pins if p.role != "output_dir"]
        pins.append(pin_folder(output, role="output_dir", within=(str(output),),
                               not_within=output_pin.not_within if output_pin else (),
                               but_within=output_pin.but_within if output_pin else ()))
        trial_plan = plan.model_copy(update=dict(
            recipe=apply(plan.recipe, params), output_dir=str(output), train_rows_path=str(train_rows),
            validation_rows_path=str(validation_rows) if validation_rows else None, pins=tuple(pins)))
        name = trial_uuid(parent, number)
        request = {**parent.request, "job_uuid": name}
        request.pop("hyperparam_search_config", None)
        for path, value in params.items():
            set_path(request, path, value)
        try:
            trial = self.store.create(job_id=new_job_id(), job_uuid=name, tenant=parent.tenant, kind=parent.kind,
                                      request=request, plan=trial_plan, max_attempts=parent.max_attempts,
                                      parent_job_id=parent.id, search={"trial": number, "params": params})
        except DuplicateJob:
            existing = self.store.find(tenant=parent.tenant, job_uuid=name)
            if existing is not None and existing.parent_job_id == parent.id:
                return existing  # a driver before this one queued it just now
            raise SearchFailed(FailureCode.ERROR, f"trial {number} cannot be queued: this tenant already has a job "
                                                  f"named '{name}'") from None
        log.info("queued trial %s with %s", name, params, extra={"action": "trial_queued", "job_id": trial.id})
        # Cancelled meanwhile: the cancel may not have seen this trial, so it goes too.
        try:
            self.store.renew_lease(job_id=parent.id, owner=self.owner, attempt=self.attempt,
                                   lease_seconds=self.lease_seconds)
        except LeaseLost:
            try:
                self.store.cancel(job_id=trial.id, reason="its search was cancelled")
            except TransitionRefused:
                pass
            raise
        return trial

    # -- what the parent shows, and its end -------------------------------------------------------

    def _summary(self, trials: list[Job], metrics: dict[str, dict[int, float]]) -> dict[str, Any]:
        rows = []
        for trial in trials:
            values = metrics.get(trial.id, {})
            rows.append({
                "number": (trial.search or {}).get("trial"),
                "job_uuid": trial.job_uuid,
                "status": PRUNED if trial.error_code == PRUNED else trial.status.value,
                "params": (trial.search or {}).get("params", {}),
                "metric": values[max(values)] if values else None,
                "epochs": {str(epoch): value for epoch, value in values.items()},
            })
        finished = [r for r in rows if r["status"] == JobStatus.COMPLETED.value and r["metric"] is not None]
        best = (min if self.config.mode == "min" else max)(finished, key=lambda r: r["metric"]) if finished else None
        return {
            "metric": self.config.metric, "mode": self.config.mode, "num_trials": self.config.num_trials,
            "max_concurrent_trials": self.config.max_concurrent_trials, "sampler": self.config.sampler,
            "pruner": self.config.pruner, "trials": rows,
            "best": {k: best[k] for k in ("number", "job_uuid", "params", "metric")} if best else None,
        }

    def _finish(self, summary: dict[str, Any]) -> None:
        best = summary["best"]
        if best is None:
            self._end(JobStatus.FAILED, FailureCode.ERROR.value,
                      f"none of the {len(summary['trials'])} trial(s) finished with a {self.config.metric}")
            return
        winner = self.store.find(tenant=self.job.tenant, job_uuid=best["job_uuid"])
        assert winner is not None
        for checkpoint in winner.checkpoints:  # the best trial's checkpoints are the search's
            metrics = checkpoint.metrics
            self.store.record_checkpoint(
                job_id=self.job.id, owner=self.owner, attempt=self.attempt, identifier=checkpoint.identifier,
                epoch=checkpoint.epoch, step=checkpoint.step, path=checkpoint.path,
                train_loss=metrics.train_loss if metrics else None,
                validation_loss=metrics.validation_loss if metrics else None,
                perplexity=metrics.perplexity if metrics else None)
        log.info("search %s won by %s", self.job.job_uuid, best["job_uuid"],
                 extra={"action": "search_completed", "job_id": self.job.id})
        self._end(JobStatus.COMPLETED)

    def _end(self, status: JobStatus, code: str | None = None, message: str | None = None) -> None:
        try:
            self.store.finish(job_id=self.job.id, owner=self.owner, attempt=self.attempt, status=status,
                              error_code=code, error_message=message)
        except LeaseLost:
            pass


def _linked(source: Path, target: Path) -> Path:
    """``target`` as a hard link to ``source`` (a copy across file systems): a trial's own rows,
    read-only, costing no space. Kept when a driver before this one already made it."""
    if not target.exists():
        try:
            os.link(source, target)
        except OSError:
            shutil.copyfile(source, target)
    return target
