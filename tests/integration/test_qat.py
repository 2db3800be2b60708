"""QAT jobs: a full fine-tune with torchao's fake-quantized linear layers, whose checkpoint is a
plain model that torchao then quantizes to what training simulated."""

from __future__ import annotations

import pytest

from tests.integration.test_trainer_process import kinds, make_spec, run, with_spec_keys

pytestmark = [pytest.mark.slow]

QAT = {"type": "QAT", "quantizer_name": "Int8DynActInt4WeightQATQuantizer", "group_size": 32}


def test_qat_trains_a_model_that_quantizes_to_what_training_simulated(tiny_model_path, tmp_path):
    spec_path = with_spec_keys(make_spec(tmp_path, tiny_model_path, lora=False, n_epochs=2, max_steps_per_epoch=8),
                               algorithm_config=QAT)
    events, code = run(spec_path, tmp_path)
    assert code == 0, (tmp_path / "stderr.txt").read_text()[-3000:]
    assert kinds(events)[-1] == "completed"
    # The tiny Llama: 2 layers x (q, k, v, o, gate, up, down) + lm_head, every input size a multiple of 32.
    qat = events[0]["resources"]["qat"]
    assert qat["fake_quantized_layers"] == 15 and qat["group_size"] == 32
    assert any(e["event"] == "log" and "qat.convert" in e["message"] for e in events)
    first, second = [e for e in events if e["event"] == "checkpoint"]
    assert second["train_loss"] < first["train_loss"]

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.trainer import qat as qat_module

    folder = tmp_path / "out" / "epoch_2"
    inputs = AutoTokenizer.from_pretrained(folder)("What is the colour of the sky?", return_tensors="pt")
    plain = AutoModelForCausalLM.from_pretrained(folder).eval()  # a plain model: loads without torchao
    simulated = AutoModelForCausalLM.from_pretrained(folder).eval()
    qat_module.prepare(simulated, QAT)
    quantized = qat_module.convert(AutoModelForCausalLM.from_pretrained(folder).eval(), QAT)
    with torch.no_grad():
        full, fake, real = (m(**inputs).logits for m in (plain, simulated, quantized))
    assert not torch.allclose(full, real, atol=1e-3), "quantizing changed nothing: the test would prove nothing"
    assert (fake - real).abs().max() < 0.1 * (full - real).abs().max()
