"""Two LoRA adapters stacked into one (posttrain.trainer.stacked_adapters): on the raw base, the
stacked adapter gives the model of the first adapter merged plus the second one, for adapters with
different targets, ranks and scalings; DoRA adapters are refused, not stacked wrongly."""

from __future__ import annotations

import pytest

from posttrain.trainer.adapters import lora_model
from posttrain.trainer.stacked_adapters import capture, save_stacked, why_not_stackable
from tests.fixtures_tiny import build_tiny_model
from tests.trainer_specs import lora_recipe

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

SFT_LORA = {"lora_attn_modules": ["q_proj", "v_proj", "output_proj"], "apply_lora_to_mlp": True,
            "apply_lora_to_output": True, "rank": 16, "alpha": 32}
DPO_LORA = {"lora_attn_modules": ["q_proj", "k_proj", "v_proj", "output_proj"], "rank": 8, "alpha": 16}


@pytest.fixture(scope="module")
def tiny_model_path(tmp_path_factory):
    return build_tiny_model(tmp_path_factory)


def _randomized(model, seed: int):
    """Non-zero adapter weights (a new adapter's B is zero: it would change nothing)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    for name, parameter in model.named_parameters():
        if "lora_" in name:
            parameter.data = torch.randn(parameter.shape, generator=generator) * 0.05
    return model


def test_stacked_adapter_on_the_raw_base_is_the_trained_model(tiny_model_path, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    def load():
        return AutoModelForCausalLM.from_pretrained(tiny_model_path)

    _randomized(lora_model(load(), lora_recipe(SFT_LORA)), seed=1).save_pretrained(tmp_path / "sft")
    starting = PeftModel.from_pretrained(load(), tmp_path / "sft")
    first = capture(starting)
    trained = _randomized(lora_model(starting.merge_and_unload(), lora_recipe(DPO_LORA)), seed=2).eval()
    second = capture(trained)
    assert why_not_stackable(first, second) is None
    save_stacked(tmp_path / "stacked", first, second, base_model_name_or_path=str(tiny_model_path))

    ids = torch.tensor([[1, 5, 9, 22, 40, 3, 7, 11]])
    with torch.no_grad():
        expected = trained(ids).logits
        got = PeftModel.from_pretrained(load(), tmp_path / "stacked").eval()(ids).logits
        first_alone = PeftModel.from_pretrained(load(), tmp_path / "sft").eval()(ids).logits
    assert (got - expected).abs().max() < 1e-4
    assert (first_alone - expected).abs().max() > 1e-2, "the second adapter changed nothing: the test proves nothing"


def test_dora_adapters_are_not_stacked(tiny_model_path):
    from transformers import AutoModelForCausalLM

    dora = capture(lora_model(AutoModelForCausalLM.from_pretrained(tiny_model_path), lora_recipe({**SFT_LORA, "use_dora": True})))
    plain = capture(lora_model(AutoModelForCausalLM.from_pretrained(tiny_model_path), lora_recipe(DPO_LORA)))
    assert "DoRA" in why_not_stackable(dora, plain)
    assert why_not_stackable(plain, plain) is None
