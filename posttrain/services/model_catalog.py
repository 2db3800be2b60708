"""Every model a tenant can use, by its public id: the server's base models and what the tenant's
jobs trained. What ``GET/DELETE /v1/models`` and the serving worker resolve ids with.

- a base model: its name (``services.base_models``), owned by ``system``;
- an OpenAI job that succeeded: ``ft:<base>:<suffix or tenant>:<job id>``, its final checkpoint;
- each checkpoint of an OpenAI job: ``<that>:ckpt-step-<n>``; of a Llama Stack job: the
  checkpoint's ``identifier``, as the Llama Stack status endpoint shows it (the ``ft:`` names the
  fine-tuning API shows for a Llama Stack job resolve too, unlisted).

A checkpoint folder is a LoRA adapter (``adapter_config.json``) on the base it names (or on the
``base/`` folder a DPO job wrote beside it), or a full model (``config.json``). A checkpoint whose
folder is gone or holds neither is not listed. Another tenant's id is refused exactly like an
unknown one.

Deleting a fine-tuned model removes the files of every checkpoint of its job; deleting one
checkpoint removes that checkpoint's files (the job's final checkpoint is its fine-tuned model,
so that goes too). The job's rows and events stay; only the checkpoint rows are marked deleted.
"""

from __future__ import annotations

import builtins
import json
import logging
import shutil
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from posttrain.domain.jobs import TERMINAL, JobStatus
from posttrain.domain.serving import ServedModel
from posttrain.errors import Conflict, Forbidden
from posttrain.services.base_models import KnownModel, ModelNotFound, known_models
from posttrain.services.model_names import checkpoint_model_id, fine_tuned_name, is_openai_job, parse_fine_tuned
from posttrain.services.models import _cached_snapshot
from posttrain.settings import Settings
from posttrain.store.model_catalog import CatalogCheckpoint, CatalogJob, ModelCatalogStore

log = logging.getLogger("posttrain.services")

SYSTEM_OWNER = "system"
ADAPTER_CONFIG = "adapter_config.json"
MODEL_CONFIG = "config.json"
#: The folder a DPO job started from an unstackable adapter writes its starting model into.
STARTING_MODEL = "base"
MERGED = "merged"
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")


class BaseModelNotDeletable(Forbidden):
    """Base models belong to the server; only fine-tuned models can be deleted."""

    code = "model_not_deletable"
    param = "model"


class ModelInUse(Conflict):
    """The model's job is still training (or paused, to train again); its checkpoints stay until it ends."""

    code = "model_in_use"
    param = "model"


def not_found(model_id: str) -> ModelNotFound:
    """The one refusal for an id that is not the caller's: unknown, another tenant's, or deleted."""
    return ModelNotFound(f"The model '{model_id}' does not exist")


@dataclass(frozen=True)
class Resolved:
    """A fine-tuned id with what it stands for: its job and the checkpoints deleting it removes."""

    model: ServedModel
    job: CatalogJob
    checkpoints: tuple[CatalogCheckpoint, ...]


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path == root or root in path.parents for root in roots)


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


