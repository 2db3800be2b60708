"""The base models this server knows by name: what an OpenAI fine-tuning job's ``model`` names.

OpenAI's API names a model, never a path; so the names are each Hugging Face model folder directly
inside the model roots (``POSTTRAIN_MODEL_ROOTS``), by folder name, and each model id in the local
Hugging Face cache (``org/name``). Nothing is downloaded. One function lists them and one resolves
a name, so a models API can reuse both.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from posttrain.errors import NotFound
from posttrain.services.models import _cached_snapshot
from posttrain.settings import Settings

#: How many known names a "model not found" refusal lists.
NAMES_SHOWN = 5


@dataclass(frozen=True)
class KnownModel:
    name: str
    #: What the job's Submission names: the folder's absolute path, or the cached model id.
    reference: str
    created: int


class ModelNotFound(NotFound):
    """No base model with this name."""

    code = "model_not_found"
    param = "model"


def _hub_cache_ids(hf_cache: Path) -> list[KnownModel]:
    found = []
    if hf_cache.is_dir():
        for repo in sorted(hf_cache.glob("models--*")):
            model_id = repo.name.removeprefix("models--").replace("--", "/", 1)
            if model_id.count("/") == 1 and _cached_snapshot(model_id, hf_cache) is not None:
                found.append(KnownModel(name=model_id, reference=model_id, created=int(repo.stat().st_mtime)))
    return found


def known_models(settings: Settings) -> list[KnownModel]:
    """Every base model a job may name, by name (a folder name shadows nothing: the first root wins)."""
    models: dict[str, KnownModel] = {}
    hf_cache = settings.hf_cache.expanduser().resolve()
    for root in settings.allowed_model_roots:
        root = root.expanduser().resolve()
        if root == hf_cache or not root.is_dir():
            continue
        for folder in sorted(root.iterdir()):
            if folder.is_dir() and (folder / "config.json").is_file() and folder.name not in models:
                models[folder.name] = KnownModel(name=folder.name, reference=str(folder),
                                                 created=int(folder.stat().st_mtime))
    for cached in _hub_cache_ids(hf_cache):
        models.setdefault(cached.name, cached)
    return list(models.values())


def resolve_base_model(name: str, settings: Settings) -> KnownModel:
    """The model named ``name``, or ``ModelNotFound`` listing a few of the names this server knows."""
    models = known_models(settings)
    for model in models:
        if model.name == name:
            return model
    shown = ", ".join(sorted(m.name for m in models)[:NAMES_SHOWN]) or "none (put a model folder in a model root)"
    more = f" and {len(models) - NAMES_SHOWN} more" if len(models) > NAMES_SHOWN else ""
    raise ModelNotFound(f"The model '{name}' does not exist on this server; known models: {shown}{more}")
