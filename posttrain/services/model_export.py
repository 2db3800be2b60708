"""A fine-tuned model as one tar.gz to take away: the PEFT adapter folder (``adapter``) or a
plain safetensors model (``merged``) that loads without peft.

``merged`` is the checkpoint's own ``merged/`` when the job wrote one, the checkpoint itself for a
full fine-tune, else the adapter merged into its base now, by ``python -m
posttrain.trainer.merge_export`` in its own process (the API process never imports torch or
peft). The archive is written to a temporary file under the server's home, which the caller
streams and then removes; a merge's folder is removed as soon as it is archived.

What goes in: the model's top-level files (config, weights, tokenizer, chat template), never the
trainer's state (``training_state.pt``, ``trainer_state.json``) nor the checkpoint's subfolders.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from posttrain.errors import InvalidRequest, ServiceError
from posttrain.services.model_catalog import ADAPTER_CONFIG, MERGED, MODEL_CONFIG, ModelCatalog
from posttrain.settings import Settings

log = logging.getLogger("posttrain.services")

FORMATS = ("merged", "adapter")
#: Files of a checkpoint that are the trainer's, not the model's.
TRAINER_FILES = frozenset({"training_state.pt", "trainer_state.json"})
#: How long a merge may take before the export gives up (a large model on a slow disk).
MERGE_TIMEOUT_SECONDS = 3600.0
#: Scratch folders older than this are what a process killed mid-export (or a download cut off
#: before its clean-up ran) left; the next export removes them.
STALE_SCRATCH_SECONDS = 24 * 3600.0
#: One merge at a time: each holds a whole model in memory.
_MERGES = threading.Semaphore(1)


class MergeFailed(ServiceError):
    """The adapter could not be merged into its base."""

    status_code = 500
    title = "Internal Server Error"


@dataclass(frozen=True)
class Export:
    """The archive to stream, its download name, and the temporary folder to remove afterwards."""

    archive: Path
    filename: str
    scratch: Path

    def remove(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)


def _safe_name(model_id: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in model_id).strip("._") or "model"


def _model_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.is_symlink() and p.name not in TRAINER_FILES)


def _remove_stale(scratch_root: Path) -> None:
    cutoff = time.time() - STALE_SCRATCH_SECONDS
    for leftover in scratch_root.glob("export-*"):
        try:
            if leftover.is_dir() and not leftover.is_symlink() and leftover.stat().st_mtime < cutoff:
                shutil.rmtree(leftover, ignore_errors=True)
        except OSError:
            continue


class ModelExporter:
    def __init__(self, catalog: ModelCatalog, settings: Settings) -> None:
        self.catalog = catalog
        self.settings = settings

    def export(self, tenant: str, model_id: str, fmt: str) -> Export:
        if fmt not in FORMATS:
            raise InvalidRequest(f"format: must be one of {', '.join(FORMATS)}, not {fmt!r}")
        if self.catalog.is_base(model_id):
            raise InvalidRequest(f"'{model_id}' is a base model of this server; only fine-tuned models are exported")
        model = self.catalog.resolve_trained(tenant, model_id).model
        scratch_root = self.settings.resolved_home / "exports"
        scratch_root.mkdir(parents=True, exist_ok=True)
        _remove_stale(scratch_root)
        scratch = Path(tempfile.mkdtemp(prefix="export-", dir=scratch_root))
        try:
            folder = self._folder(model.adapter_path, model.base_path, model.tokenizer_path, fmt, scratch)
            name = f"{_safe_name(model_id)}-{fmt}"
            archive = scratch / f"{name}.tar.gz"
            with tarfile.open(archive, "w:gz") as tar:
                for path in _model_files(folder):
                    tar.add(path, arcname=f"{name}/{path.name}", recursive=False)
            merged_here = scratch / MERGED
            if merged_here.exists():
                shutil.rmtree(merged_here, ignore_errors=True)
            return Export(archive=archive, filename=archive.name, scratch=scratch)
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise

    def _folder(self, adapter: str | None, base: str, tokenizer: str, fmt: str, scratch: Path) -> Path:
        if fmt == "adapter":
            if adapter is None:
                raise InvalidRequest("format: this model is a full fine-tune, not a LoRA adapter; export it with "
                                     "format=merged")
            return Path(adapter)
        if adapter is None:
            return Path(base)  # a full fine-tune is its own merged model
        own = Path(adapter) / MERGED
        if (own / MODEL_CONFIG).is_file():
            return own
        return self._merge(adapter=adapter, base=base, tokenizer=tokenizer, out=scratch / MERGED)

    def _merge(self, *, adapter: str, base: str, tokenizer: str, out: Path) -> Path:
        if not (Path(adapter) / ADAPTER_CONFIG).is_file():
            raise InvalidRequest("this checkpoint holds no adapter to merge")
        command = [sys.executable, "-m", "posttrain.trainer.merge_export", "--base", base, "--adapter", adapter,
                   "--tokenizer", tokenizer, "--out", str(out)]
        if self.settings.trust_remote_code:
            command.append("--trust-remote-code")
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        try:
            with _MERGES:
                done = subprocess.run(command, capture_output=True, text=True, timeout=MERGE_TIMEOUT_SECONDS,
                                      stdin=subprocess.DEVNULL, env=env, check=False)
        except subprocess.TimeoutExpired as exc:
            raise MergeFailed(f"merging the adapter took longer than {MERGE_TIMEOUT_SECONDS:.0f} s") from exc
        if done.returncode != 0 or not (out / MODEL_CONFIG).is_file():
            log.error("merge for an export failed", extra={"action": "export_merge_failed",
                                                           "stderr": done.stderr[-4000:]})
            raise MergeFailed("merging the adapter into its base failed; the server log has the details")
        return out
