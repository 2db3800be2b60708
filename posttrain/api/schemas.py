"""Request and response bodies, exactly as the Llama Stack v1 spec shapes them.

Requests are strict (no type coercion) and closed (``extra="forbid"``) wherever the spec says
``additionalProperties: false``. Responses leave out optional fields that have no value rather
than send ``null``, since the spec types them as strings or objects, not nullable.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_serializer

from posttrain.domain.datasets import Dataset
from posttrain.domain.jobs import Checkpoint, Job
from posttrain.domain.recipes import MAX_ID_LENGTH, DataFormat, DPOLossType, OptimizerType
from posttrain.services.job_views import LlamaStackStatus, llama_stack_status

JSONObject = dict[str, Any]
Purpose = Literal["post-training/messages", "eval/question-answer", "eval/messages-answer"]


class SpecModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    @model_serializer(mode="wrap")
    def _drop_unset_optionals(self, handler):  # noqa: ANN001, ANN202
        data = handler(self)
        return {k: v for k, v in data.items() if v is not None}


class RequestModel(SpecModel):
    """A request body's part: besides strict and closed, no NaN or infinity in a float field (the
    body parser refuses them first; this keeps any other road in just as closed)."""

    model_config = ConfigDict(allow_inf_nan=False)


#: The most characters a path or URI field may have (Linux's PATH_MAX is 4096 bytes).
MAX_PATH_LENGTH = 4096

Identifier = Annotated[str, Field(min_length=1, max_length=MAX_ID_LENGTH)]
PathText = Annotated[str, Field(min_length=1, max_length=MAX_PATH_LENGTH)]


class Problem(BaseModel):
    """Error response (RFC 7807), as the Llama Stack spec's ``Error``."""

    model_config = ConfigDict(extra="forbid", title="Error")

    status: int
    title: str
    detail: str
    instance: str | None = None


#: The refusals any operation may answer with; declared so the OpenAPI document tells the truth.
PROBLEM_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": Problem, "description": description}
    for code, description in (
        (400, "The request was invalid or malformed"),
        (401, "A valid API key is required"),
        (404, "No such job, dataset or endpoint"),
        (409, "The request conflicts with the current state"),
        (413, "The request body is too large"),
        (429, "Too many requests, or too many queued jobs"),
        (500, "The server encountered an unexpected error"),
    )
}


# -- requests -----------------------------------------------------------------------------------


class RowsDataSource(RequestModel):
    type: Literal["rows"] = "rows"
    rows: list[JSONObject]


class URIDataSource(RequestModel):
    type: Literal["uri"] = "uri"
    uri: str


DataSource = Annotated[URIDataSource | RowsDataSource, Field(discriminator="type")]


class RegisterDatasetRequest(RequestModel):
    purpose: Purpose
    source: DataSource
    metadata: JSONObject | None = None
    dataset_id: Identifier | None = None


class AppendRowsRequest(RequestModel):
    rows: list[JSONObject]
    #: Clients 0.5 and later repeat the path's dataset_id in the body.
    dataset_id: Identifier | None = None


class CancelTrainingJobRequest(RequestModel):
    job_uuid: Identifier


class DataConfig(RequestModel):
    dataset_id: Identifier
    batch_size: int
    shuffle: bool
    data_format: DataFormat
    validation_dataset_id: Identifier | None = None
    packed: bool = False
    train_on_input: bool = False


class OptimizerConfig(RequestModel):
    optimizer_type: OptimizerType
    lr: float
    weight_decay: float
    num_warmup_steps: int


class EfficiencyConfig(RequestModel):
    enable_activation_checkpointing: bool = False
    enable_activation_offloading: bool = False
    memory_efficient_fsdp_wrap: bool = False
    fsdp_cpu_offload: bool = False


class TrainingConfig(RequestModel):
    """Clients 0.5 and later make everything but n_epochs optional and send ``null`` for what the
    caller left out; ``null`` means the spec's default here."""

    n_epochs: int
    max_steps_per_epoch: int | None = 1
    gradient_accumulation_steps: int | None = 1
    max_validation_steps: int | None = 1
    data_config: DataConfig | None = None
    optimizer_config: OptimizerConfig | None = None
    efficiency_config: EfficiencyConfig | None = None
    dtype: str | None = "bf16"


class LoraFinetuningConfig(RequestModel):
    type: Literal["LoRA"] = "LoRA"
    lora_attn_modules: list[str]
    apply_lora_to_mlp: bool
    apply_lora_to_output: bool
    rank: int
    alpha: int
    use_dora: bool = False
    quantize_base: bool = False


class QATFinetuningConfig(RequestModel):
    type: Literal["QAT"] = "QAT"
    quantizer_name: str
    group_size: int


def _algorithm_type(value: Any) -> str:
    """Clients 0.5 and later may leave out the ``type`` tag; without one the config is LoRA."""
    if isinstance(value, dict):
        return value.get("type") or "LoRA"
    return getattr(value, "type", "LoRA")


AlgorithmConfig = Annotated[
    Annotated[LoraFinetuningConfig, Tag("LoRA")] | Annotated[QATFinetuningConfig, Tag("QAT")],
    Discriminator(_algorithm_type),
]


class SupervisedFineTuneRequest(RequestModel):
    job_uuid: Identifier
    training_config: TrainingConfig
    hyperparam_search_config: JSONObject
    logger_config: JSONObject
    model: PathText | None = None
    checkpoint_dir: PathText | None = None
    algorithm_config: AlgorithmConfig | None = None


