"""What a DPO checkpoint holds, through real trainer processes on the tiny model: a real SFT LoRA
run, then DPO from its checkpoint.

- Loaded as the README says (``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE),
  checkpoint)``), the checkpoint is the model that was trained: the base with the SFT adapter
  merged, plus the DPO adapter.
- Its ``perplexity`` is the trained policy's perplexity on the validation pairs' chosen answers,
  not exp(DPO loss).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.integration.test_dpo_trainer import (
    LORA,
    make_spec,
    preference_rows,
    run,
    stderr_tail,
    train_sft_adapter,
)

pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")]


def _sft_then_dpo(tmp_path_factory, model: Path, sft_lora: dict) -> tuple[list[dict], Path]:
    """The events of a DPO job (fp32, validating on all 16 pairs) started from the checkpoint of a
    real SFT LoRA job with ``sft_lora``, and that SFT checkpoint."""
    adapter = train_sft_adapter(tmp_path_factory.mktemp("sft"), model, algorithm=sft_lora, steps=3)

    dpo_dir = tmp_path_factory.mktemp("dpo")
    spec = make_spec(dpo_dir, model, adapter=adapter, beta=0.5, n_epochs=1, max_steps_per_epoch=3,
                     max_validation_steps=4, dtype="fp32")
    events, code = run(spec, dpo_dir)
    assert code == 0, stderr_tail(dpo_dir)
    return events, adapter


@pytest.fixture(scope="module")
def dpo_from_sft(tiny_model_path, tmp_path_factory):
    """(checkpoint event, SFT adapter folder) of a DPO job started from an SFT LoRA checkpoint whose
    adapter has other targets, rank and scaling than the DPO adapter's (q/k/v/o, rank 8, alpha 16)."""
    sft_lora = {**LORA, "lora_attn_modules": ["q_proj", "v_proj", "output_proj"], "apply_lora_to_mlp": True,
                "apply_lora_to_output": True, "rank": 16, "alpha": 64}
    events, adapter = _sft_then_dpo(tmp_path_factory, tiny_model_path, sft_lora)
    (checkpoint,) = [e for e in events if e["event"] == "checkpoint"]
    assert not [e for e in events if e["event"] == "log" and e["level"] == "warning"], events
    return checkpoint, adapter


@pytest.fixture(scope="module")
def tiny_model_path(tmp_path_factory):
    from tests.fixtures_tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory)


def _base(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def test_the_readme_recipe_loads_the_trained_model(tiny_model_path, dpo_from_sft):
    import torch
    from peft import PeftModel

    checkpoint, sft_adapter = dpo_from_sft
    folder = Path(checkpoint["path"])
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model_path)
    readme = PeftModel.from_pretrained(_base(tiny_model_path), folder).eval()
    ids = torch.tensor([list(range(1, 40))])
    with torch.no_grad():
        got = readme(ids).logits
        from_merged = _base(folder / "merged")(ids).logits  # the trained model as a plain folder
    assert (got - from_merged).abs().max() < 1e-3

    # The trained model rebuilt as the job built it, without the stacked adapter: the base with
    # the SFT adapter merged (the starting policy), plus the DPO adapter as it trained (kept alone
    # for resuming).
    starting = PeftModel.from_pretrained(_base(tiny_model_path), sft_adapter).merge_and_unload()
    trained = PeftModel.from_pretrained(starting, folder / "dpo_adapter").eval()
    dpo_alone_on_base = PeftModel.from_pretrained(_base(tiny_model_path), folder / "dpo_adapter").eval()
    with torch.no_grad():
        expected = trained(ids).logits
        wrong = dpo_alone_on_base(ids).logits
    assert (got - expected).abs().max() < 1e-3
    assert (from_merged - expected).abs().max() < 1e-3
    assert (wrong - expected).abs().max() > 1e-2, "the SFT adapter changed nothing: the test would prove nothing"


def test_perplexity_is_the_policys_perplexity_on_the_chosen_answers(tiny_model_path, dpo_from_sft):
    """exp of the mean NLL per chosen-answer token, computed here from the checkpoint's model with
    a plain forward, over all 16 validation pairs (4 batches of 4)."""
    import torch
    import torch.nn.functional as F
    from peft import PeftModel
    from transformers import AutoTokenizer

    from posttrain.trainer.preference_data import encode_preference_rows

    checkpoint, _ = dpo_from_sft
    folder = Path(checkpoint["path"])
    model = PeftModel.from_pretrained(_base(tiny_model_path), folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for example in encode_preference_rows(preference_rows(), tokenizer=tokenizer, max_length=512):
            prompt, answer = example["prompt_ids"], example["chosen_ids"]
            logits = model(torch.tensor([prompt + answer])).logits[0]
            predicted = logits[len(prompt) - 1: len(prompt) + len(answer) - 1]
            nll += float(F.cross_entropy(predicted, torch.tensor(answer), reduction="sum"))
            tokens += len(answer)
    assert checkpoint["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-3)
    assert checkpoint["perplexity"] != pytest.approx(math.exp(checkpoint["validation_loss"]), rel=1e-2)
    state = json.loads((folder / "trainer_state.json").read_text())
    assert state["metrics"]["perplexity"] == checkpoint["perplexity"]
    assert state["validation"]["validation_chosen_nll"] == pytest.approx(nll / tokens, rel=1e-3)


def test_a_dora_start_that_cannot_stack_names_its_own_base(tiny_model_path, tmp_path_factory):
    """A DoRA SFT adapter does not stack with the DPO adapter: the checkpoint's adapter names the
    starting model it holds in base/, the job says so, and base/ + adapter is the trained model."""
    import torch
    from peft import PeftModel

    events, _ = _sft_then_dpo(tmp_path_factory, tiny_model_path, {**LORA, "use_dora": True})
    assert any(e["event"] == "log" and e["level"] == "warning" and "cannot be stacked" in e["message"]
               for e in events)
    folder = Path([e for e in events if e["event"] == "checkpoint"][0]["path"])
    base = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == str(folder / "base")
    assert json.loads((folder / "trainer_state.json").read_text())["adapter_layout"] == "on_starting_model"
    ids = torch.tensor([list(range(1, 40))])
    with torch.no_grad():
        got = PeftModel.from_pretrained(_base(base), folder).eval()(ids).logits
        expected = _base(folder / "merged")(ids).logits
        on_raw_base = PeftModel.from_pretrained(_base(tiny_model_path), folder).eval()(ids).logits
    assert (got - expected).abs().max() < 1e-3
    assert (on_raw_base - expected).abs().max() > 1e-2, "the SFT adapter changed nothing: the test would prove nothing"
