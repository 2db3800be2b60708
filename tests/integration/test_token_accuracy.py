"""OpenAI's training metrics, for real: the token accuracy is the argmax of the logits against the
next-token labels (shifted like the loss), a tiny SFT run on an OpenAI-format file reports it per
step and per checkpoint (with ``valid_*`` and ``full_valid_*`` from its validation file) and it
rises on a task the model can memorize; assistant turns weighted 0 get no labels."""

from __future__ import annotations

import json

import pytest

from posttrain.domain.openai_rows import check_fine_tuning_lines
from posttrain.domain.protocol import CheckpointWritten, StepMetric, parse_line
from posttrain.trainer.formats import IGNORE_INDEX, normalize_preference_row, tokenize_sft_row
from tests.integration import test_trainer_process as sft

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


def openai_lines() -> list[str]:
    """The colour task as an OpenAI supervised file; every fourth example has a weight-0 draft turn."""
    lines = []
    for index, row in enumerate(sft.colour_rows()):
        messages = [{"role": "user", "content": row["question"]}]
        if index % 4 == 0:
            messages += [{"role": "assistant", "content": "Let me think.", "weight": 0},
                         {"role": "user", "content": "Go on."}]
        lines.append(json.dumps({"messages": [*messages, {"role": "assistant", "content": row["answer"]}]}))
    return lines


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_path)


def test_weight_zero_turns_get_no_labels(tokenizer):
    [row] = check_fine_tuning_lines([json.dumps({"messages": [
        {"role": "user", "content": "What is the colour of the sky?"},
        {"role": "assistant", "content": "It is green.", "weight": 0},
        {"role": "user", "content": "Are you sure?"},
        {"role": "assistant", "content": "It is blue.", "weight": 1},
    ]})], "supervised")
    import copy

    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    for rendering in (tokenizer, plain):  # the chat template, and the plain fallback
        encoded = tokenize_sft_row(row, tokenizer=rendering, data_format="dialog", train_on_input=False,
                                   max_length=None, row_index=0)
        learned = [t for t, label in zip(encoded["input_ids"], encoded["labels"], strict=True) if label != IGNORE_INDEX]
        text = rendering.decode(encoded["input_ids"])
        assert "It is green." in text and "It is blue." in text
        assert rendering.decode(learned).strip().startswith("It is blue.")
        assert "green" not in rendering.decode(learned)