class ModelCatalog:
    def __init__(self, store: ModelCatalogStore, settings: Settings) -> None:
        self.store = store
        self.settings = settings

    # -- reads ---------------------------------------------------------------------------------

    def list(self, tenant: str) -> list[ServedModel]:
        """The bases, then the tenant's fine-tuned models and checkpoints, oldest job first."""
        found = [m for m in (self._base(k) for k in known_models(self.settings)) if m is not None]
        for job in self.store.jobs_with_checkpoints(tenant=tenant):
            for resolved in self._job_models(job):
                found.append(resolved.model)
        return found

    def resolve(self, tenant: str, model_id: str) -> ServedModel:
        """What ``model_id`` names for this tenant; ``ModelNotFound`` when it names nothing of its own."""
        base = self._base_named(model_id)
        if base is not None:
            return base
        return self._resolve_trained(tenant, model_id).model

    def resolve_trained(self, tenant: str, model_id: str) -> Resolved:
        """A fine-tuned id with its job (the export needs the checkpoint folder); a base is not one."""
        return self._resolve_trained(tenant, model_id)

    def bases(self) -> builtins.list[ServedModel]:
        """The base models this server can serve now (those whose folder is here)."""
        return [m for m in (self._base(k) for k in known_models(self.settings)) if m is not None]

    def of_job(self, tenant: str, job_uuid: str) -> builtins.list[ServedModel]:
        """One of the tenant's jobs' models, as ``list`` names them (its fine-tuned model, then its
        checkpoints oldest first); nothing for another tenant's job or one without checkpoints."""
        return [r.model for job in self.store.jobs_with_checkpoints(tenant=tenant, job_uuid=job_uuid)
                for r in self._job_models(job)]

    def is_base(self, model_id: str) -> bool:
        return any(k.name == model_id for k in known_models(self.settings))

    # -- delete --------------------------------------------------------------------------------

    def delete(self, tenant: str, model_id: str) -> builtins.list[str]:
        """Delete a fine-tuned model's checkpoint files (all of its job's for an ``ft:`` id, the one
        for a checkpoint id); the folders removed (with a ``base/`` inside one), for the serving
        worker to forget.

        A base model is refused (403); a job still training or paused is a 409 and nothing changes."""
        if self.is_base(model_id):
            raise BaseModelNotDeletable(f"The model '{model_id}' is a base model of this server; only fine-tuned "
                                        "models can be deleted")
        resolved = self._resolve_trained(tenant, model_id)
        job = resolved.job
        if job.status not in TERMINAL:
            raise ModelInUse(f"The model '{model_id}' belongs to job {job.job_uuid}, which is {job.status.value}; "
                             "cancel it or wait for it to finish before deleting its checkpoints")
        marked = self.store.mark_deleted(job_id=job.id, row_ids=[c.row_id for c in resolved.checkpoints])
        if marked == 0:  # the job was resumed or its checkpoints deleted meanwhile
            again = self.store.jobs_with_checkpoints(tenant=tenant, job_uuid=job.job_uuid)
            if again and again[0].status not in TERMINAL:
                raise ModelInUse(f"The model '{model_id}' belongs to job {job.job_uuid}, which is still training")
            raise not_found(model_id)
        removed = []
        for checkpoint in resolved.checkpoints:
            folder = self._owned_folder(job, checkpoint)
            if folder is None:
                log.warning("checkpoint folder outside its job's output folder left in place",
                            extra={"action": "model_delete_skipped", "path": checkpoint.path})
                continue
            starting = folder / STARTING_MODEL
            if (starting / MODEL_CONFIG).is_file():
                removed.append(str(starting))  # the base its adapter was served on
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(str(folder))
        log.info("deleted a fine-tuned model's checkpoints", extra={
            "action": "model_deleted", "tenant": tenant, "model": model_id, "job_uuid": job.job_uuid,
            "paths": removed})
        return removed

    # -- helpers -------------------------------------------------------------------------------

    def _base(self, known: KnownModel) -> ServedModel | None:
        folder = Path(known.reference)
        if not folder.is_absolute():
            snapshot = _cached_snapshot(known.reference, self.settings.hf_cache.expanduser().resolve())
            if snapshot is None:
                return None
            folder = snapshot
        return ServedModel(id=known.name, base_path=str(folder), adapter_path=None, tokenizer_path=str(folder),
                           owned_by=SYSTEM_OWNER, created=known.created)

    def _base_named(self, model_id: str) -> ServedModel | None:
        for known in known_models(self.settings):
            if known.name == model_id:
                return self._base(known)
        return None

    def _job_models(self, job: CatalogJob) -> builtins.list[Resolved]:
        """What a job shows in the list: an OpenAI job's fine-tuned model (once it succeeded) and
        its checkpoints by ``ft:`` names; a Llama Stack job's checkpoints by identifier."""
        out: builtins.list[Resolved] = []
        if is_openai_job(job.request):
            name = fine_tuned_name(job.request, job.model, tenant=job.tenant, job_uuid=job.job_uuid)
            final = self._fine_tuned(job, name)
            if final is not None:
                out.append(final)
            for checkpoint in job.live:
                resolved = self._checkpoint(job, checkpoint, checkpoint_model_id(name, checkpoint.step))
                if resolved is not None:
                    out.append(resolved)
        else:
            for checkpoint in job.live:
                resolved = self._checkpoint(job, checkpoint, checkpoint.identifier)
                if resolved is not None:
                    out.append(resolved)
        return out

    def _fine_tuned(self, job: CatalogJob, name: str) -> Resolved | None:
        """The job's fine-tuned model: its final checkpoint, while it succeeded and that checkpoint lives."""
        final = job.final
        if job.status is not JobStatus.COMPLETED or final is None or final.deleted:
            return None
        resolved = self._checkpoint(job, final, name, created=job.completed_at)
        if resolved is None:
            return None
        return Resolved(model=resolved.model, job=job, checkpoints=job.live)

    def _resolve_trained(self, tenant: str, model_id: str) -> Resolved:
        parsed = parse_fine_tuned(model_id)
        if parsed is not None:
            jobs = self.store.jobs_with_checkpoints(tenant=tenant, job_uuid=parsed.job_uuid)
            if jobs:
                job = jobs[0]
                name = fine_tuned_name(job.request, job.model, tenant=job.tenant, job_uuid=job.job_uuid)
                if name == parsed.fine_tuned:
                    if parsed.step is None:
                        found = self._fine_tuned(job, model_id)
                    else:
                        steps = [c for c in job.live if c.step == parsed.step]
                        found = self._checkpoint(job, steps[-1], model_id) if steps else None
                    if found is not None:
                        return found
        owner = self.store.job_of_checkpoint(tenant=tenant, identifier=model_id)
        for job in self.store.jobs_with_checkpoints(tenant=tenant, job_uuid=owner) if owner is not None else ():
            if is_openai_job(job.request):
                continue  # an OpenAI job's checkpoints are named by their ft: ids
            for checkpoint in job.live:
                if checkpoint.identifier == model_id:
                    found = self._checkpoint(job, checkpoint, model_id)
                    if found is not None:
                        return found
        raise not_found(model_id)

    def _checkpoint(self, job: CatalogJob, checkpoint: CatalogCheckpoint, model_id: str, *,
                    created: datetime | None = None) -> Resolved | None:
        """The served model a checkpoint folder is, or None when it is no longer loadable."""
        folder = self._owned_folder(job, checkpoint)
        if folder is None or not folder.is_dir():
            return None
        adapter_path: str | None = None
        if (folder / ADAPTER_CONFIG).is_file():
            base = self._adapter_base(folder)
            if base is None:
                return None
            adapter_path = str(folder)
        elif (folder / MODEL_CONFIG).is_file():
            base = folder
        else:
            return None
        tokenizer = folder if _has_tokenizer(folder) else base
        when = created or checkpoint.created_at
        model = ServedModel(id=model_id, base_path=str(base), adapter_path=adapter_path, tokenizer_path=str(tokenizer),
                            owned_by=job.tenant, created=int(when.timestamp()))
        return Resolved(model=model, job=job, checkpoints=(checkpoint,))

    def _owned_folder(self, job: CatalogJob, checkpoint: CatalogCheckpoint) -> Path | None:
        """The checkpoint's folder, when it lies inside its job's output folder (a row naming any
        other place is never loaded nor deleted)."""
        if not job.output_dir:
            return None
        folder = Path(checkpoint.path)
        if folder.is_symlink():
            return None
        folder, output = folder.resolve(), Path(job.output_dir).resolve()
        return folder if output in folder.parents else None

    def _adapter_base(self, folder: Path) -> Path | None:
        """The folder of the model an adapter applies to: the checkpoint's own ``base/`` when the
        job wrote one, else what ``base_model_name_or_path`` names, if it is a model folder inside
        the model roots or the Hugging Face cache (an adapter naming anything else is not served)."""
        starting = folder / STARTING_MODEL
        if (starting / MODEL_CONFIG).is_file():
            return starting.resolve()
        try:
            named = json.loads((folder / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if not isinstance(named, str) or not named:
            return None
        hf_cache = self.settings.hf_cache.expanduser().resolve()
        if named.startswith("/"):
            base = Path(named).resolve()
            if not (_inside(base, self.settings.allowed_model_roots) or _inside(base, [hf_cache])
                    or _inside(base, [folder.resolve()])):
                return None
        else:
            if ".." in named.split("/") or named.count("/") > 1:
                return None
            snapshot = _cached_snapshot(named, hf_cache)
            if snapshot is None:
                return None
            base = snapshot
        return base if (base / MODEL_CONFIG).is_file() else None
