"""A GRPO job's rewards: its grader (the recipe's JSON object) run over the sampled completions.

The graders themselves live in ``posttrain.trainer.grading`` (``score_batch``), parsed from the
recipe with ``posttrain.domain.graders.parse_grader``. Where those modules are not there yet (the
branch that brings them is merged separately), the one grader a job can still be scored with here
is a ``string_check`` over ``{{sample.output_text}}`` and ``{{item.<field>}}`` templates; any other
type is refused when the job starts, never scored with something else.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from posttrain.trainer.errors import TrainerConfigError


@dataclass
class Scores:
    """Each completion's reward, each named sub-grader's scores, and why any completion scored 0."""

    rewards: list[float]
    per_grader: dict[str, list[float]] = field(default_factory=dict)
    errors: list[str | None] = field(default_factory=list)


Scorer = Callable[[list[str], list[dict[str, Any]]], Scores]


def scorer_for(grader: dict[str, Any]) -> Scorer:
    """The function that scores completions (texts) against their training lines (items)."""
    try:
        from posttrain.domain.graders import parse_grader  # type: ignore[import-not-found,unused-ignore]
        from posttrain.trainer.grading import score_batch  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return _string_check_scorer(grader)
    parsed = parse_grader(grader)

    def score(texts: list[str], items: list[dict[str, Any]]) -> Scores:
        results = score_batch(parsed, [{"output_text": t} for t in texts], items)
        per: dict[str, list[float]] = {}
        for result in results:
            for name, value in result.per_grader.items():
                per.setdefault(name, []).append(float(value))
        return Scores(rewards=[float(r.score) for r in results], per_grader=per, errors=[r.error for r in results])

    return score


_TEMPLATE = re.compile(r"\{\{\s*(sample|item)\.([A-Za-z0-9_.]+)\s*\}\}")


def _render(template: str, sample: dict[str, Any], item: dict[str, Any]) -> str:
    def value(match: re.Match[str]) -> str:
        node: Any = sample if match.group(1) == "sample" else item
        for part in match.group(2).split("."):
            if not isinstance(node, dict) or part not in node:
                raise KeyError(f"{match.group(0)} names no field of the {match.group(1)}")
            node = node[part]
        return node if isinstance(node, str) else str(node)

    return _TEMPLATE.sub(value, template)


def _string_check_scorer(grader: dict[str, Any]) -> Scorer:
    if grader.get("type") != "string_check":
        raise TrainerConfigError(f"this trainer has no {grader.get('type')!r} grader yet (string_check only)")
    operation = grader.get("operation", "eq")
    if operation not in ("eq", "ne", "like", "ilike"):
        raise TrainerConfigError(f"string_check operation must be eq, ne, like or ilike, not {operation!r}")
    name = str(grader.get("name") or "string_check")

    def one(text: str, item: dict[str, Any]) -> tuple[float, str | None]:
        try:
            got = _render(str(grader.get("input", "{{sample.output_text}}")), {"output_text": text}, item)
            want = _render(str(grader.get("reference", "")), {"output_text": text}, item)
        except KeyError as exc:
            return 0.0, str(exc)
        if operation == "eq":
            return float(got == want), None
        if operation == "ne":
            return float(got != want), None
        if operation == "like":
            return float(want in got), None
        return float(want.lower() in got.lower()), None

    def score(texts: list[str], items: list[dict[str, Any]]) -> Scores:
        pairs = [one(t, i) for t, i in zip(texts, items, strict=True)]
        rewards = [p[0] for p in pairs]
        return Scores(rewards=rewards, per_grader={name: rewards}, errors=[p[1] for p in pairs])

    return score