class DPOAlignmentConfig(RequestModel):
    beta: float
    loss_type: DPOLossType = "sigmoid"


class LegacyDPOAlignmentConfig(RequestModel):
    """The shape clients 0.2.x send (from an older spec); accepted with the DPO defaults."""

    reward_scale: float
    reward_clip: float
    epsilon: float
    gamma: float


class PreferenceOptimizeRequest(RequestModel):
    job_uuid: Identifier
    finetuned_model: PathText
    algorithm_config: DPOAlignmentConfig | LegacyDPOAlignmentConfig
    training_config: TrainingConfig
    hyperparam_search_config: JSONObject
    logger_config: JSONObject


# -- responses ----------------------------------------------------------------------------------


class PostTrainingJob(SpecModel):
    job_uuid: str


class ListPostTrainingJobsResponse(SpecModel):
    data: list[PostTrainingJob]

    @classmethod
    def from_uuids(cls, uuids: list[str]) -> ListPostTrainingJobsResponse:
        return cls(data=[PostTrainingJob(job_uuid=u) for u in uuids])


class PostTrainingMetric(SpecModel):
    epoch: int
    train_loss: float
    validation_loss: float
    perplexity: float


class CheckpointPublic(SpecModel):
    identifier: str
    created_at: datetime
    epoch: int
    post_training_job_id: str
    path: str
    training_metrics: PostTrainingMetric | None = None

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint) -> CheckpointPublic:
        metrics = None
        if ckpt.metrics is not None:
            m = ckpt.metrics
            metrics = PostTrainingMetric(
                epoch=m.epoch, train_loss=m.train_loss, validation_loss=m.validation_loss, perplexity=m.perplexity
            )
        return cls(
            identifier=ckpt.identifier,
            created_at=ckpt.created_at,
            epoch=ckpt.epoch,
            post_training_job_id=ckpt.job_uuid,
            path=ckpt.path,
            training_metrics=metrics,
        )


class PostTrainingJobStatusResponse(SpecModel):
    job_uuid: str
    status: LlamaStackStatus
    scheduled_at: datetime | None = None
    started_at: datetime | None = None
    completed_at: datetime | None = None
    resources_allocated: JSONObject | None = None
    checkpoints: list[CheckpointPublic]

    @classmethod
    def from_job(cls, job: Job) -> PostTrainingJobStatusResponse:
        return cls(
            job_uuid=job.job_uuid,
            status=llama_stack_status(job.status),
            scheduled_at=job.scheduled_at,
            started_at=job.started_at,
            completed_at=job.completed_at,
            resources_allocated=job.resources or None,
            checkpoints=[CheckpointPublic.from_checkpoint(c) for c in job.checkpoints],
        )


class PostTrainingJobArtifactsResponse(SpecModel):
    job_uuid: str
    checkpoints: list[CheckpointPublic]

    @classmethod
    def from_job(cls, job: Job) -> PostTrainingJobArtifactsResponse:
        return cls(job_uuid=job.job_uuid, checkpoints=[CheckpointPublic.from_checkpoint(c) for c in job.checkpoints])


def dataset_provider_id(source: dict[str, Any]) -> str:
    """The datasetio provider a Llama Stack distribution would have registered this source with:
    ``huggingface`` for ``huggingface://`` URIs, ``localfs`` for everything else (rows, files,
    ``data:`` and ``http(s)://`` URIs). Clients, and Llama Stack's own tests, filter on it. Derived
    from the stored source, so datasets registered before this answer the same way."""
    uri = source.get("uri") if source.get("type") == "uri" else None
    return "huggingface" if isinstance(uri, str) and uri[:12].lower() == "huggingface:" else "localfs"


class DatasetPublic(SpecModel):
    identifier: str
    provider_resource_id: str
    provider_id: str
    type: Literal["dataset"] = "dataset"
    purpose: Purpose
    source: DataSource
    metadata: JSONObject

    @classmethod
    def from_dataset(cls, dataset: Dataset) -> DatasetPublic:
        """The dataset as register, list and retrieve answer it: metadata only. A rows source
        answers ``{"type": "rows", "rows": []}`` (its rows come from paged iterrows), so registering
        46 MB of inline rows does not send 46 MB back."""
        source = {**dataset.source, "rows": []} if dataset.source.get("type") == "rows" else dataset.source
        return cls.model_validate(
            {
                "identifier": dataset.identifier,
                "provider_resource_id": dataset.identifier,
                "provider_id": dataset_provider_id(dataset.source),
                "type": "dataset",
                "purpose": dataset.purpose,
                "source": source,
                "metadata": dataset.metadata,
            },
            strict=False,
        )


class ListDatasetsResponse(SpecModel):
    data: list[DatasetPublic]


class PaginatedResponse(SpecModel):
    data: list[JSONObject]
    has_more: bool
    url: str | None = None


# -- our own extensions (not in the Llama Stack spec) -------------------------------------------


class JobEventPublic(BaseModel):
    """One entry of a job's event log: ``state``, ``started``, ``metric``, ``checkpoint`` or ``log``."""

    seq: int
    type: str
    created_at: datetime
    data: JSONObject


class JobEventsPublic(BaseModel):
    """A page of a job's events after a cursor; pass ``next_cursor`` as ``after`` to continue."""

    job_uuid: str
    status: str
    data: list[JobEventPublic]
    next_cursor: int
