"""score_model graders with a real judge: the tiny Llama taught (a few hundred optimizer steps, in
this process) to rate "Rate: red" 9, "Rate: blue" 3, any other "Rate: ..." 5, and to answer
"Describe: ..." with words, no number.

- the scorer's reward for each sample is exactly what transformers' ``generate`` on the same
  rendered prompt, read as OpenAI's range says, gives; a LoRA adapter on the judge is applied;
- an answer with no number scores 0 and says what the judge answered;
- a GRPO job through the trainer process with a score_model grader completes with its rewards.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from posttrain.domain.graders import make_sample, parse_grader
from posttrain.domain.recipes import JobPlan, Judge, TrainerSpec, build_recipe
from posttrain.trainer.grading import JudgePool, score_batch
from tests.fixtures_tiny import _built_once

JUDGE_ID = "number-judge"
OTHER_WORDS = ["green", "a cat", "the sky", "white snow", "It is here.", "grass", "the answer", "one two",
               "black coffee", "pink shoes", "hello", "a bird", "the teacher", "yes", "no", "purple flowers"]


def _judge_rows() -> list[tuple[str, str]]:
    rows = [("Rate: red", "9"), ("Rate: blue", "3")] * 6
    rows += [(f"Rate: {w}", "5") for w in OTHER_WORDS]
    rows += [(f"Describe: {w}", "It is here.") for w in ["red", "blue", *OTHER_WORDS[:6]]]
    return rows


STEPS = 80


def create_number_judge(path: Path) -> Path:
    """The tiny Llama, full weights trained on ``_judge_rows`` (the answer tokens only), saved."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.trainer.tiny_model import create_tiny_model

    create_tiny_model(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    torch.manual_seed(0)
    ids, labels = [], []
    for prompt, answer in _judge_rows():
        head = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        head_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(answer + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        ids.append(head_ids + answer_ids)
        labels.append([-100] * len(head_ids) + answer_ids)
    width = max(len(row) for row in ids)
    batch = torch.tensor([row + [tokenizer.pad_token_id] * (width - len(row)) for row in ids])
    targets = torch.tensor([row + [-100] * (width - len(row)) for row in labels])
    mask = (targets != -100) | (torch.arange(width)[None] < torch.tensor([len(r) for r in ids])[:, None])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small trains fastest on one thread (and shares the CPUs best)
    try:
        for _ in range(STEPS):  # the whole set each step (right-padded, the padding masked out)
            loss = model(input_ids=batch, attention_mask=mask.long(), labels=targets).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def number_judge(tmp_path_factory) -> Path:
    """Built beside the tiny model, so it is a base model of the tests' servers too (``number-judge``)."""
    return _built_once(tmp_path_factory, JUDGE_ID, create_number_judge)


def rating_grader(**fields) -> dict:
    return {"type": "score_model", "name": "judge", "model": JUDGE_ID, "range": [0, 10],
            "input": [{"role": "user", "content": "Rate: {{sample.output_text}}"}], **fields}


def direct_scores(folder: Path, grader: dict, texts: list[str], *, adapter: Path | None = None) -> list[float]:
    """What transformers (and peft) give on the same prompts: greedy, 16 new tokens, the first number
    clamped to the range and mapped onto [0, 1]; 0 for an answer without one."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).eval()
    low, high = grader["range"]
    scores = []
    for text in texts:
        content = grader["input"][0]["content"].replace("{{sample.output_text}}", text)
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                               add_generation_prompt=True)
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        answer = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        found = re.search(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)", answer)
        scores.append((min(max(float(found.group(0)), low), high) - low) / (high - low) if found else 0.0)
    return scores


def judge_of(folder: Path, adapter: Path | None = None) -> Judge:
    return Judge(model=JUDGE_ID, base_path=str(folder), adapter_path=str(adapter) if adapter else None,
                 tokenizer_path=str(folder))


TEXTS = ["red", "blue", "green", "the sky", "purple flowers"]


def test_the_scorer_gives_exactly_what_generate_gives_on_the_same_prompt(number_judge):
    grader = rating_grader()
    results = score_batch(parse_grader(grader), [make_sample(t) for t in TEXTS], [{}] * len(TEXTS),
                          judges=JudgePool([judge_of(number_judge)]))
    assert [r.score for r in results] == direct_scores(number_judge, grader, TEXTS)
    assert [r.score for r in results][:3] == [0.9, 0.3, 0.5]  # the judge learned its ratings
    assert all(r.error is None and r.per_grader == {"judge": r.score} for r in results)


def test_a_range_other_than_0_10_and_an_answer_without_a_number(number_judge):
    pool = JudgePool([judge_of(number_judge)])
    narrow = parse_grader(rating_grader(range=[4, 6]))  # 9 -> 6 (clamped) -> 1.0; 3 -> 4 -> 0.0; 5 -> 0.5
    assert [r.score for r in score_batch(narrow, [make_sample(t) for t in TEXTS[:3]], [{}] * 3, judges=pool)] == [
        1.0, 0.0, 0.5]
    words = parse_grader(rating_grader(input=[{"role": "user", "content": "Describe: {{item.thing}}"}]))
    [result] = score_batch(words, [make_sample("x")], [{"thing": "red"}], judges=pool)
    assert result.score == 0.0 and "answered 'It is here.', which holds no number" in result.error
    [missing] = score_batch(words, [make_sample("x")], [{}], judges=pool)
    assert missing.score == 0.0 and "item has no field 'thing'" in missing.error


def test_a_judge_with_a_lora_adapter_is_the_adapted_model(number_judge, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(number_judge, dtype=torch.float32)
    adapted = get_peft_model(base, LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj", "o_proj"],
                                              init_lora_weights=False))
    adapted.save_pretrained(tmp_path / "adapter")
    grader = rating_grader()
    pool = JudgePool([judge_of(number_judge, tmp_path / "adapter")])
    results = score_batch(parse_grader(grader), [make_sample(t) for t in TEXTS], [{}] * len(TEXTS), judges=pool)
    assert [r.score for r in results] == direct_scores(number_judge, grader, TEXTS, adapter=tmp_path / "adapter")
    assert [r.score for r in results] != [0.9, 0.3, 0.5, 0.5, 0.5]  # the adapter changed what the judge says


@pytest.mark.slow
def test_a_grpo_job_with_a_score_model_grader_completes_with_its_rewards(tiny_model_path, number_judge, tmp_path):
    from tests.integration.test_grpo_trainer import _run

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"messages": [{"role": "user", "content": "Pick a colour."}]}) + "\n"
                            for _ in range(4)))
    recipe = {"method": "grpo", "adapter": {"architecture_defaults": True, "rank": 4, "alpha": 8},
              "data": {"batch_size": 2}, "schedule": {"n_epochs": 1, "max_steps_per_epoch": 2},
              "optimizer": {"lr": 1e-2}, "dtype": "fp32", "seed": 0,
              "grpo": {"grader": {"type": "multi", "name": "both", "calculate_output": "judge", "graders": {
                  "judge": rating_grader(sampling_params={"max_completions_tokens": 4}),
                  "words": rating_grader(name="words", input=[{"role": "user", "content": "Describe: red"}])}},
                       "num_generations": 2, "max_completion_length": 3, "beta": 0.0, "eval_interval": 100}}
    output = tmp_path / "out"
    output.mkdir()
    plan = JobPlan(recipe=build_recipe(recipe), model=str(tiny_model_path), output_dir=str(output),
                   train_rows_path=str(rows), judges=(judge_of(number_judge),))
    spec = tmp_path / "spec.json"
    spec.write_text(TrainerSpec(job_uuid="judged", plan=plan, device="cpu", threads=1, compile="off").model_dump_json())
    events = _run(spec, tmp_path)
    assert events[-1]["event"] == "completed", events[-3:]
    metrics = [e for e in events if e["event"] == "metric"]
    assert len(metrics) == 2
    for m in metrics:
        # Random completions: the judge rates them 5 (or 9 / 3 for red / blue).
        assert m["reward/judge"] == m["reward_mean"] and 0.3 <= m["reward_mean"] <= 0.9 and m["reward/words"] == 0
    # Why "words" scored 0 is in the job's events.
    notes = [e["message"] for e in events if e["event"] == "log" and "scored 0 by the grader" in e["message"]]
    assert len(notes) == 2 and "4 of 4 completions" in notes[0] and "which holds no number" in notes[0], notes


def test_a_judge_folder_swapped_after_submit_fails_the_job_unread(tiny_model_path, number_judge, tmp_path):
    import shutil

    from posttrain.domain.pins import pin_folder
    from tests.integration.test_grpo_trainer import _start
    from tests.trainer_specs import finish

    copy = Path(shutil.copytree(number_judge, tmp_path / "judge")).resolve()
    pin = pin_folder(copy, role="judge_model", within=(str(copy),))
    copy.rename(tmp_path / "moved")
    copy.symlink_to(number_judge)  # the same name now leads elsewhere
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"messages": [{"role": "user", "content": "Pick a colour."}]}) + "\n")
    recipe = {"method": "grpo", "adapter": {"architecture_defaults": True, "rank": 4, "alpha": 8},
              "data": {"batch_size": 1}, "schedule": {"n_epochs": 1, "max_steps_per_epoch": 1}, "dtype": "fp32",
              "grpo": {"grader": rating_grader(), "num_generations": 2, "max_completion_length": 2, "beta": 0.0}}
    output = tmp_path / "out"
    output.mkdir()
    plan = JobPlan(recipe=build_recipe(recipe), model=str(tiny_model_path), output_dir=str(output),
                   train_rows_path=str(rows), pins=(pin,), judges=(judge_of(copy),))
    spec = tmp_path / "spec.json"
    spec.write_text(TrainerSpec(job_uuid="swapped", plan=plan, device="cpu", threads=1, compile="off").model_dump_json())
    events, _ = finish(_start(spec, tmp_path), timeout=400)
    failed = events[-1]
    assert failed["event"] == "failed" and failed["code"] == "path_changed", events[-3:]
    assert "the judge model's folder" in failed["message"] and not any(e["event"] == "metric" for e in events)


def test_a_sampled_judge_is_reproducible_by_its_seed_and_leaves_the_policys_random_stream_alone(tiny_model_path):
    import torch

    # The untrained tiny model as the judge: its answers are words, quoted in each sample's error,
    # and spread enough that sampling at temperature 2 differs from the greedy answer.
    pool = JudgePool([judge_of(tiny_model_path)])
    hot = parse_grader(rating_grader(sampling_params={"temperature": 2.0, "top_p": 1.0, "seed": 7}))
    samples = [make_sample(t) for t in TEXTS]

    def answers(grader) -> list[tuple[float, str | None]]:
        return [(r.score, r.error) for r in score_batch(grader, samples, [{}] * len(samples), judges=pool)]

    torch.manual_seed(123)
    first = answers(hot)
    after = torch.rand(3)
    torch.manual_seed(123)
    assert answers(hot) == first  # the same seed, the same answers
    assert torch.equal(torch.rand(3), after)  # the judge drew from its own generator
    assert first != answers(parse_grader(rating_grader()))  # temperature 2 is honoured: not the greedy answers
