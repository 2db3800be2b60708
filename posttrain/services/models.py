"""Finding the model a request names: a local folder, or a Hugging Face id already in the local cache.

Nothing is ever downloaded: a model that is not on this machine is refused at submit time, not
minutes later in the trainer.
"""

from __future__ import annotations

import json
from pathlib import Path

from posttrain.errors import InvalidRequest
from posttrain.services.paths import resolve_inside


def _cached_snapshot(model_id: str, hf_cache: Path) -> Path | None:
    """The newest snapshot of ``org/name`` in a Hugging Face hub cache, if any."""
    repo = hf_cache / f"models--{model_id.replace('/', '--')}"
    ref = repo / "refs" / "main"
    if ref.is_file():
        snapshot = repo / "snapshots" / ref.read_text().strip()
        if (snapshot / "config.json").is_file():
            return snapshot
    snapshots = sorted((repo / "snapshots").glob("*/config.json"), key=lambda p: p.stat().st_mtime) if repo.is_dir() else []
    return snapshots[-1].parent if snapshots else None


def resolve_model(
    name: str | None,
    *,
    model_roots: list[Path],
    hf_cache: Path,
    trust_remote_code: bool,
    field: str = "model",
    allow_adapter: bool = False,
) -> tuple[Path, Path | None]:
    """The model folder to load, and the LoRA adapter folder to merge into it first (if ``name``
    is an adapter checkpoint, e.g. a finished SFT job's, and ``allow_adapter``)."""
    if not name:
        raise InvalidRequest(f"{field}: a model is required (a local Hugging Face model folder or a cached model id)")
    if name.startswith(("/", "~", "file://")):
        folder = resolve_inside(name.removeprefix("file://"), roots=model_roots, field=field)
    else:
        if ".." in name.split("/") or name.count("/") > 1:
            raise InvalidRequest(f"{field}: '{name}' is neither an absolute folder path nor a model id like org/name")
        snapshot = _cached_snapshot(name, hf_cache)
        if snapshot is None:
            raise InvalidRequest(
                f"{field}: '{name}' is not in the local Hugging Face cache ({hf_cache}) and this server does not "
                "download models; pass the absolute path of a model folder instead"
            )
        folder = snapshot
    adapter_config = folder / "adapter_config.json"
    if allow_adapter and adapter_config.is_file() and not (folder / "config.json").is_file():
        try:
            base = json.loads(adapter_config.read_text())["base_model_name_or_path"]
        except (OSError, ValueError, KeyError) as exc:
            raise InvalidRequest(f"{field}: adapter_config.json of '{name}' names no base model: {exc}") from exc
        base_folder, _ = resolve_model(base, model_roots=model_roots, hf_cache=hf_cache,
                                       trust_remote_code=trust_remote_code, field=f"{field} (its base model)")
        return base_folder, folder
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise InvalidRequest(f"{field}: '{name}' has no config.json; it is not a Hugging Face model folder")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidRequest(f"{field}: config.json of '{name}' cannot be read: {exc}") from exc
    if config.get("auto_map") and not trust_remote_code:
        raise InvalidRequest(
            f"{field}: '{name}' ships its own model code (auto_map in config.json); this server runs it only when the "
            "operator sets POSTTRAIN_TRUST_REMOTE_CODE=true"
        )
    return folder, None
