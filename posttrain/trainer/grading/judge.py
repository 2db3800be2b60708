"""The judges of ``score_model`` graders, inside the trainer: a model this server serves, loaded once
per run, asked each sample's templated messages, its answer read as a score.

The judge is the model the submit resolved for the tenant (``JobPlan.judges``: a base model or one
of the tenant's own fine-tuned models, its folders pinned), never the policy being trained: it is a
separate copy on the CPU, in eval mode, gradients off, loaded with trust_remote_code off whatever
the operator allows for training (a judge's folder may be another job's output). Each sample's
chat is rendered with the judge's own chat template (``role: content`` lines when it has none, as
the GRPO policy's prompts are), answered greedily unless the grader's ``sampling_params`` ask for
a temperature, one sample at a time (no padding: what a sample scores does not depend on the
others in its batch), and read by ``domain.graders.judge_score``: the first number, clamped to the
grader's ``range``, mapped onto [0, 1]. An answer with no number scores 0 and says what the judge
answered. A judge that cannot be loaded fails the job (``invalid_config``): every reward would be
0 otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from posttrain.domain.graders import (
    DEFAULT_JUDGE_TOKENS,
    ScoreModelGrader,
    TemplateError,
    judge_messages,
    judge_score,
)
from posttrain.domain.recipes import Judge
from posttrain.trainer.errors import TrainerConfigError, TrainerError
from posttrain.trainer.grading.sandbox import SampleOutcome
from posttrain.trainer.loading import check_pinned

#: How much of a judge's answer an error quotes.
ANSWER_SHOWN = 80


@dataclass
class LoadedJudge:
    model: Any
    tokenizer: Any


def load_judge(judge: Judge) -> LoadedJudge:
    """The judge's model (its adapter merged in) and tokenizer, on the CPU in fp32, eval mode, no grad."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_pinned(judge.base_path, judge.adapter_path, judge.tokenizer_path)  # PathChangedError: the job fails
    model = AutoModelForCausalLM.from_pretrained(judge.base_path, dtype=torch.float32, trust_remote_code=False)
    if judge.adapter_path:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, judge.adapter_path).merge_and_unload()
    model = model.to("cpu").eval()
    model.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(judge.tokenizer_path, trust_remote_code=False)
    return LoadedJudge(model=model, tokenizer=tokenizer)


def judge_prompt(tokenizer: Any, chat: list[dict[str, str]]) -> str:
    """The judge's chat as text, ending where its answer begins."""
    if getattr(tokenizer, "chat_template", None):
        return str(tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True))
    text = tokenizer.bos_token or ""
    return text + "".join(f"{m['role']}: {m['content']}\n" for m in chat) + "assistant: "


def generation_settings(sampling: Mapping[str, Any] | None) -> dict[str, Any]:
    """``generate``'s keywords for a grader's ``sampling_params`` (checked at submit): greedy unless a
    temperature above 0 is asked, then sampled with ``top_p`` (no top-k)."""
    sampling = sampling or {}
    settings: dict[str, Any] = {"max_new_tokens": sampling.get("max_completions_tokens") or DEFAULT_JUDGE_TOKENS}
    temperature = sampling.get("temperature")
    if temperature:
        settings.update(do_sample=True, temperature=float(temperature), top_p=float(sampling.get("top_p") or 1.0),
                        top_k=0)
    else:
        settings.update(do_sample=False)
    return settings


def judge_answer(loaded: LoadedJudge, prompt: str, sampling: Mapping[str, Any] | None) -> str:
    """The judge's answer to ``prompt`` (special tokens dropped). A sampled answer draws from its own
    generator seeded by ``seed`` (0 when none), so the policy's random stream is not disturbed."""
    import torch
    from transformers import GenerationConfig

    tokenizer, model = loaded.tokenizer, loaded.model
    encoded = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = GenerationConfig(**generation_settings(sampling), pad_token_id=pad,
                              eos_token_id=model.generation_config.eos_token_id)
    with torch.inference_mode(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(int((sampling or {}).get("seed") or 0))
        out = model.generate(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"],
                             generation_config=config)
    return str(tokenizer.decode(out[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True))


class JudgePool:
    """The job's judges by model id, each loaded at its first use and kept for the run."""

    def __init__(self, judges: Sequence[Judge] = ()) -> None:
        self._judges = {judge.model: judge for judge in judges}
        self._loaded: dict[str, LoadedJudge] = {}

    def loaded(self, model: str) -> LoadedJudge | None:
        judge = self._judges.get(model)
        if judge is None:
            return None
        if model not in self._loaded:
            try:
                self._loaded[model] = load_judge(judge)
            except TrainerError:  # a swapped folder (path_changed)
                raise
            except Exception as error:  # any other loading failure is the job's, said plainly
                raise TrainerConfigError(f"the judge model {model!r} could not be loaded: "
                                         f"{type(error).__name__}: {error}") from error
        return self._loaded[model]

    def score(self, grader: ScoreModelGrader, samples: Sequence[Mapping[str, Any]],
              items: Sequence[Mapping[str, Any]]) -> list[SampleOutcome]:
        loaded = self.loaded(grader.model)
        if loaded is None:
            return [SampleOutcome(0.0, f"no judge was resolved for model {grader.model!r} when the job was "
                                       "submitted")] * len(samples)
        return [self._one(loaded, grader, sample, item) for sample, item in zip(samples, items, strict=True)]

    @staticmethod
    def _one(loaded: LoadedJudge, grader: ScoreModelGrader, sample: Mapping[str, Any],
             item: Mapping[str, Any]) -> SampleOutcome:
        try:
            chat = judge_messages(grader, sample, item)
        except TemplateError as error:
            return SampleOutcome(0.0, str(error))
        except (TypeError, ValueError) as error:  # a field JSON cannot write out
            return SampleOutcome(0.0, f"a template could not be filled: {error}")
        try:
            answer = judge_answer(loaded, judge_prompt(loaded.tokenizer, chat), grader.sampling_params)
        except Exception as error:  # noqa: BLE001 - a prompt the judge cannot take (too long, say) is this sample's
            return SampleOutcome(0.0, f"the judge {grader.model!r} failed: {type(error).__name__}: {error}")
        value = judge_score(answer, grader.range)
        if value is None:
            return SampleOutcome(0.0, f"the judge {grader.model!r} answered {answer[:ANSWER_SHOWN]!r}, "
                                      "which holds no number")
        return SampleOutcome(value)
