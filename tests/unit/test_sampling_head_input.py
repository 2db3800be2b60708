"""``sample`` hands the output head contiguous inputs (generate's first step slices the last
position out of the prompt's hidden states; on a CPU a bf16 head over that strided view copies its
weight once per row), removes its hook afterwards, and samples the same tokens as without it."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from posttrain.trainer.sampling import contiguous_head_input, sample  # noqa: E402


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.bfloat16), tokenizer


def _sample(model, tokenizer):
    torch.manual_seed(0)
    return sample(model, tokenizer, ["hello there", "a much longer prompt than that"], num_generations=3,
                  temperature=1.0, top_p=1.0, max_new_tokens=4, device="cpu")


def test_the_head_sees_only_contiguous_inputs_while_sampling(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    head = model.get_output_embeddings()
    seen: list[bool] = []
    recorder = head.register_forward_hook(lambda _m, args, _out: seen.append(args[0].is_contiguous()))
    try:
        _sample(model, tokenizer)
    finally:
        recorder.remove()
    assert seen and all(seen)
    assert not head._forward_pre_hooks  # the hook is gone after sampling


def test_the_sampled_tokens_are_the_same_with_and_without_the_hook(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    with_hook = _sample(model, tokenizer)
    torch.manual_seed(0)
    ids = with_hook.prompt_ids[::3]
    mask = with_hook.prompt_mask[::3]
    generate = dict(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                    max_new_tokens=4, num_return_sequences=3, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        plain = model.generate(**generate)
    torch.manual_seed(0)
    with torch.no_grad(), contiguous_head_input(model):
        hooked = model.generate(**generate)
    assert torch.equal(plain, hooked)
