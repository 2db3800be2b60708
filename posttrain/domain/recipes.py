"""The recipe: how a job trains, typed, with one home for each default and each check.

Every API door translates its request into a ``Recipe`` once (the Llama Stack door in
``api/llama_stack_recipes.py``; OpenAI's and a reinforcement method's will do the same); the service
stores it in the job's plan (``JobPlan``), the launcher hands it to the trainer inside a
``TrainerSpec``, and the trainer reads it back. Nothing below the API knows which door a job came
in by.

The models are frozen pydantic models: the JSON in the store and in the spec file is their
``model_dump``, read back with ``model_validate``. A check that fails raises ``RecipeInvalid``
naming the recipe's own field (``optimizer.lr``); each door renames the field to its own
spelling before the client sees it.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from posttrain.domain.graders import GraderInvalid, parse_grader
from posttrain.domain.pins import PathPin
from posttrain.errors import RecipeInvalid

Dtype = Literal["bf16", "fp16", "fp32"]
AttentionModule = Literal["q_proj", "k_proj", "v_proj", "output_proj"]
DPOLossType = Literal["sigmoid", "hinge", "ipo", "kto_pair"]
GRPOLossType = Literal["grpo", "dr_grpo", "dapo", "bnpo"]
GRPOScaleRewards = Literal["group", "batch", "none"]
ImportanceSamplingLevel = Literal["token", "sequence"]
DataFormat = Literal["instruct", "dialog"]
OptimizerType = Literal["adam", "adamw", "sgd"]

#: The learning rate of a job that names none (the Llama Stack spec has no default).
DEFAULT_LEARNING_RATE = 1e-4
#: The seed every job trains with (the Llama Stack request has no seed field).
DEFAULT_SEED = 42

# Generous but finite upper bounds on the recipe's sizes, so an absurd value (a rank of 2**40, a
# billion epochs) is refused at once with the bound, not accepted to hold a worker for ever or
# fail deep in the trainer. Real jobs sit orders of magnitude below each.
#: The largest LoRA rank (the hidden size of the largest open models is below it; the service
#: also refuses a rank above the model's own hidden size).
MAX_LORA_RANK = 65536
MAX_LORA_ALPHA = 1 << 20
MAX_EPOCHS = 10_000
MAX_STEPS_PER_EPOCH = 100_000_000
MAX_GRADIENT_ACCUMULATION = 65536
MAX_VALIDATION_STEPS = 10_000_000
MAX_BATCH_SIZE = 65536
#: The most epoch checkpoints a recipe may ask a job to keep (the operator's
#: ``POSTTRAIN_MAX_CHECKPOINTS_PER_JOB`` bounds it further).
MAX_KEEP_CHECKPOINTS = 1000
#: The most devices a recipe may ask for (the operator's ``POSTTRAIN_DEVICES_PER_JOB`` bounds it further).
MAX_DEVICES = 1024


class JobKind(str, enum.Enum):
    """The training method: which trainer runs the recipe."""

    SFT = "sft"
    DPO = "dpo"
    GRPO = "grpo"


class RecipePart(BaseModel):
    #: No NaN or infinity in a float: NaN passes every ``gt``/``ge`` bound and was trained on as 0.
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class Schedule(RecipePart):
    """How many steps, in what groups, and how much validation."""

    n_epochs: int = Field(1, ge=1, le=MAX_EPOCHS,
                          description=f"passes over the training rows (at most {MAX_EPOCHS})")
    max_steps_per_epoch: int = Field(1, ge=1, le=MAX_STEPS_PER_EPOCH,
                                     description=f"optimizer steps an epoch at most (at most {MAX_STEPS_PER_EPOCH})")
    gradient_accumulation_steps: int = Field(1, ge=1, le=MAX_GRADIENT_ACCUMULATION, description=(
        f"micro-batches summed into one optimizer step (at most {MAX_GRADIENT_ACCUMULATION})"))
    max_validation_steps: int = Field(1, ge=1, le=MAX_VALIDATION_STEPS, description=(
        f"validation batches at each epoch's end (at most {MAX_VALIDATION_STEPS})"))


class Data(RecipePart):
    """How rows become batches."""

    batch_size: int = Field(1, ge=1, le=MAX_BATCH_SIZE,
                            description=f"rows (or packs) a micro-batch (at most {MAX_BATCH_SIZE})")
    shuffle: bool = Field(True, description="length-grouped shuffled batches; false: the dataset's order")
    data_format: DataFormat = Field("instruct", description="which row layouts are tried first")
    packed: bool = Field(False, description="pack rows into sequences of the model's max length")
    train_on_input: bool = Field(False, description="also train on the prompt tokens, not only the answers")


class Optimizer(RecipePart):
    optimizer_type: OptimizerType = "adamw"
    lr: float = Field(DEFAULT_LEARNING_RATE, gt=0, description="peak learning rate (linear warmup, linear decay)")
    weight_decay: float = Field(0.0, ge=0)
    num_warmup_steps: int = Field(0, ge=0)


class LoRA(RecipePart):
    """A LoRA (or DoRA) adapter on a frozen base. ``attention`` uses Llama Stack's (torchtune's)
    module names, which the trainer maps onto each architecture's own; ``architecture_defaults``
    takes peft's default targets for the model's type instead (GPT-2's ``c_attn``, ...)."""

    attention: tuple[AttentionModule, ...] = ()
    architecture_defaults: bool = False
    mlp: bool = False
    output: bool = False
    rank: int = Field(8, ge=1, le=MAX_LORA_RANK, description=(
        f"the adapter's rank (at most {MAX_LORA_RANK} here; at submit also at most the model's hidden size, "
        "and the adapter no larger than the base model)"))
    alpha: int = Field(16, ge=1, le=MAX_LORA_ALPHA, description=f"LoRA's scale numerator (at most {MAX_LORA_ALPHA})")
    use_dora: bool = False
    quantize_base: bool = Field(False, description="QLoRA: the base's linear layers load as 4-bit NF4")

    @model_validator(mode="after")
    def _has_a_target(self) -> LoRA:
        if not (self.attention or self.architecture_defaults or self.mlp or self.output):
            raise _at("", "LoRA needs at least one target: attention modules, mlp or output")
        return self


#: QAT quantizers this server runs: torchao's class name as torchtune's QAT recipe names it, and its short name.
QAT_QUANTIZERS = ("Int8DynActInt4WeightQATQuantizer", "8da4w")


class QAT(RecipePart):
    """A full fine-tune whose linear layers compute with torchao's fake quantization."""

    quantizer_name: str = Field(description=" or ".join(QAT_QUANTIZERS))
    group_size: int = Field(ge=1, description="a power of two that divides the layers' input sizes")

    @model_validator(mode="after")
    def _known_quantizer_power_of_two(self) -> QAT:
        if self.quantizer_name not in QAT_QUANTIZERS:
            raise _at("quantizer_name", f"QAT supports {' or '.join(QAT_QUANTIZERS)} (int8 dynamic activations, "
                      f"int4 grouped weights), not {self.quantizer_name!r}")
        if self.group_size & (self.group_size - 1):
            raise _at("group_size", f"must be a power of two (e.g. 32 or 256), got {self.group_size}")
        return self


class DPOLoss(RecipePart):
    beta: float = Field(0.1, gt=0, description="strength of the pull towards the reference model")
    loss_type: DPOLossType = "sigmoid"


#: Bounds of a GRPO job's sampling: completions a prompt, tokens a completion, validation samples.
MAX_GENERATIONS = 256
MAX_COMPLETION_LENGTH = 32768
MAX_EVAL_SAMPLES = 64


class GRPO(RecipePart):
    """Group relative policy optimization (TRL's ``GRPOTrainer`` formulas, ``trainer/grpo_loss.py``):
    each step samples ``num_generations`` completions of each prompt, scores them with ``grader``,
    and pushes up the completions that scored above their group's mean."""

    num_generations: int = Field(4, ge=2, le=MAX_GENERATIONS, description=(
        f"completions sampled per prompt, the group each one's advantage is relative to (2 to {MAX_GENERATIONS})"))
    beta: float = Field(0.0, ge=0, le=100, description="weight of the per-token KL to the reference (0: no "
                        "reference model is run)")
    epsilon: float = Field(0.2, gt=0, lt=1, description="the ratio's lower clip: 1 - epsilon")
    epsilon_high: float | None = Field(None, gt=0, le=10, description="the ratio's upper clip: 1 + epsilon_high "
                                       "(DAPO's clip-higher); None: epsilon")
    loss_type: GRPOLossType = Field("dapo", description="how the per-token losses are averaged (TRL's names)")
    scale_rewards: GRPOScaleRewards = Field("group", description="divide the advantages by the group's reward "
                                            "std, the batch's, or not at all")
    importance_sampling_level: ImportanceSamplingLevel = "token"
    temperature: float = Field(1.0, gt=0, le=10, description="sampling temperature (also divides the logits "
                               "the loss scores)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling's probability mass")
    max_completion_length: int = Field(256, ge=1, le=MAX_COMPLETION_LENGTH, description=(
        f"tokens a sampled completion at most (at most {MAX_COMPLETION_LENGTH})"))
    grader: dict[str, Any] = Field(description="the grader that scores each completion, as OpenAI's grader object "
                                   "(checked with domain.graders.parse_grader, stored as sent)")
    eval_interval: int = Field(1, ge=1, le=MAX_STEPS_PER_EPOCH, description=(
        "every this many steps, the mean reward on the validation prompts"))
    eval_samples: int = Field(1, ge=1, le=MAX_EVAL_SAMPLES, description=(
        f"completions sampled for each validation prompt (at most {MAX_EVAL_SAMPLES})"))

    @model_validator(mode="after")
    def _grader_parses(self) -> GRPO:
        try:
            parse_grader(self.grader, param="grader")
        except GraderInvalid as exc:
            raise _at(exc.param, exc.message) from None
        return self

    @property
    def upper_epsilon(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high


#: The adapter a DPO job trains when its door offers no LoRA options (Llama Stack's DPO request has
#: none): the architecture's default attention targets, so the reference model is the same weights
#: with the adapter switched off and never a second copy in memory.
DPO_ADAPTER = LoRA(architecture_defaults=True, rank=8, alpha=16)


#: W&B's own bounds: a project or entity name of at most 128 characters, none of ``/\#?%:``; a
#: tag of at most 64 characters.
MAX_WANDB_NAME, MAX_WANDB_TAG, MAX_WANDB_TAGS = 128, 64, 50
_WANDB_FORBIDDEN = set("/\\#?%:")


class WandbRun(RecipePart):
    """The Weights & Biases run a job logs its step and checkpoint metrics to (OpenAI's
    ``integrations: [{"type": "wandb", ...}]``). Where it is written (offline files, or the W&B
    server) is the operator's choice, carried by the ``TrainerSpec``, not the client's."""

    project: str = Field(min_length=1, max_length=MAX_WANDB_NAME, description="the W&B project")
    name: str | None = Field(None, min_length=1, max_length=MAX_WANDB_NAME,
                             description="the run's display name; None: the job's id")
    entity: str | None = Field(None, min_length=1, max_length=MAX_WANDB_NAME,
                               description="the W&B team or user; None: the login's default entity")
    tags: tuple[str, ...] = Field((), max_length=MAX_WANDB_TAGS, description=(
        f"tags on the run (at most {MAX_WANDB_TAGS}, each 1 to {MAX_WANDB_TAG} characters)"))

    @model_validator(mode="after")
    def _names_wandb_accepts(self) -> WandbRun:
        for field in ("project", "entity"):
            value = getattr(self, field)
            if value is not None and (set(value) & _WANDB_FORBIDDEN or not is_printable_id(value)):
                raise _at(field, "W&B names may not hold any of / \\ # ? % : or control characters, "
                          f"got {value!r}")
        for index, tag in enumerate(self.tags):
            if not 0 < len(tag) <= MAX_WANDB_TAG or not is_printable_id(tag):
                raise _at(f"tags.{index}", f"a tag is 1 to {MAX_WANDB_TAG} printable characters, got {tag!r}")
        return self


class Recipe(RecipePart):
    """Everything that decides what a job computes, for every method."""

    method: JobKind
    schedule: Schedule = Schedule()
    data: Data = Data()
    optimizer: Optimizer = Optimizer()
    dtype: Dtype = Field("bf16", description="compute dtype asked for (a CPU without native bf16 computes fp32)")
    activation_checkpointing: bool = False
    adapter: LoRA | None = Field(None, description="None: every weight trains (a full fine-tune)")
    qat: QAT | None = None
    dpo: DPOLoss | None = None
    grpo: GRPO | None = None
    tensorboard: bool = Field(False, description="write TensorBoard event files next to the checkpoints")
    wandb: WandbRun | None = Field(None, description="also log the metrics to this Weights & Biases run "
                                   "(where to, offline or online, is the worker's POSTTRAIN_WANDB_MODE)")
    seed: int = DEFAULT_SEED
    keep_checkpoints: int | None = Field(None, ge=1, le=MAX_KEEP_CHECKPOINTS, description=(
        "keep only the newest this many epoch checkpoints (older folders are deleted as new ones are written); "
        "None: the operator's POSTTRAIN_KEEP_CHECKPOINTS; always at most POSTTRAIN_MAX_CHECKPOINTS_PER_JOB"))
    devices: int | None = Field(None, ge=1, le=MAX_DEVICES, description=(
        "devices (GPUs, or CPU processes) an SFT or DPO job trains on, data parallel (FSDP2 for a full "
        "fine-tune); None: the operator's "
        "POSTTRAIN_DEVICES_PER_JOB; always at most that. Each optimizer step then takes data.batch_size x "
        "gradient_accumulation_steps rows on each device"))
    #: What the door accepted but could not honour as asked, for the job's log (e.g. the DPO
    #: options of an older client, which have no DPO meaning).
    notes: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _method_fits(self) -> Recipe:
        if self.adapter is not None and self.qat is not None:
            raise _at("qat", "a QAT job is a full fine-tune and takes no LoRA adapter")
        if self.method is not JobKind.DPO and self.dpo is not None:
            raise _at("dpo", "only a DPO job takes DPO options")
        if self.method is not JobKind.GRPO and self.grpo is not None:
            raise _at("grpo", "only a GRPO job takes GRPO options")
        if self.method not in (JobKind.SFT, JobKind.DPO) and (self.devices or 1) > 1:
            raise _at("devices", f"a {self.method.value} job trains on one device; only supervised fine-tuning "
                      "and DPO run on several")
        if self.method is JobKind.GRPO:
            self._grpo_fits()
        if self.method is JobKind.DPO:
            if self.dpo is None:
                raise _at("dpo", "a DPO job needs its DPO options (beta, loss_type)")
            if self.adapter is None:
                raise _at("adapter", "DPO trains a LoRA adapter (its reference is the base without it)")
            if self.qat is not None:
                raise _at("qat", "not supported for preference optimization")
            if self.data.packed:
                raise _at("data.packed", "not supported for preference optimization (this server does not pack "
                          "preference pairs); send packed: false or leave it out")
            if self.data.train_on_input:
                raise _at("data.train_on_input", "not supported for preference optimization (DPO compares the "
                          "answers' log-probabilities; the prompt is never trained on); send train_on_input: false "
                          "or leave it out")
        return self

    def _grpo_fits(self) -> None:
        if self.grpo is None:
            raise _at("grpo", "a GRPO job needs its GRPO options (num_generations, grader, ...)")
        if self.qat is not None:
            raise _at("qat", "not supported for reinforcement fine-tuning")
        if self.data.packed:
            raise _at("data.packed", "not supported for reinforcement fine-tuning (completions are sampled, "
                      "not packed); send packed: false or leave it out")
        if self.data.train_on_input:
            raise _at("data.train_on_input", "not supported for reinforcement fine-tuning (only the sampled "
                      "completions are trained on)")
        if self.adapter is None and self.grpo.beta > 0:
            raise _at("grpo.beta", "a full fine-tune with beta > 0 would hold a second, frozen copy of the model "
                      "as its reference; train a LoRA adapter (its reference is the base with the adapter off) "
                      "or set beta to 0")
        if self.data.batch_size * self.grpo.num_generations > MAX_BATCH_SIZE:
            raise _at("data.batch_size", f"batch_size x num_generations completions a micro-batch is at most "
                      f"{MAX_BATCH_SIZE}")

    @property
    def is_lora(self) -> bool:
        return self.adapter is not None


class _FieldError(ValueError):
    """A check about one field (its path within the model being validated, "" for the model
    itself), raised inside a validator so the message can name the field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def _at(field: str, message: str) -> _FieldError:
    return _FieldError(field, message)


def build_recipe(data: Mapping[str, Any]) -> Recipe:
    """A ``Recipe`` from plain data, or ``RecipeInvalid`` whose ``field`` is the recipe path of the
    first thing wrong (``optimizer.lr``) and whose message says how to fix it."""
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise recipe_error(exc) from None


def recipe_error(exc: ValidationError) -> RecipeInvalid:
    """The first error of a recipe's validation, as a ``RecipeInvalid`` naming its field."""
    first = exc.errors()[0]
    cause = (first.get("ctx") or {}).get("error")
    location = ".".join(str(part) for part in first["loc"] if not str(part).startswith("function-"))
    if isinstance(cause, _FieldError):
        field, message = ".".join(part for part in (location, cause.field) if part), str(cause)
    elif cause is not None:
        field, message = location, str(cause)
    else:
        field, message = location, first["msg"]
        if "input" in first and first["type"] not in ("missing", "extra_forbidden"):
            message = f"{message}, got {first['input']!r}"
    return RecipeInvalid(field=field or None, reason=message)


#: The most characters a client-chosen id (job_uuid, dataset_id) may have: the store's column width.
MAX_ID_LENGTH = 255


def is_printable_id(value: str) -> bool:
    """1 to ``MAX_ID_LENGTH`` characters, none a control character or a lone surrogate (which no
    UTF-8 writer, the store's or a response's, can encode)."""
    return 0 < len(value) <= MAX_ID_LENGTH and not any(ord(c) < 32 or ord(c) == 127 or 0xD800 <= ord(c) <= 0xDFFF
                                                         for c in value)


class SubmissionNames(RecipePart):
    """How the door that took a submission spells its fields, so the service's refusals name
    them as the client wrote them."""

    model: str = "model"
    dataset_id: str = "dataset_id"
    validation_dataset_id: str = "validation_dataset_id"
    checkpoint_dir: str = "checkpoint_dir"


class Submission(RecipePart):
    """A training request as every door hands it to the service: the recipe, and the model and
    datasets it names (still unresolved: the service finds them and refuses what it cannot)."""

    job_uuid: str
    model: str | None
    dataset_id: str
    validation_dataset_id: str | None = None
    checkpoint_dir: str | None = None
    recipe: Recipe
    names: SubmissionNames = SubmissionNames()

    @model_validator(mode="after")
    def _printable_ids(self) -> Submission:
        for field in ("job_uuid", "dataset_id", "validation_dataset_id"):
            value = getattr(self, field)
            if (field == "job_uuid" or value is not None) and not is_printable_id(value):
                name = field if field == "job_uuid" else getattr(self.names, field)
                raise _at(name, f"must be 1 to {MAX_ID_LENGTH} printable characters")
        return self


def build_submission(data: Mapping[str, Any]) -> Submission:
    """A ``Submission`` from plain data, or ``RecipeInvalid`` naming the first field wrong."""
    try:
        return Submission.model_validate(data)
    except ValidationError as exc:
        raise recipe_error(exc) from None


class Judge(RecipePart):
    """The judge of a ``score_model`` grader, resolved for the submitting tenant at submit time: a
    base model of this server or one of the tenant's own fine-tuned models (its folders pinned in
    the plan's ``pins`` with roles ``judge_model``/``judge_adapter``)."""

    model: str = Field(description="the model id the grader names")
    base_path: str = Field(description="absolute folder of the judge's (base) model")
    adapter_path: str | None = Field(None, description="a LoRA adapter folder applied on base_path, or null")
    tokenizer_path: str = Field(description="the folder the judge's tokenizer loads from")


class JobPlan(RecipePart):
    """What the service resolved at submit time: all a launcher needs to run the job."""

    recipe: Recipe
    model: str = Field(description="absolute folder of the base model")
    adapter: str | None = Field(None, description="a LoRA adapter folder merged into the model before training")
    output_dir: str = Field(description="where the checkpoints go")
    train_rows_path: str = Field(description="the job's own copy of its training rows (JSON lines)")
    validation_rows_path: str | None = None
    pins: tuple[PathPin, ...] = Field((), description="the model, adapter and output folders as checked at submit, "
                                      "re-checked before use (none for plans stored before pins existed)")
    judges: tuple[Judge, ...] = Field((), description="the judges of the job's score_model graders, one per "
                                      "model id they name (none for other graders)")


class TrainerSpec(RecipePart):
    """The trainer's input (``python -m posttrain.trainer SPEC.json``): the plan, plus how this
    worker runs it (docs/trainer-protocol.md)."""

    job_uuid: str
    plan: JobPlan
    device: Literal["auto", "cpu", "cuda"] = "auto"
    cuda_visible_devices: str | None = None
    cpu_bf16: bool = True
    compile: Literal["auto", "on", "off"] = "auto"
    resume_dir: str | None = None
    resume_every_seconds: float | None = None
    threads: int | None = None
    trust_remote_code: bool = False
    save_merged: bool = False
    #: The newest epoch checkpoints the trainer keeps on disk (older ones are deleted); None keeps all.
    keep_checkpoints: int | None = Field(None, ge=1)
    #: How this worker logs a recipe's ``wandb`` run (``POSTTRAIN_WANDB_MODE``), and where its files go.
    wandb_mode: Literal["off", "offline", "online"] = "off"
    wandb_dir: str | None = None
    #: What a python grader's sandbox hides (the server's data folder, file roots, a SQLite store
    #: elsewhere, the W&B folder): the tenant's code must not read the server's or other tenants' files.
    grader_hidden_paths: tuple[str, ...] = ()

    @property
    def recipe(self) -> Recipe:
        return self.plan.recipe
