"""QLoRA: ``quantize_base`` trains LoRA adapters on a 4-bit NF4 base (bitsandbytes), here on the CPU.

The checkpoints are ordinary peft adapters: they load on the unquantized base, as QLoRA adapters
are usually served.
"""

from __future__ import annotations

import json

import pytest

from tests.integration.test_trainer_process import kinds, make_spec, run

pytestmark = pytest.mark.slow


def _qlora_spec(tmp_path, model, *, use_dora: bool = False, **training):
    spec = make_spec(tmp_path, model, **training)
    data = json.loads(spec.read_text())
    data["algorithm_config"].update(quantize_base=True, use_dora=use_dora)
    spec.write_text(json.dumps(data))
    return spec


def test_lora_on_a_4bit_base_learns_and_its_adapter_loads_on_the_plain_base(tiny_model_path, tmp_path):
    events, code = run(_qlora_spec(tmp_path, tiny_model_path), tmp_path)
    assert code == 0, (tmp_path / "stderr.txt").read_text()[-3000:]
    assert kinds(events) == ["started", *["metric"] * 8, "checkpoint", *["metric"] * 8, "checkpoint", "completed"]
    quantization = events[0]["resources"]["base_quantization"]
    # The tiny model has 2 layers of 7 linear layers each; the output head stays unquantized.
    assert quantization["scheme"].startswith("nf4 4-bit") and quantization["layers"] == 14
    assert any(e["event"] == "log" and "quantize_base" in e["message"] for e in events)
    metrics = [e["loss"] for e in events if e["event"] == "metric"]
    assert sum(metrics[-3:]) / 3 < sum(metrics[:3]) / 3 - 1.0
    checkpoints = [e for e in events if e["event"] == "checkpoint"]
    assert checkpoints[1]["validation_loss"] < checkpoints[0]["validation_loss"]

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    path = checkpoints[1]["path"]
    adapter_config = json.loads((tmp_path / "out" / "epoch_2" / "adapter_config.json").read_text())
    assert adapter_config["r"] == 16
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    tuned = PeftModel.from_pretrained(base, path).eval()
    ids = torch.tensor([[1, 20, 30, 40]])
    with torch.no_grad(), tuned.disable_adapter():
        plain = tuned(input_ids=ids).logits
    with torch.no_grad():
        adapted = tuned(input_ids=ids).logits
    assert not torch.allclose(plain, adapted)  # the adapter trained on the 4-bit base changes the plain one


def test_layers_whose_size_is_not_a_multiple_of_the_block_size_validate(tmp_path):
    """bitsandbytes' 4-bit blocks are 64 values: an MLP of 96 makes the last block of down_proj's
    rows partial, which its CPU inference repacking could not take (the validation forward failed)."""
    from posttrain.trainer.tiny_model import create_tiny_model

    model = create_tiny_model(tmp_path / "odd", intermediate_size=96)
    events, code = run(_qlora_spec(tmp_path, model, n_epochs=2, max_steps_per_epoch=2), tmp_path)
    assert code == 0, (tmp_path / "stderr.txt").read_text()[-3000:]
    assert kinds(events) == ["started", "metric", "metric", "checkpoint", "metric", "metric", "checkpoint", "completed"]


def test_dora_on_a_4bit_base_trains(tiny_model_path, tmp_path):
    events, code = run(_qlora_spec(tmp_path, tiny_model_path, use_dora=True, n_epochs=1, max_steps_per_epoch=2),
                       tmp_path)
    assert code == 0, (tmp_path / "stderr.txt").read_text()[-3000:]
    assert kinds(events) == ["started", "metric", "metric", "checkpoint", "completed"]
    assert json.loads((tmp_path / "out" / "epoch_1" / "adapter_config.json").read_text())["use_dora"] is True
