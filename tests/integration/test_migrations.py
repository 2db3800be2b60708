"""The Alembic revisions against ``store/tables.py`` on real databases (SQLite, and PostgreSQL
when configured): migrating an empty database gives exactly the declared tables, and a database
written by an older revision keeps every job, checkpoint and event through the upgrade."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import text

from posttrain.domain.jobs import JobKind, JobStatus
from posttrain.domain.recipes import JobPlan, Recipe
from posttrain.errors import DuplicateJob
from posttrain.store.engine import alembic_config, at_head, make_engine, migrate
from posttrain.store.jobs import JobStore, new_job_id
from posttrain.store.tables import metadata


@pytest.fixture
def engine(database_url):
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


def _schema_differences(engine) -> list:
    with engine.connect() as conn:
        return compare_metadata(MigrationContext.configure(conn), metadata)


def test_the_migrations_create_exactly_the_declared_tables(engine):
    migrate(engine)
    assert at_head(engine)
    assert _schema_differences(engine) == []


def _old_plan(method: str, algorithm, *, logger=None) -> dict:
    """A plan as the service wrote it before 0003: the Llama Stack request's configs, defaults filled."""
    return {"method": method, "model": "/models/tiny", "adapter": None, "output_dir": "/jobs/x/checkpoints",
            "train_rows_path": "/jobs/x/train.jsonl", "validation_rows_path": None,
            "training_config": {"n_epochs": 2, "max_steps_per_epoch": 3, "gradient_accumulation_steps": 1,
                                "max_validation_steps": 1,
                                "data_config": {"packed": False, "train_on_input": False, "dataset_id": "toy",
                                                "batch_size": 2, "shuffle": True, "data_format": "instruct"},
                                "optimizer_config": {"optimizer_type": "adamw", "lr": 0.001, "weight_decay": 0.0,
                                                     "num_warmup_steps": 0},
                                "efficiency_config": {"enable_activation_checkpointing": True}, "dtype": "bf16"},
            "algorithm_config": algorithm, "logger_config": logger, "seed": 42}


OLD_LORA = {"use_dora": False, "quantize_base": False, "type": "LoRA", "lora_attn_modules": ["q_proj", "o_proj"],
            "apply_lora_to_mlp": True, "apply_lora_to_output": False, "rank": 4, "alpha": 8}
OLD_DPO_LORA = {"type": "LoRA", "lora_attn_modules": ["q_proj", "k_proj", "v_proj", "output_proj"],
                "apply_lora_to_mlp": False, "apply_lora_to_output": False, "rank": 8, "alpha": 16, "use_dora": False,
                "quantize_base": False}
OLD_PLANS = {
    "sft-lora": _old_plan("sft", OLD_LORA, logger={"type": "tensorboard"}),
    "sft-full": _old_plan("sft", None),
    "sft-qat": _old_plan("sft", {"type": "QAT", "quantizer_name": "8da4w", "group_size": 32}),
    "dpo": _old_plan("dpo", {"beta": 0.2, "loss_type": "ipo", "lora": OLD_DPO_LORA}),
    "dpo-legacy": _old_plan("dpo", {"beta": 0.1, "loss_type": "sigmoid", "lora": OLD_DPO_LORA,
                                    "legacy_config": {"reward_scale": 1.0, "reward_clip": 5.0, "epsilon": 0.1,
                                                      "gamma": 0.99}}),
}


def _write_plans_as_revision_0002_did(engine) -> None:
    now = datetime(2026, 11, 30, tzinfo=UTC)
    with engine.begin() as conn:
        for name, plan in OLD_PLANS.items():
            conn.execute(text("INSERT INTO jobs (id, job_uuid, tenant, kind, status, request, plan, scheduled_at, "
                              "attempt, max_attempts, cancel_requested, resources) VALUES (:id, :id, 'a', :kind, "
                              "'scheduled', '{}', :plan, :now, 0, 1, false, '{}')"),
                         {"id": name, "kind": plan["method"], "plan": json.dumps(plan), "now": now})


def test_plans_written_before_typed_recipes_are_rewritten_and_round_trip(engine):
    migrate(engine, "0002")
    _write_plans_as_revision_0002_did(engine)
    migrate(engine)
    store = JobStore(engine)
    plans = {name: store.get(job_id=name).plan for name in OLD_PLANS}
    assert all(isinstance(plan, JobPlan) and isinstance(plan.recipe, Recipe) for plan in plans.values())
    lora = plans["sft-lora"].recipe
    assert lora.adapter.attention == ("q_proj", "output_proj") and lora.adapter.mlp and lora.adapter.rank == 4
    assert lora.tensorboard and lora.activation_checkpointing and lora.schedule.n_epochs == 2
    assert lora.optimizer.lr == 0.001 and lora.data.batch_size == 2 and lora.seed == 42
    assert plans["sft-full"].recipe.adapter is None and plans["sft-full"].recipe.qat is None
    assert plans["sft-qat"].recipe.qat.group_size == 32 and plans["sft-qat"].recipe.adapter is None
    dpo = plans["dpo"].recipe
    assert (dpo.dpo.beta, dpo.dpo.loss_type) == (0.2, "ipo") and not dpo.adapter.architecture_defaults
    assert dpo.adapter.attention == ("q_proj", "k_proj", "v_proj", "output_proj") and dpo.notes == ()
    assert "reward_scale" in plans["dpo-legacy"].recipe.notes[0]
    assert plans["sft-lora"].model == "/models/tiny" and plans["sft-lora"].train_rows_path == "/jobs/x/train.jsonl"
    # The queued jobs still run after the upgrade.
    claimed = store.claim_next(owner="w", lease_seconds=30)
    assert claimed.plan == plans[claimed.id]

    config = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, "0002")
    with engine.connect() as conn:
        rows = dict(conn.execute(text("SELECT id, plan FROM jobs")).all())
    back = {name: json.loads(plan) if isinstance(plan, str) else plan for name, plan in rows.items()}
    expected = json.loads(json.dumps(OLD_PLANS))
    for plan in expected.values():  # the downgrade writes the defaults the old service filled in anyway
        plan["training_config"]["data_config"].pop("dataset_id")
        if plan["method"] == "dpo":
            plan["algorithm_config"].pop("legacy_config", None)
    expected["sft-lora"]["algorithm_config"]["lora_attn_modules"] = ["q_proj", "output_proj"]
    assert back == expected


