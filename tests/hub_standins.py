"""Offline stand-ins for Hugging Face hub ids: a model folder laid out as a hub-cache snapshot, and
rows laid out as ``datasets.load_dataset`` leaves a prepared split in the datasets cache.

There is no hub here; the server reads only these caches (``services.models``,
``services.dataset_sources``), so a stand-in put where a download would have put the real thing
is what the server serves for that id.
"""

from __future__ import annotations

import glob
import json
import shutil
from pathlib import Path

SNAPSHOT = "0" * 40  # the commit hash a snapshot folder is named by


def cache_model(hub: Path, repo_id: str, folder: Path) -> Path:
    """Copy ``folder`` into ``hub`` as the main snapshot of ``repo_id`` (``models--org--name``)."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / SNAPSHOT
    shutil.copytree(folder, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(SNAPSHOT)
    return snapshot


def cache_dataset(datasets_cache: Path, repo_id: str, rows: list[dict], *, split: str = "train") -> None:
    """Prepare ``rows`` as split ``split`` of ``repo_id``'s default config in ``datasets_cache``
    (``$HF_HOME/datasets``), where an offline ``load_dataset(repo_id, split=...)`` finds it."""
    from datasets.packaged_modules.json.json import Json

    owner, _, name = repo_id.rpartition("/")
    work = datasets_cache.parent / f".build-{owner}-{name}"
    work.mkdir(parents=True)
    source = work / "rows.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    builder = Json(cache_dir=str(work / "build"), data_files={split: str(source)}, dataset_name=name, hash="0" * 16)
    builder.download_and_prepare()
    prepared = glob.glob(str(work / "build" / name / "default-*"))[0]
    target = datasets_cache / (f"{owner}___{name}" if owner else name)
    target.mkdir(parents=True)
    shutil.move(prepared, target / "default")
    shutil.rmtree(work)
