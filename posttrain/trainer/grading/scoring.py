"""score / score_batch: a grader's reward for each sampled completion, never an exception.

``sample`` is ``{"output_text": str}`` (more keys are passed through to templates and python graders);
``item`` is the training line's fields. A grader that cannot score a sample (a template naming a
missing field, a crashing python grader, a formula dividing by zero) gives that sample 0.0 and says
why in ``error``, so the job goes on and its events can show the reason.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from posttrain.domain.graders import (
    FormulaError,
    Grader,
    MultiGrader,
    PythonGrader,
    ScoreModelGrader,
    SingleGrader,
    StringCheckGrader,
    TemplateError,
    TextSimilarityGrader,
    evaluate_formula,
    render_template,
)
from posttrain.trainer.grading.judge import JudgePool
from posttrain.trainer.grading.metrics import similarity
from posttrain.trainer.grading.sandbox import SampleOutcome, SandboxLimits, run_python_grader

NO_JUDGES = "no judge model was handed to this scorer (score_batch's judges)"


@dataclass
class GradeResult:
    """The reward of one sample; ``per_grader`` holds each (sub-)grader's score by name."""

    score: float
    per_grader: dict[str, float] = field(default_factory=dict)
    error: str | None = None


def _string_check(grader: StringCheckGrader, text: str, reference: str) -> float:
    if grader.operation == "eq":
        return float(text == reference)
    if grader.operation == "ne":
        return float(text != reference)
    if grader.operation == "like":
        return float(reference in text)
    return float(reference.casefold() in text.casefold())


def _inline(grader: StringCheckGrader | TextSimilarityGrader, sample: Mapping[str, Any],
            item: Mapping[str, Any]) -> SampleOutcome:
    try:
        text = render_template(grader.input, sample, item)
        reference = render_template(grader.reference, sample, item)
    except TemplateError as error:
        return SampleOutcome(0.0, str(error))
    except (TypeError, ValueError) as error:  # a field JSON cannot write out
        return SampleOutcome(0.0, f"a template could not be filled: {error}")
    if isinstance(grader, StringCheckGrader):
        return SampleOutcome(_string_check(grader, text, reference))
    try:
        return SampleOutcome(similarity(grader.evaluation_metric, text, reference))
    except Exception as error:  # noqa: BLE001 - a metric library failing on odd text must not stop the job
        return SampleOutcome(0.0, f"{grader.evaluation_metric} failed: {type(error).__name__}: {error}")


def _single(grader: SingleGrader, samples: Sequence[Mapping[str, Any]], items: Sequence[Mapping[str, Any]],
            limits: SandboxLimits | None, judges: JudgePool | None) -> list[SampleOutcome]:
    if isinstance(grader, PythonGrader):
        pairs = [{"sample": dict(s), "item": dict(i)} for s, i in zip(samples, items, strict=True)]
        return run_python_grader(grader.source, pairs, limits)
    if isinstance(grader, ScoreModelGrader):
        if judges is None:
            return [SampleOutcome(0.0, NO_JUDGES)] * len(samples)
        return judges.score(grader, samples, items)
    return [_inline(grader, s, i) for s, i in zip(samples, items, strict=True)]


def score_batch(grader: Grader, samples: Sequence[Mapping[str, Any]], items: Sequence[Mapping[str, Any]],
                limits: SandboxLimits | None = None, judges: JudgePool | None = None) -> list[GradeResult]:
    """Grade ``samples[k]`` against ``items[k]`` for each k; python graders run as one sandbox per batch,
    score_model graders ask their judge in ``judges`` (the job's, loaded once per run)."""
    if len(samples) != len(items):
        raise ValueError(f"{len(samples)} samples but {len(items)} items")
    if not isinstance(grader, MultiGrader):
        return [GradeResult(o.score, {grader.name: o.score}, o.error) for o in _single(grader, samples, items, limits, judges)]
    columns = {key: _single(sub, samples, items, limits, judges) for key, sub in grader.graders.items()}
    results = []
    for index in range(len(samples)):
        per_grader = {key: column[index].score for key, column in columns.items()}
        errors = [f"{key}: {column[index].error}" for key, column in columns.items() if column[index].error]
        try:
            total = evaluate_formula(grader.calculate_output, per_grader)
        except FormulaError as error:
            results.append(GradeResult(0.0, per_grader, "; ".join([*errors, str(error)])))
            continue
        results.append(GradeResult(total, per_grader, "; ".join(errors) or None))
    return results


def score(grader: Grader, sample: Mapping[str, Any], item: Mapping[str, Any],
          limits: SandboxLimits | None = None, judges: JudgePool | None = None) -> GradeResult:
    """The reward of one sample (see :func:`score_batch`)."""
    return score_batch(grader, [sample], [item], limits, judges)[0]