def test_token_accuracy_is_the_argmax_of_the_shifted_logits(tiny_model_path, tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    from posttrain.trainer import sft as trainer_sft
    from posttrain.trainer.batching import collate
    from posttrain.trainer.precision import resolve_precision

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()
    rows = check_fine_tuning_lines(openai_lines()[:4], "supervised")
    examples = [tokenize_sft_row(r, tokenizer=tokenizer, data_format="dialog", train_on_input=False, max_length=None,
                                 row_index=i) for i, r in enumerate(rows)]
    batch = collate(examples, pad_id=tokenizer.pad_token_id)
    with torch.no_grad():
        precision = resolve_precision(device="cpu", requested_dtype="fp32")
        loss_sum, hits = trainer_sft._loss_sum_and_hits(model, batch, precision=precision)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE_INDEX
    assert hits == int((logits.argmax(-1)[keep] == labels[keep]).sum())
    assert float(loss_sum) == pytest.approx(float(torch.nn.functional.cross_entropy(
        logits[keep], labels[keep], reduction="sum")), rel=1e-4)


@pytest.mark.slow
def test_a_tiny_run_reports_openai_metrics_that_rise(tiny_model_path, tmp_path):
    rows = check_fine_tuning_lines(openai_lines(), "supervised")
    # A full fine-tune: the tiny model's LoRA at the test's usual lr lowers the loss but keeps the
    # argmax where it was for the 16 steps here.
    spec = sft.make_spec(tmp_path, tiny_model_path, rows=rows, lora=False, data_config={
        "dataset_id": "toy", "batch_size": 4, "shuffle": True, "data_format": "dialog"})
    validation = tmp_path / "validation.jsonl"
    validation.write_text("".join(json.dumps(row) + "\n" for row in rows[:12]))
    events, code = sft.run(sft.with_spec_keys(spec, validation_rows_path=str(validation)), tmp_path)
    assert code == 0, (tmp_path / "stderr.txt").read_text()[-3000:]

    typed = [parse_line(json.dumps(e)) for e in events]
    metrics = [e for e in typed if isinstance(e, StepMetric)]
    assert len(metrics) == 16
    accuracies = [m.train_mean_token_accuracy for m in metrics]
    assert all(a is not None and 0 <= a <= 1 for a in accuracies)
    assert sum(accuracies[-3:]) / 3 > sum(accuracies[:3]) / 3 + 0.2, accuracies  # type: ignore[arg-type]
    # 16 steps: a validation batch on every step (every total_steps // 20, at least 1).
    assert all(m.valid_loss is not None and m.valid_loss > 0 for m in metrics)
    assert all(0 <= m.valid_mean_token_accuracy <= 1 for m in metrics)  # type: ignore[operator]

    checkpoints = [e for e in typed if isinstance(e, CheckpointWritten)]
    assert len(checkpoints) == 2
    for checkpoint in checkpoints:
        assert set(checkpoint.token_metrics()) == {"train_mean_token_accuracy", "valid_mean_token_accuracy",
                                                   "full_valid_loss", "full_valid_mean_token_accuracy"}
        assert all(0 <= checkpoint.token_metrics()[k] <= 1 for k in checkpoint.token_metrics() if "accuracy" in k)
    # max_validation_steps 2 of 3 validation batches: the full pass covers more than the sample.
    assert checkpoints[1].full_valid_loss != pytest.approx(checkpoints[1].validation_loss, rel=1e-6)
    assert checkpoints[1].full_valid_loss < checkpoints[0].full_valid_loss  # type: ignore[operator]
    assert checkpoints[1].train_mean_token_accuracy > checkpoints[0].train_mean_token_accuracy  # type: ignore[operator]
    assert checkpoints[1].train_mean_token_accuracy == pytest.approx(sum(accuracies[8:]) / 8)


def test_the_metric_fields_are_optional_on_the_wire():
    old_metric = {"event": "metric", "step": 1, "epoch": 1, "loss": 2.0, "lr": 0.1, "tokens_per_s": 5.0, "tokens": 9,
                  "padding_fraction": 0.0, "step_seconds": 1.0, "total_steps": 2, "reward_margin": 0.5}
    parsed = parse_line(json.dumps(old_metric))
    assert isinstance(parsed, StepMetric) and parsed.valid_loss is None and parsed.extra == {"reward_margin": 0.5}
    assert json.loads(parsed.to_line()) == old_metric  # None fields stay off the wire
    new = parse_line(json.dumps({**old_metric, "train_mean_token_accuracy": 0.5, "valid_loss": 1.5}))
    assert isinstance(new, StepMetric) and (new.train_mean_token_accuracy, new.valid_loss) == (0.5, 1.5)
    assert new.to_dict()["valid_loss"] == 1.5
    checkpoint = {"event": "checkpoint", "identifier": "j-epoch-1", "epoch": 1, "step": 2, "path": "/x",
                  "train_loss": 1.0, "validation_loss": 1.0, "perplexity": 2.7}
    parsed_checkpoint = parse_line(json.dumps({**checkpoint, "full_valid_loss": 0.9}))
    assert isinstance(parsed_checkpoint, CheckpointWritten)
    assert parsed_checkpoint.token_metrics() == {"full_valid_loss": 0.9}
    assert json.loads(parse_line(json.dumps(checkpoint)).to_line()) == checkpoint


@pytest.mark.slow
def test_the_launcher_stores_the_metrics_in_the_jobs_events(store, tmp_path, tiny_model_path, monkeypatch):
    """Through the real launcher and trainer: each step's metrics and each checkpoint's token
    metrics land in the job's events, where the OpenAI door reads them."""
    from posttrain.domain.jobs import JobKind, JobStatus
    from posttrain.domain.recipes import JobPlan, build_recipe
    from posttrain.store.jobs import new_job_id
    from posttrain.worker.launcher import Launcher
    from tests.worker_helpers import launch_config, stand_in_importable

    stand_in_importable(monkeypatch)  # the trainer process imports this checkout
    job_id = new_job_id()
    folder = tmp_path / "jobs" / job_id
    folder.mkdir(parents=True)
    rows = check_fine_tuning_lines(openai_lines()[:8], "supervised")
    for name in ("train", "validation"):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    recipe = build_recipe({"method": "sft", "schedule": {"n_epochs": 1, "max_steps_per_epoch": 2},
                           "data": {"batch_size": 4, "data_format": "dialog"}})
    plan = JobPlan(recipe=recipe, model=str(tiny_model_path), output_dir=str(folder / "checkpoints"),
                   train_rows_path=str(folder / "train.jsonl"), validation_rows_path=str(folder / "validation.jsonl"))
    store.create(job_id=job_id, job_uuid="acc", tenant="t", kind=JobKind.SFT, request={"job_uuid": "acc"},
                 plan=plan, max_attempts=1)
    job = store.claim_next(owner="w1", lease_seconds=30)
    Launcher(job=job, owner="w1", store=store,
             config=launch_config(trainer_module="posttrain.trainer", device="cpu", threads=1, compile="off")).run()
    assert store.get(job_id=job_id).status is JobStatus.COMPLETED, store.get(job_id=job_id).error_message

    events = store.events(job_id=job_id)
    metrics = [e.data for e in events if e.type == "metric"]
    assert len(metrics) == 2
    assert all(0 <= m["train_mean_token_accuracy"] <= 1 and m["valid_loss"] > 0 for m in metrics)
    [checkpoint] = [e.data for e in events if e.type == "checkpoint"]
    assert checkpoint["full_valid_loss"] > 0 and 0 <= checkpoint["full_valid_mean_token_accuracy"] <= 1
    assert 0 <= checkpoint["train_mean_token_accuracy"] <= 1 and 0 <= checkpoint["valid_mean_token_accuracy"] <= 1


@pytest.mark.slow
def test_dpo_reports_the_chosen_answers_token_accuracy(tiny_model_path, tmp_path):
    """DPO's token accuracy is the policy's on the chosen answers; an OpenAI DPO file trains."""
    from tests.integration import test_dpo_trainer as dpo

    pairs = [normalize_preference_row(row, row_index=i) for i, row in enumerate(dpo.preference_rows())]
    rows = check_fine_tuning_lines([json.dumps({
        "input": {"messages": prompt}, "preferred_output": [{"role": "assistant", "content": chosen}],
        "non_preferred_output": [{"role": "assistant", "content": rejected}]}) for prompt, chosen, rejected in pairs],
        "dpo")
    spec = dpo.make_spec(tmp_path, tiny_model_path, lines=[json.dumps(row) for row in rows], n_epochs=1,
                         max_steps_per_epoch=2)
    events, code = dpo.run(spec, tmp_path)
    assert code == 0, (tmp_path / "stderr.txt").read_text()[-3000:]
    typed = [parse_line(json.dumps(e)) for e in events]
    metrics = [e for e in typed if isinstance(e, StepMetric)]
    assert len(metrics) == 2
    assert all(0 <= m.train_mean_token_accuracy <= 1 and m.valid_loss is None for m in metrics)  # type: ignore[operator]
    [checkpoint] = [e for e in typed if isinstance(e, CheckpointWritten)]
    assert set(checkpoint.token_metrics()) == {"train_mean_token_accuracy", "valid_mean_token_accuracy"}
    assert checkpoint.train_mean_token_accuracy == pytest.approx(
        sum(m.train_mean_token_accuracy for m in metrics) / 2)  # type: ignore[misc]
