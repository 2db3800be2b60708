"""The search driver on a real store (SQLite and PostgreSQL): it queues trials as child jobs up to
``max_concurrent_trials``, prunes a trial whose epoch metric is worse than the finished trials'
median, survives a restart without losing or doubling a trial, ends with the best trial's
checkpoints, and a cancelled search takes its trials with it.

The test plays the worker that trains the trials: it claims them and records their epochs and
ends through the store's own launcher calls, so the metrics are exactly the ones it chooses.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from posttrain.domain.jobs import JobKind, JobStatus
from posttrain.domain.pins import pin_folder
from posttrain.domain.recipes import JobPlan, build_recipe
from posttrain.domain.search import parse_search
from posttrain.store.jobs import JobStore, new_job_id
from posttrain.worker.search import SearchDriver

SEARCH = {"search_space": {"optimizer_config.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-1},
                           "algorithm_config.rank": {"type": "choice", "values": [4, 8, 16]}},
          "num_trials": 4, "max_concurrent_trials": 2, "metric": "validation_loss", "mode": "min",
          "pruner": "median", "seed": 0}


def _parent(store: JobStore, tmp_path: Path, search: dict = SEARCH):
    folder = tmp_path / "jobs" / "parent"
    output = folder / "checkpoints"
    output.mkdir(parents=True)
    (folder / "train.jsonl").write_text('{"input_query": "q", "expected_answer": "a"}\n')
    recipe = build_recipe({"method": "sft", "adapter": {"attention": ["q_proj"], "rank": 8, "alpha": 16}})
    config = parse_search(search, recipe)
    assert config is not None
    plan = JobPlan(recipe=recipe, model=str(tmp_path / "model"), output_dir=str(output),
                   train_rows_path=str(folder / "train.jsonl"),
                   pins=(pin_folder(output, role="output_dir", within=(str(output),)),))
    request = {"job_uuid": "hp", "model": "tiny", "hyperparam_search_config": search,
               "training_config": {"optimizer_config": {"lr": 1e-3}}}
    store.create(job_id=new_job_id(), job_uuid="hp", tenant="t", kind=JobKind.SFT, request=request, plan=plan,
                 max_attempts=3, search=config.model_dump(mode="json"))


def _driver(store: JobStore, owner: str) -> SearchDriver:
    job = store.claim_next(owner=owner, lease_seconds=30)
    assert job is not None and job.job_uuid == "hp", job
    return SearchDriver(job=job, owner=owner, store=store, lease_seconds=30, tick_seconds=0.05)


def _train(store: JobStore, job_uuid: str, losses: list[float], *, finish: bool) -> None:
    """Claim the trial (the oldest scheduled job) and record one checkpoint per epoch loss."""
    job = store.claim_next(owner="w", lease_seconds=30)
    assert job is not None and job.job_uuid == job_uuid, job
    for epoch, loss in enumerate(losses, start=1):
        store.record_checkpoint(job_id=job.id, owner="w", attempt=job.attempt, identifier=f"{job_uuid}-epoch-{epoch}",
                                epoch=epoch, step=epoch * 2, path=str(Path(job.plan.output_dir) / f"epoch_{epoch}"),
                                train_loss=loss, validation_loss=loss, perplexity=2.0)
    if finish:
        store.finish(job_id=job.id, owner="w", attempt=job.attempt, status=JobStatus.COMPLETED)


def _trials(store: JobStore, parent_uuid: str = "hp"):
    parent = store.find(tenant="t", job_uuid=parent_uuid)
    return parent, store.trials(parent_job_id=parent.id)


def test_a_search_queues_prunes_survives_a_restart_and_ends_with_the_best_trial(store, tmp_path):
    _parent(store, tmp_path)
    driver = _driver(store, "driver-1")
    assert driver.tick() is False
    parent, trials = _trials(store)
    assert [t.job_uuid for t in trials] == ["hp.trial-0", "hp.trial-1"]  # max_concurrent_trials
    for number, trial in enumerate(trials):
        assert trial.parent_job_id == parent.id and trial.tenant == "t" and trial.kind is JobKind.SFT
        params = trial.search["params"]
        assert trial.search["trial"] == number
        assert 1e-4 <= params["training_config.optimizer_config.lr"] <= 1e-1
        assert params["algorithm_config.rank"] in (4, 8, 16)
        # The trial's recipe and request carry its values; its checkpoints go under the search's folder.
        assert trial.plan.recipe.optimizer.lr == params["training_config.optimizer_config.lr"]
        assert trial.plan.recipe.adapter.rank == params["algorithm_config.rank"]
        assert trial.request["algorithm_config"]["rank"] == params["algorithm_config.rank"]
        assert Path(trial.plan.output_dir).parent == Path(parent.plan.output_dir)
        assert Path(trial.plan.train_rows_path).read_text() == Path(parent.plan.train_rows_path).read_text()
    assert len({t.plan.train_rows_path for t in trials}) == 2  # each its own folder (its resume points too)
    assert [t["job_uuid"] for t in parent.resources["search"]["trials"]] == ["hp.trial-0", "hp.trial-1"]

    _train(store, "hp.trial-0", [1.0, 0.8], finish=True)
    _train(store, "hp.trial-1", [5.0], finish=False)  # far worse than trial 0 at epoch 1
    driver.tick()
    _, trials = _trials(store)
    bad = next(t for t in trials if t.job_uuid == "hp.trial-1")
    assert bad.status is JobStatus.CANCELLED and bad.error_code == "pruned" and "epoch 1" in bad.error_message
    while driver.tick() is False and len(_trials(store)[1]) < 4:
        pass
    parent, trials = _trials(store)
    assert [t.job_uuid for t in trials] == [f"hp.trial-{n}" for n in range(4)]
    shown = {t["job_uuid"]: t for t in parent.resources["search"]["trials"]}
    assert shown["hp.trial-1"]["status"] == "pruned" and shown["hp.trial-1"]["metric"] == 5.0
    assert parent.resources["search"]["best"]["job_uuid"] == "hp.trial-0"

    # The worker driving the search shuts down; another picks it up, rebuilds the study from the store
    # and queues nothing twice.
    driver.request_shutdown()
    driver.run()
    assert store.get(job_id=parent.id).status is JobStatus.SCHEDULED
    before = {t.job_uuid: t.search for t in trials}
    driver = _driver(store, "driver-2")
    assert driver.tick() is False
    _, trials = _trials(store)
    assert {t.job_uuid: t.search for t in trials} == before

    _train(store, "hp.trial-2", [0.9, 0.5], finish=True)
    _train(store, "hp.trial-3", [0.95, 0.85], finish=True)
    assert driver.tick() is True
    parent, trials = _trials(store)
    assert parent.status is JobStatus.COMPLETED
    best = parent.resources["search"]["best"]
    assert best["job_uuid"] == "hp.trial-2" and best["metric"] == 0.5
    assert best["params"] == next(t for t in trials if t.job_uuid == "hp.trial-2").search["params"]
    assert [c.identifier for c in parent.checkpoints] == ["hp.trial-2-epoch-1", "hp.trial-2-epoch-2"]
    # The models catalogue lists those checkpoints once, under the trial that wrote them.
    from posttrain.store.model_catalog import ModelCatalogStore

    catalogue = ModelCatalogStore(store.engine)
    assert "hp" not in [job.job_uuid for job in catalogue.jobs_with_checkpoints(tenant="t")]
    assert catalogue.job_of_checkpoint(tenant="t", identifier="hp.trial-2-epoch-2") == "hp.trial-2"


def test_trial_values_are_the_same_when_a_restarted_driver_asks_again(store, tmp_path):
    """Asking is seeded by the trial's number: a driver lost between asking and queueing would ask
    for the same values (and the store's unique name stops a second queueing)."""
    _parent(store, tmp_path)
    first = _driver(store, "driver-1")
    first.tick()
    _, trials = _trials(store)
    asked = [t.search["params"] for t in trials]
    # Forget the trials and ask from the same (empty) history again.
    from posttrain.worker.search import distributions, study_of
    again = [study_of(first.config, [], {}, seed=first.config.seed + n).ask(distributions(first.config)).params
             for n in range(2)]
    assert again == asked
    assert asked[0] != asked[1]


def test_cancelling_the_search_cancels_its_trials_and_stops_its_driver(store, tmp_path):
    _parent(store, tmp_path)
    driver = _driver(store, "driver-1")
    driver.tick()
    _train(store, "hp.trial-0", [1.0], finish=False)  # one running, one still queued
    thread = threading.Thread(target=driver.run)
    thread.start()
    parent, _ = _trials(store)
    store.cancel(job_id=parent.id)
    thread.join(timeout=10)
    assert not thread.is_alive()
    parent, trials = _trials(store)
    assert parent.status is JobStatus.CANCELLED
    assert [t.status for t in trials] == [JobStatus.CANCELLED, JobStatus.CANCELLED]
    assert len(trials) == 2  # no trial queued after the cancel


@pytest.mark.parametrize("losses", [[float("nan")]])
def test_a_search_whose_trials_all_fail_fails(store, tmp_path, losses):
    _parent(store, tmp_path, {**SEARCH, "num_trials": 1, "max_concurrent_trials": 1})
    driver = _driver(store, "driver-1")
    driver.tick()
    job = store.claim_next(owner="w", lease_seconds=30)
    store.finish(job_id=job.id, owner="w", attempt=job.attempt, status=JobStatus.FAILED, error_code="error",
                 error_message="boom")
    assert driver.tick() is True
    parent, _ = _trials(store)
    assert parent.status is JobStatus.FAILED and "none of the 1 trial" in parent.error_message


def test_a_scheduler_with_every_slot_busy_still_drives_a_search(store, tmp_path, monkeypatch):
    """The driver takes no slot: a worker whose one slot trains a job still claims the search, and
    the trials it queues wait for a slot like any job."""
    from posttrain.worker.scheduler import Scheduler
    from tests.worker_helpers import launch_config, stand_in_importable, submit, wait_for

    stand_in_importable(monkeypatch)
    busy = submit(store, tmp_path / "busy", "runs-busy")
    _parent(store, tmp_path)
    scheduler = Scheduler(store=store, slots=1, poll_seconds=0.05, config=launch_config(), owner="sched")
    scheduler.start()
    try:
        wait_for(lambda: len(_trials(store)[1]) == 2, timeout=20, what="the search's first two trials")
        parent, trials = _trials(store)
        assert store.get(job_id=busy.id).status is JobStatus.IN_PROGRESS
        assert parent.status is JobStatus.IN_PROGRESS and parent.lease_owner == "sched"
        assert [t.status for t in trials] == [JobStatus.SCHEDULED, JobStatus.SCHEDULED]
        store.cancel(job_id=parent.id)
        wait_for(lambda: all(t.status is JobStatus.CANCELLED for t in _trials(store)[1]), what="the trials cancelled")
    finally:
        store.cancel(job_id=busy.id)
        scheduler.stop(timeout=10)


def test_a_trial_name_the_tenant_already_uses_fails_the_search_and_leaves_that_job_alone(store, tmp_path):
    _parent(store, tmp_path)
    from tests.plans import a_plan

    store.create(job_id=new_job_id(), job_uuid="hp.trial-1", tenant="t", kind=JobKind.SFT, request={},
                 plan=a_plan(), max_attempts=1)
    driver = _driver(store, "driver-1")
    driver.run()
    parent = store.find(tenant="t", job_uuid="hp")
    assert parent.status is JobStatus.FAILED and "hp.trial-1" in parent.error_message
    assert store.find(tenant="t", job_uuid="hp.trial-1").status is JobStatus.SCHEDULED
    assert store.find(tenant="t", job_uuid="hp.trial-1").parent_job_id is None
    assert store.find(tenant="t", job_uuid="hp.trial-0").status is JobStatus.CANCELLED  # the search's own trial


def test_pausing_the_search_parks_its_driver_and_a_resume_carries_on(store, tmp_path):
    _parent(store, tmp_path)
    driver = _driver(store, "driver-1")
    driver.tick()
    parent, _ = _trials(store)
    assert store.pause(job_id=parent.id) is JobStatus.PAUSING
    driver.run()  # sees the pause at its next lease renewal
    parent, trials = _trials(store)
    assert parent.status is JobStatus.PAUSED and len(trials) == 2
    assert all(t.status is JobStatus.SCHEDULED for t in trials)  # the queued trials still run
    store.resume(job_id=parent.id)
    driver = _driver(store, "driver-2")
    _train(store, "hp.trial-0", [1.0], finish=True)
    driver.tick()
    assert [t.job_uuid for t in _trials(store)[1]] == ["hp.trial-0", "hp.trial-1", "hp.trial-2"]
