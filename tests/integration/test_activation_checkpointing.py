"""``efficiency_config.enable_activation_checkpointing`` through the real trainer process: SFT (LoRA
and full) and DPO train exactly as without it (the backward recomputes each layer with the
attention kernel its forward used), and a compiled job with it trains eagerly and says so."""

from __future__ import annotations

import pytest

from tests.integration import test_dpo_trainer as dpo
from tests.integration import test_trainer_process as sft

pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")]

CHECKPOINTING = {"enable_activation_checkpointing": True}


def _losses(spec_for, tmp_path, model, *, efficiency: dict | None, compile_mode: str = "off") -> tuple[list, list]:
    tmp_path.mkdir()
    spec = spec_for(tmp_path, model, **({"efficiency_config": efficiency} if efficiency else {}))
    events, code = sft.run(sft.with_spec_keys(spec, compile=compile_mode), tmp_path)
    assert code == 0, (tmp_path / "stderr.txt").read_text()[-3000:]
    assert events[-1]["event"] == "completed"
    return [e["loss"] for e in events if e["event"] == "metric"], [e["message"] for e in events if e["event"] == "log"]


SPECS = {
    "sft-lora": lambda tmp, model, **t: sft.make_spec(tmp, model, n_epochs=1, max_steps_per_epoch=4, **t),
    "sft-full": lambda tmp, model, **t: sft.make_spec(tmp, model, lora=False, n_epochs=1, max_steps_per_epoch=4, **t),
    "dpo": lambda tmp, model, **t: dpo.make_spec(tmp, model, n_epochs=1, max_steps_per_epoch=3, **t),
}


@pytest.mark.parametrize("method", sorted(SPECS))
def test_checkpointed_training_matches_the_plain_one(method, tiny_model_path, tmp_path):
    plain, _ = _losses(SPECS[method], tmp_path / "plain", tiny_model_path, efficiency=None)
    checkpointed, _ = _losses(SPECS[method], tmp_path / "checkpointed", tiny_model_path, efficiency=CHECKPOINTING)
    assert len(checkpointed) == len(plain) > 0
    assert checkpointed == pytest.approx(plain, rel=1e-3)


def test_a_compiled_job_with_activation_checkpointing_trains_eagerly(tiny_model_path, tmp_path):
    eager, _ = _losses(SPECS["sft-lora"], tmp_path / "eager", tiny_model_path, efficiency=CHECKPOINTING)
    compiled, logs = _losses(SPECS["sft-lora"], tmp_path / "compiled", tiny_model_path, efficiency=CHECKPOINTING,
                             compile_mode="on")
    assert any(line.startswith("not compiling the model") and "activation checkpointing" in line for line in logs)
    assert compiled == pytest.approx(eager, rel=1e-3)
