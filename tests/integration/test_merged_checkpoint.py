"""A LoRA checkpoint written with ``save_merged`` carries ``merged/``: a plain model folder whose
logits equal those of the base model with the adapter applied."""

from __future__ import annotations

import pytest

from tests.integration.test_trainer_process import make_spec, run, with_spec_keys

pytestmark = pytest.mark.slow


def test_merged_model_gives_the_same_logits_as_base_plus_adapter(tiny_model_path, tmp_path):
    spec_path = with_spec_keys(make_spec(tmp_path, tiny_model_path, n_epochs=1, max_steps_per_epoch=4), save_merged=True)
    events, code = run(spec_path, tmp_path)
    assert code == 0, (tmp_path / "stderr.txt").read_text()[-2000:]
    metrics = [e for e in events if e["event"] == "metric"]
    assert metrics and all(m["step_seconds"] > 0 for m in metrics)
    (checkpoint,) = [e for e in events if e["event"] == "checkpoint"]
    assert checkpoint["write_seconds"] > 0

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path / "out" / "epoch_1"
    tokenizer = AutoTokenizer.from_pretrained(folder / "merged")
    inputs = tokenizer("What colour is the sky? The sky is blue.", return_tensors="pt")
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_path), folder).eval()
    merged = AutoModelForCausalLM.from_pretrained(folder / "merged").eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()
    with torch.no_grad():
        expected = adapted(**inputs).logits
        got = merged(**inputs).logits
        untrained = base(**inputs).logits
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(untrained, expected, atol=1e-3), "the adapter changed nothing: the test would prove nothing"
