"""A validation dataset (``data_config.validation_dataset_id``, planned as ``validation_rows_path``)
is what the trainer validates on, for SFT and DPO: the same rows as the training set give the
validation loss of a run without one (which validates on a sample of the training rows), other
rows give another, and a validation row that fits no format fails the job before it trains."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration import test_dpo_trainer as dpo
from tests.integration import test_trainer_process as sft

pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")]


def _validation_losses(spec: Path, tmp_path: Path, validation_rows: list | str | None) -> list[float]:
    """The run's validation losses; ``validation_rows`` "same" means the spec's own training rows."""
    if validation_rows == "same":
        training = json.loads(spec.read_text())["train_rows_path"]
        validation_rows = [json.loads(line) for line in Path(training).read_text().splitlines() if line.strip()]
    if validation_rows is not None:
        path = tmp_path / "validation.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in validation_rows))
        sft.with_spec_keys(spec, validation_rows_path=str(path))
    events, code = sft.run(spec, tmp_path)
    assert code == 0, (tmp_path / "stderr.txt").read_text()[-3000:]
    return [e["validation_loss"] for e in events if e["event"] == "checkpoint"]


SFT_OTHER_ROWS = [{"input_query": f"Say the word {word}.", "expected_answer": word} for word in
                  ("apple", "river", "stone", "cloud", "bread", "glass", "piano", "tiger")]
DPO_OTHER_ROWS = [{"prompt": f"Say the word {word}.", "chosen": word, "rejected": "no"} for word in
                  ("apple", "river", "stone", "cloud", "bread", "glass", "piano", "tiger")]

CASES = {
    "sft": (lambda tmp, model: sft.make_spec(tmp, model, n_epochs=1, max_steps_per_epoch=3), SFT_OTHER_ROWS),
    "dpo": (lambda tmp, model: dpo.make_spec(tmp, model, n_epochs=1, max_steps_per_epoch=2), DPO_OTHER_ROWS),
}


@pytest.mark.parametrize("method", sorted(CASES))
def test_the_validation_rows_are_what_is_validated(method, tiny_model_path, tmp_path):
    spec_for, other_rows = CASES[method]
    runs = {}
    for name, rows in (("none", None), ("same", "same"), ("other", other_rows)):
        (tmp_path / name).mkdir()
        runs[name] = _validation_losses(spec_for(tmp_path / name, tiny_model_path), tmp_path / name, rows)
    assert len(runs["none"]) == 1
    assert runs["same"] == pytest.approx(runs["none"], rel=1e-5)
    assert runs["other"][0] != pytest.approx(runs["none"][0], rel=1e-3)


def test_a_bad_validation_row_fails_the_job_before_training(tiny_model_path, tmp_path):
    spec = sft.make_spec(tmp_path, tiny_model_path, n_epochs=1, max_steps_per_epoch=2)
    path = tmp_path / "validation.jsonl"
    path.write_text(json.dumps({"input_query": "fine", "expected_answer": "yes"}) + "\n" + json.dumps({"nothing": 1}) + "\n")
    events, _code = sft.run(sft.with_spec_keys(spec, validation_rows_path=str(path)), tmp_path)
    assert not any(e["event"] == "metric" for e in events)
    assert events[-1]["event"] == "failed" and "row" in events[-1]["message"], events[-1]