def _write_jobs_as_revision_0001_did(engine) -> None:
    """Two jobs of tenant "a", one with a checkpoint, written with 0001's columns (job_uuid the key)."""
    now = datetime(2026, 11, 27, tzinfo=UTC)
    job = dict(tenant="a", kind="sft", request="{}", plan=json.dumps(OLD_PLANS["sft-lora"]), scheduled_at=now, attempt=1,
               max_attempts=2, cancel_requested=False, resources="{}")
    with engine.begin() as conn:
        for job_uuid, status in (("old-1", "completed"), ("old-2", "scheduled")):
            conn.execute(text("INSERT INTO jobs (job_uuid, tenant, kind, status, request, plan, scheduled_at, attempt, "
                              "max_attempts, cancel_requested, resources) VALUES (:job_uuid, :tenant, :kind, :status, "
                              ":request, :plan, :scheduled_at, :attempt, :max_attempts, :cancel_requested, :resources)"),
                         {**job, "job_uuid": job_uuid, "status": status})
            conn.execute(text("INSERT INTO job_events (job_uuid, created_at, type, data) "
                              "VALUES (:job_uuid, :now, 'state', :data)"),
                         {"job_uuid": job_uuid, "now": now, "data": f'{{"status": "{status}"}}'})
        conn.execute(text("INSERT INTO checkpoints (job_uuid, identifier, epoch, step, path, created_at, train_loss, "
                          "validation_loss, perplexity) VALUES ('old-1', 'old-1-epoch-1', 1, 8, '/data/old-1', :now, "
                          "1.5, 1.25, 3.49)"), {"now": now})


def test_jobs_written_before_per_tenant_job_uuids_survive_the_upgrade(engine):
    migrate(engine, "0001")
    _write_jobs_as_revision_0001_did(engine)
    migrate(engine)
    assert _schema_differences(engine) == []
    store = JobStore(engine)

    old = store.find(tenant="a", job_uuid="old-1")
    assert old.status is JobStatus.COMPLETED and old.id == "old-1"  # existing jobs keep job_uuid as their key
    (checkpoint,) = old.checkpoints
    assert (checkpoint.identifier, checkpoint.step, checkpoint.job_uuid) == ("old-1-epoch-1", 8, "old-1")
    assert checkpoint.metrics.validation_loss == 1.25
    assert [e.data for e in store.events(job_id=old.id)] == [{"status": "completed"}]
    assert store.find_checkpoint(tenant="a", reference="/data/old-1").identifier == "old-1-epoch-1"

    # The queued job still runs; another tenant may now use the same name; the owner still may not.
    assert store.claim_next(owner="w", lease_seconds=30).job_uuid == "old-2"
    plan = store.get(job_id="old-2").plan
    other = store.create(job_id=new_job_id(), job_uuid="old-1", tenant="b", kind=JobKind.SFT, request={}, plan=plan,
                         max_attempts=1)
    assert other.id != old.id and store.find(tenant="b", job_uuid="old-1").checkpoints == ()
    with pytest.raises(DuplicateJob):
        store.create(job_id=new_job_id(), job_uuid="old-1", tenant="a", kind=JobKind.SFT, request={}, plan=plan,
                     max_attempts=1)

    # Deleting a job still takes its checkpoints and events with it (the foreign keys came back).
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM jobs WHERE id = 'old-1'"))
        assert conn.execute(text("SELECT count(*) FROM checkpoints")).scalar_one() == 0
        assert conn.execute(text("SELECT count(*) FROM job_events WHERE job_id = 'old-1'")).scalar_one() == 0


def test_the_upgrade_can_be_rolled_back_while_job_uuids_are_still_unique(engine):
    migrate(engine, "0001")
    _write_jobs_as_revision_0001_did(engine)
    migrate(engine)
    config = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, "0001")
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT c.identifier, j.job_uuid FROM checkpoints c "
                                 "JOIN jobs j ON j.job_uuid = c.job_uuid")).all()
        assert [tuple(r) for r in rows] == [("old-1-epoch-1", "old-1")]
        assert conn.execute(text("SELECT count(*) FROM job_events")).scalar_one() == 2
    migrate(engine)
    assert _schema_differences(engine) == []
    assert JobStore(engine).find(tenant="a", job_uuid="old-1").checkpoints[0].step == 8
