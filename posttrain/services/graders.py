"""The submit-time policy on a reinforcement job's grader (the grader's shape is checked in domain).

Two refusals the grader's JSON alone cannot decide: a python grader runs the tenant's code, so on a
server with API keys it needs the operator's POSTTRAIN_ALLOW_PYTHON_GRADERS=true; and a score_model
grader needs a judge model this server serves, which it does not yet, so it is refused rather than
faked. Both raise GraderInvalid naming the grader's ``type`` field, which the API answers with 400.
"""

from __future__ import annotations

from posttrain.domain.graders import Grader, GraderInvalid, MultiGrader, SingleGrader
from posttrain.settings import Settings

PYTHON_REFUSED = ("python graders are off on this server (it has API keys, and a python grader runs the "
                  "tenant's code); the operator can allow them with POSTTRAIN_ALLOW_PYTHON_GRADERS=true")
PYTHON_OFF = "python graders are turned off on this server (POSTTRAIN_ALLOW_PYTHON_GRADERS=false)"
SCORE_MODEL_REFUSED = ("score_model graders need a judge model served by this server, and this server does not "
                       "serve models yet; use string_check, text_similarity, python or multi")


def python_graders_allowed(settings: Settings, keys_on: bool) -> bool:
    """The operator's choice, or by default: yes without API keys, no with them."""
    if settings.allow_python_graders is not None:
        return settings.allow_python_graders
    return not keys_on


def _named(grader: Grader, param: str) -> list[tuple[SingleGrader, str]]:
    if isinstance(grader, MultiGrader):
        return [(sub, f"{param}.graders.{key}") for key, sub in grader.graders.items()]
    return [(grader, param)]


def check_grader_allowed(grader: Grader, settings: Settings, keys_on: bool, *, param: str = "grader") -> None:
    """Raise GraderInvalid if this server will not run ``grader``; ``keys_on``: the server has API keys."""
    for sub, where in _named(grader, param):
        if sub.type == "score_model":
            raise GraderInvalid(SCORE_MODEL_REFUSED, f"{where}.type")
        if sub.type == "python" and not python_graders_allowed(settings, keys_on):
            refused = PYTHON_OFF if settings.allow_python_graders is False else PYTHON_REFUSED
            raise GraderInvalid(refused, f"{where}.type")
