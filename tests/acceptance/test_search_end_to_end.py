"""A 4-trial hyperparameter search on the tiny model through a real server and real trainers: the
trials are child jobs in the list, a trial with a learning rate too small to learn is pruned
early, the server is killed (SIGKILL) mid-search and a restarted one finishes the search with
nothing lost or queued twice, and the best trial's validation loss is at most the default
config's. The sampler is ``random`` with a seed picked so that trial 0 learns and a later trial
does not: which trial gets which value is then known, not hoped for."""

from __future__ import annotations

import os
import signal

import pytest

from posttrain.demo import colour_rows
from posttrain.domain.recipes import build_recipe
from posttrain.domain.search import parse_search
from posttrain.worker.search import distributions, study_of
from tests.conftest import start_server, stop_server
from tests.integration.test_api import lora_request

pytestmark = pytest.mark.slow

LR = "training_config.optimizer_config.lr"
GOOD_LR, USELESS_LR = 1e-3, 1e-9
#: An epoch of 24 steps takes ~0.7 s on the tiny model, several of the driver's 0.2 s ticks, so the
#: pruner sees a useless trial's first epoch before its last: at 4 steps (~0.12 s) a loaded machine
#: let one run all four epochs between two ticks and be pruned only after its last.
EPOCHS, STEPS = 4, 24
#: The driver ticks and launchers renew this often, so a pruned trial stops within its next epoch.
FAST = {"POSTTRAIN_HEARTBEAT_SECONDS": "0.2"}


def _search(seed: int) -> dict:
    return {"search_space": {"optimizer_config.lr": {"type": "choice", "values": [GOOD_LR, USELESS_LR]}},
            "num_trials": 4, "max_concurrent_trials": 2, "metric": "validation_loss", "mode": "min",
            "pruner": "median", "sampler": "random", "seed": seed}


def _seed_where_the_first_two_learn_and_a_later_one_does_not() -> int:
    recipe = build_recipe({"method": "sft", "adapter": {"attention": ["q_proj"]}})
    for seed in range(200):
        config = parse_search(_search(seed), recipe)
        picks = [study_of(config, [], {}, seed=seed + n).ask(distributions(config)).params[LR] for n in range(4)]
        # Trials 0 and 1 run together; 2 and 3 start once one of them has ended, so the median pruner
        # has a finished trial to compare a useless one with only from trial 2 on.
        if picks[0] == picks[1] == GOOD_LR and USELESS_LR in picks[2:]:
            return seed
    raise AssertionError("no such seed")


def _body(server, **overrides) -> dict:
    body = lora_request(str(server.tiny_model_path), "colours", **overrides)
    body["training_config"].update(n_epochs=EPOCHS, max_steps_per_epoch=STEPS)
    body["training_config"]["optimizer_config"]["lr"] = GOOD_LR
    return body


def test_a_search_prunes_survives_a_server_kill_and_beats_the_default(tmp_path, tiny_model_path):
    seed = _seed_where_the_first_two_learn_and_a_later_one_does_not()
    server = start_server(tmp_path, tiny_model_path, extra_env=FAST)
    restarted = None
    try:
        server.post("/v1/datasets", json={"purpose": "post-training/messages", "dataset_id": "colours",
                                          "source": {"type": "rows", "rows": colour_rows(repeat=16)}})
        default = _body(server)
        search = _body(server, hyperparam_search_config=_search(seed))
        for body in (default, search):
            response = server.post("/v1/post-training/supervised-fine-tune", json=body)
            assert response.status_code == 200, response.text
        parent = search["job_uuid"]
        trial_names = [f"{parent}.trial-{n}" for n in range(4)]

        # Kill the server once the search has queued trials and trial 0 is part-trained.
        server.wait_for_job(trial_names[0], lambda s: s["status"] == "in_progress" and s["checkpoints"], timeout=600)
        assert server.job_status(parent)["status"] == "in_progress"
        server.process.send_signal(signal.SIGKILL)
        server.process.wait()
        restarted = start_server(tmp_path, tiny_model_path, extra_env=FAST)
        final = restarted.wait_for_job(parent, lambda s: s["status"] in ("completed", "failed", "cancelled"), timeout=900)
        assert final["status"] == "completed", final

        listed = [j["job_uuid"] for j in restarted.get("/v1/post-training/jobs").json()["data"]]
        assert sorted(name for name in listed if name.startswith(parent + ".")) == trial_names  # none twice
        summary = final["resources_allocated"]["search"]
        assert [t["job_uuid"] for t in summary["trials"]] == trial_names
        by_name = {t["job_uuid"]: t for t in summary["trials"]}
        useless = [t for t in summary["trials"] if t["params"][LR] == USELESS_LR]
        assert useless and all(t["status"] == "pruned" for t in useless), summary
        assert all(len(t["epochs"]) < EPOCHS for t in useless), "pruned early, before its last epoch"
        for trial in useless:
            status = restarted.job_status(trial["job_uuid"])
            assert status["status"] == "cancelled"
        best = summary["best"]
        assert best["params"][LR] == GOOD_LR and by_name[best["job_uuid"]]["status"] == "completed"
        # The search's checkpoints are its best trial's.
        best_status = restarted.job_status(best["job_uuid"])
        assert [c["identifier"] for c in final["checkpoints"]] == [c["identifier"] for c in best_status["checkpoints"]]
        assert final["checkpoints"][-1]["path"].startswith(os.path.dirname(best_status["checkpoints"][-1]["path"]))

        default_final = restarted.wait_for_job(default["job_uuid"], lambda s: s["status"] == "completed", timeout=600)
        default_loss = default_final["checkpoints"][-1]["training_metrics"]["validation_loss"]
        assert best["metric"] <= default_loss * (1 + 1e-4) + 1e-6, (best, default_loss)
    finally:
        stop_server(restarted or server)
        if restarted is not None and server.process.poll() is None:
            stop_server(server)
