"""A GRPO job's rewards: its grader (the recipe's JSON object, ``domain.graders.parse_grader``) run
over the sampled completions by ``trainer.grading.score_batch`` (python graders in their sandbox, one
call a batch; a grader that fails scores 0 with the reason).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from posttrain.domain.graders import make_sample, parse_grader
from posttrain.domain.recipes import Judge
from posttrain.trainer.grading import JudgePool, SandboxLimits, score_batch


@dataclass
class Scores:
    """Each completion's reward, each named (sub-)grader's scores, and why any completion scored 0."""

    rewards: list[float]
    per_grader: dict[str, list[float]] = field(default_factory=dict)
    errors: list[str | None] = field(default_factory=list)


Scorer = Callable[[list[str], list[dict[str, Any]]], Scores]


def scorer_for(grader: dict[str, Any], *, hidden_paths: tuple[str, ...] = (), judges: tuple[Judge, ...] = ()) -> Scorer:
    """The function that scores completions (texts) against their training lines (items).
    ``hidden_paths``: what a python grader's sandbox hides (the spec's ``grader_hidden_paths``);
    ``judges``: the score_model graders' judges (the plan's), each loaded once, at its first use."""
    parsed = parse_grader(grader)
    limits = SandboxLimits(hidden_paths=tuple(hidden_paths))
    pool = JudgePool(judges)

    def score(texts: list[str], items: list[dict[str, Any]]) -> Scores:
        results = score_batch(parsed, [make_sample(t) for t in texts], items, limits=limits, judges=pool)
        per: dict[str, list[float]] = {}
        for result in results:
            for name, value in result.per_grader.items():
                per.setdefault(name, []).append(float(value))
        return Scores(rewards=[float(r.score) for r in results], per_grader=per, errors=[r.error for r in results])

    return score


def failure_note(errors: list[str | None]) -> str | None:
    """One line for a batch's events saying why samples scored 0 (how many, and the first reason),
    or None when none failed: a grader's failures are the job's to see, not only its reward's."""
    failed = [error for error in errors if error]
    if not failed:
        return None
    return f"{len(failed)} of {len(errors)} completions scored 0 by the grader: {failed[0][:300]}"
