"""A hyperparameter search, as the Llama Stack request's ``hyperparam_search_config`` asks for it.

The config names, for each searched field, a dotted path into the Llama Stack request
(``training_config.optimizer_config.lr``; the ``training_config.`` prefix may be left out, so the
issue's ``optimizer_config.lr`` is the same field) and a range: ``uniform`` and ``loguniform``
floats, ``int`` integers, or a ``choice`` of values. The search runs ``num_trials`` trials, at most
``max_concurrent_trials`` at a time, each an ordinary child job whose recipe is the parent's with
the trial's values put in (``apply``).

Everything is checked at submit (``parse_search``): an unknown key, a path this server cannot
search, a range the recipe would refuse at either end (or a choice it would refuse) is a
``RecipeInvalid`` naming ``hyperparam_search_config.…``, so a search that is accepted only runs
trials the trainer can run. ``{}`` is no search: an ordinary job.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from posttrain.domain.recipes import Recipe, build_recipe
from posttrain.errors import RecipeInvalid

__all__ = [
    "MAX_SEARCH_PARAMS",
    "MAX_TRIALS",
    "SEARCHABLE",
    "SearchConfig",
    "apply",
    "parse_search",
]

#: The request's field for the search, as refusals name it.
FIELD = "hyperparam_search_config"

#: The hard bounds of the domain; the operator's ``POSTTRAIN_MAX_SEARCH_TRIALS`` caps trials further.
MAX_TRIALS = 1000
MAX_SEARCH_PARAMS = 16
MAX_CHOICES = 64

#: The request paths a search may vary -> the recipe's section and field that hold them.
SEARCHABLE: dict[str, tuple[str, str]] = {
    "training_config.optimizer_config.lr": ("optimizer", "lr"),
    "training_config.optimizer_config.weight_decay": ("optimizer", "weight_decay"),
    "training_config.optimizer_config.num_warmup_steps": ("optimizer", "num_warmup_steps"),
    "training_config.n_epochs": ("schedule", "n_epochs"),
    "training_config.max_steps_per_epoch": ("schedule", "max_steps_per_epoch"),
    "training_config.gradient_accumulation_steps": ("schedule", "gradient_accumulation_steps"),
    "training_config.data_config.batch_size": ("data", "batch_size"),
    "algorithm_config.rank": ("adapter", "rank"),
    "algorithm_config.alpha": ("adapter", "alpha"),
    "algorithm_config.beta": ("dpo", "beta"),
}

#: What each recipe section is called in the request, for "the request has no …" refusals.
SECTION_NAMES = {"adapter": "LoRA algorithm_config", "dpo": "DPO algorithm_config"}


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Uniform(_Closed):
    type: Literal["uniform"]
    low: float
    high: float

    def values_to_check(self) -> list[Any]:
        return [self.low, self.high]


class LogUniform(_Closed):
    type: Literal["loguniform"]
    low: float = Field(gt=0)
    high: float = Field(gt=0)

    def values_to_check(self) -> list[Any]:
        return [self.low, self.high]


class IntRange(_Closed):
    type: Literal["int"]
    low: int
    high: int
    step: int = Field(1, ge=1)
    log: bool = False

    def values_to_check(self) -> list[Any]:
        return [self.low, self.high]


class Choice(_Closed):
    type: Literal["choice"]
    values: list[float | int | str | bool] = Field(min_length=1, max_length=MAX_CHOICES)

    def values_to_check(self) -> list[Any]:
        return list(self.values)


Param = Annotated[Uniform | LogUniform | IntRange | Choice, Field(discriminator="type")]


class SearchConfig(_Closed):
    """The typed ``hyperparam_search_config``; ``search_space`` keys are the full request paths
    (``training_config.optimizer_config.lr``), whatever spelling the client used."""

    search_space: dict[str, Param] = Field(min_length=1, max_length=MAX_SEARCH_PARAMS)
    num_trials: int = Field(ge=1, le=MAX_TRIALS)
    max_concurrent_trials: int = Field(1, ge=1, le=MAX_TRIALS)
    metric: Literal["validation_loss", "train_loss", "perplexity"] = "validation_loss"
    mode: Literal["min", "max"] = "min"
    pruner: Literal["median", "none"] = "median"
    sampler: Literal["tpe", "random"] = "tpe"
    seed: int = Field(0, ge=0, le=2**31 - 1)
    #: Epochs a trial runs before the pruner may stop it (Optuna's ``n_warmup_steps``).
    prune_after_epochs: int = Field(0, ge=0, le=1000)


def full_path(key: str) -> str | None:
    """The request path ``key`` names (with or without ``training_config.``), None when no
    searchable field has it."""
    if key in SEARCHABLE:
        return key
    if f"training_config.{key}" in SEARCHABLE:
        return f"training_config.{key}"
    return None


def parse_search(raw: Mapping[str, Any], recipe: Recipe) -> SearchConfig | None:
    """The search ``raw`` asks for on top of ``recipe`` (the parent's), None for ``{}``; a
    ``RecipeInvalid`` naming ``hyperparam_search_config.<path>`` for anything wrong."""
    if not raw:
        return None
    unknown = sorted(str(key) for key in raw if key not in SearchConfig.model_fields)
    if unknown:
        known = ", ".join(SearchConfig.model_fields)
        raise RecipeInvalid(field=f"{FIELD}.{unknown[0]}", reason=f"not a key of a search; the keys are {known}")
    space = raw.get("search_space")
    if isinstance(space, dict):
        renamed: dict[str, Any] = {}
        for key, param in space.items():
            path = full_path(str(key))
            if path is None:
                allowed = ", ".join(sorted(SEARCHABLE))
                raise RecipeInvalid(field=f"{FIELD}.search_space.{key}",
                                    reason=f"not a field this server can search; searchable: {allowed}")
            if path in renamed:
                raise RecipeInvalid(field=f"{FIELD}.search_space.{key}", reason=f"names {path} twice")
            renamed[path] = param
        raw = {**raw, "search_space": renamed}
    try:
        config = SearchConfig.model_validate(dict(raw))
    except ValidationError as exc:
        first = exc.errors()[0]
        location = ".".join(str(p) for p in first["loc"] if p not in ("uniform", "loguniform", "int", "choice"))
        message = first["msg"] + (f", got {first['input']!r}" if first["type"] not in ("missing", "extra_forbidden")
                                  and not isinstance(first.get("input"), dict) else "")
        raise RecipeInvalid(field=f"{FIELD}.{location}" if location else FIELD, reason=message) from None
    if config.max_concurrent_trials > config.num_trials:
        raise RecipeInvalid(field=f"{FIELD}.max_concurrent_trials",
                            reason=f"at most num_trials ({config.num_trials}), got {config.max_concurrent_trials}")
    for path, param in config.search_space.items():
        _check_param(path, param, recipe)
    return config


def _check_param(path: str, param: Uniform | LogUniform | IntRange | Choice, recipe: Recipe) -> None:
    field = f"{FIELD}.search_space.{path}"
    section, _ = SEARCHABLE[path]
    if getattr(recipe, section) is None:
        raise RecipeInvalid(field=field, reason=f"the request has no {SECTION_NAMES.get(section, section)} to search")
    if isinstance(param, Uniform | LogUniform | IntRange):
        if not all(math.isfinite(v) for v in (param.low, param.high)):
            raise RecipeInvalid(field=field, reason="low and high must be finite numbers")
        if param.low > param.high or (param.low == param.high and not isinstance(param, IntRange)):
            raise RecipeInvalid(field=field, reason=f"low must be below high, got {param.low} and {param.high}")
    if isinstance(param, IntRange) and param.log and param.low < 1:
        raise RecipeInvalid(field=field, reason="a log int range needs low >= 1")
    if isinstance(param, Choice) and len(set(map(repr, param.values))) != len(param.values):
        raise RecipeInvalid(field=field, reason="the choice lists a value twice")
    for value in param.values_to_check():
        try:
            apply(recipe, {path: value})
        except RecipeInvalid as refusal:
            raise RecipeInvalid(field=field, reason=f"{value!r} would not be a valid {path}: {refusal.reason}") from None


def apply(recipe: Recipe, params: Mapping[str, Any]) -> Recipe:
    """``recipe`` with each request path of ``params`` set to its value (``RecipeInvalid`` when
    the recipe refuses a value)."""
    data = recipe.model_dump(mode="python")
    for path, value in params.items():
        section, name = SEARCHABLE[path]
        if data.get(section) is None:
            raise RecipeInvalid(field=path, reason=f"the request has no {SECTION_NAMES.get(section, section)}")
        data[section] = {**data[section], name: value}
    return build_recipe(data)
