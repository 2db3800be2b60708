"""Server configuration: the only module that reads environment variables.

Every setting has a default that gives the embedded single-machine setup (SQLite in the data
folder, a local worker with one slot, 127.0.0.1:8321) and an environment variable
``POSTTRAIN_<NAME>`` that overrides it. The README's configuration table is written from this
class; keep the two in step.
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_home() -> Path:
    return Path(os.path.expanduser("~/.posttrain"))


def _default_hf_cache() -> Path:
    hub = os.environ.get("HF_HUB_CACHE")
    if hub:
        return Path(hub)
    hf_home = os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface"))
    return Path(hf_home) / "hub"


class Settings(BaseSettings):
    """Everything an operator can set. Paths are resolved against ``home`` when relative."""

    model_config = SettingsConfigDict(env_prefix="POSTTRAIN_", extra="ignore")

    home: Path = Field(default_factory=_default_home, description="Data folder: database, datasets, job folders.")
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL of the store; default is a SQLite file in the data folder. "
        "Use postgresql+psycopg://… to share one store between several servers and workers.",
    )
    host: str = Field(default="127.0.0.1", description="Address the API binds to.")
    port: int = Field(default=8321, description="Port the API listens on (the Llama Stack default).")
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Host names a request's Host header may name besides localhost, any IP address and "
        "POSTTRAIN_HOST (others get 421: DNS rebinding); '*' allows any.",
    )
    worker_slots: int = Field(default=1, ge=0, description="Jobs this machine trains at once; 0 runs the API only.")
    run_worker: bool = Field(default=True, description="Run the scheduler inside `posttrain serve`.")
    lease_seconds: float = Field(default=30.0, gt=0, description="A running job whose lease is older than this is requeued.")
    heartbeat_seconds: float = Field(default=5.0, gt=0, description="How often a launcher renews its job's lease.")
    poll_seconds: float = Field(default=0.5, gt=0, description="How often the scheduler looks for work.")
    cancel_grace_seconds: float = Field(default=10.0, ge=0,
                                        description="Time a cancelled trainer gets to stop before it is killed.")
    max_attempts: int = Field(default=3, ge=1, description="Tries a job gets before a lost worker fails it for good.")
    max_search_trials: int = Field(default=32, ge=1, le=1000, description="The most trials one hyperparameter search "
                                   "(hyperparam_search_config.num_trials) may ask for; more is a 400.")
    trainer_threads: int | None = Field(default=None, ge=1, description="CPU threads per trainer; default: "
                                                         "OMP_NUM_THREADS when set, else all cores.")
    warm_trainers: int = Field(default=1, ge=0, description="Trainer processes kept started, with torch imported, "
                               "while a slot is idle: the next job skips seconds of start-up. 0 turns this off.")
    save_merged_checkpoints: bool = Field(default=False, description="Also write each LoRA checkpoint merged into its "
                                          "base (checkpoint/merged/): loads without peft, costs a model's size on disk.")
    wandb_mode: Literal["off", "offline", "online"] = Field(
        default="off", description="Weights & Biases logging of OpenAI jobs that ask for it (integrations: "
        "[{type: wandb}]): off refuses them (400); offline writes each run under POSTTRAIN_WANDB_DIR (upload later "
        "with `wandb sync`); online sends it with the worker's W&B login (WANDB_API_KEY). Needs `pip install wandb`.")
    wandb_dir: Path | None = Field(default=None, description="Where the trainer writes W&B run files (an offline "
                                   "run's whole log); default <home>/wandb.")
    executor: Literal["local", "ray"] = Field(
        default="local", description="Where jobs train: local, a trainer process on this machine; ray, one Ray Train "
        "run per job on the Ray cluster at POSTTRAIN_RAY_ADDRESS (`posttrain worker --executor ray`; needs "
        "`pip install 'posttrain[ray]'` and folders every node sees at the same paths, docs/scale-out.md).")
    ray_address: str | None = Field(default=None, description="The Ray cluster the ray executor connects to "
                                    "(host:port of its head, e.g. 10.0.0.1:6379); default: Ray's own choice "
                                    "(RAY_ADDRESS, else the cluster `ray start` began on this machine).")
    ray_workers: int = Field(default=1, ge=1, description="Ray Train workers (ranks, each one trainer process on a "
                             "device of its own) that one job of the ray executor runs on.")
    ray_max_failures: int = Field(default=3, ge=0, description="Times Ray Train restarts a job's worker group after "
                                  "a lost rank (each restart resumes from the newest checkpoint) before the attempt "
                                  "ends and the job is requeued.")
    trainer_nice: int = Field(default=10, ge=0, le=19, description="Niceness of trainer processes so the API stays responsive.")
    device: str = Field(default="auto", description="auto | cpu | cuda")
    gpus: list[str] | None = Field(default=None, description="GPU ids to run jobs on, one job per GPU (each trainer "
                                   "sees only its own through CUDA_VISIBLE_DEVICES); default: this process's "
                                   "CUDA_VISIBLE_DEVICES, else every GPU nvidia-smi lists; none with device=cpu.")
    devices_per_job: int = Field(default=1, ge=1, le=1024, description="Devices one SFT or DPO job trains on at most "
                                 "(LoRA and DPO data parallel, DDP; a full fine-tune sharded, FSDP2): "
                                 "that many GPUs of this machine (nccl), or on a CPU that many "
                                 "processes (gloo), started with torch.distributed.run; also each job's default. A "
                                 "job may ask for fewer (header X-Posttrain-Devices). With GPUs each job holds this "
                                 "many of them. 1: one process, as before.")
    resume_point_seconds: float = Field(default=600.0, ge=0, description="Seconds of training between mid-epoch "
                                        "resume points (model or adapter, optimizer, position in the data) in the "
                                        "job's folder, so a lost job redoes at most this much of an epoch. 0: none.")
    keep_checkpoints: int = Field(default=5, ge=1, description="Epoch checkpoints a job keeps when its recipe names "
                                  "no number: the newest this many; older folders (and their rows in the job's "
                                  "status) are deleted as new ones are written.")
    max_checkpoints_per_job: int = Field(default=20, ge=1, le=1000, description="The most epoch checkpoints any job "
                                         "keeps, whatever its recipe asks; also the most a job's status lists.")
    compile: Literal["auto", "on", "off"] = Field(
        default="auto", description="torch.compile the model: auto when a job's remaining training, timed on its "
        "first steps, is over 5 minutes (compiling each decoder layer costs ~10-50 s; ~1.25x faster after); on: always; "
        "off: never.")
    cpu_bf16: bool = Field(default=True, description="On a CPU with native bf16 (AVX512-BF16 or AMX), compute jobs "
                           "that ask for bf16 in bf16 (about twice as fast as fp32 there). Off, or on other CPUs: fp32.")
    model_roots: list[Path] = Field(
        default_factory=list,
        description="Folders a request's model path may point into (default: <home>/models and the Hugging Face hub cache).",
    )
    file_roots: list[Path] = Field(
        default_factory=list,
        description="Folders a dataset URI or checkpoint_dir may point into (default: <home>/files). With API keys "
        "each tenant has its own area in each, <root>/<tenant>/, and reads or writes nothing else there; without "
        "keys the single tenant (default) uses the whole roots.",
    )
    shared_file_roots: list[Path] = Field(
        default_factory=list,
        description="Folders of read-only data every tenant may register datasets from; never a checkpoint_dir.",
    )
    hf_cache: Path = Field(default_factory=_default_hf_cache, description="Hugging Face hub cache searched for model ids.")
    trust_remote_code: bool = Field(default=False, description="Allow models that ship their own code.")
    allow_python_graders: bool | None = Field(
        default=None,
        description="Accept reinforcement jobs whose grader runs the tenant's Python (in the trainer's sandbox). "
        "Default: yes on a server without API keys (its one user runs their own code), no on a server with keys; "
        "true or false decides for either.",
    )
    api_keys_file: Path | None = Field(
        default=None,
        description="File of 'tenant:sha256:<hex>' lines (see `posttrain keys create`); when set, every call needs a key.",
    )
    rate_limit_per_minute: int | None = Field(default=None, ge=1, description="Requests a minute per API key, or per "
                                              "client address on a server without keys (429 past it).")
    max_queued_jobs_per_tenant: int | None = Field(
        default=None, ge=1, description="Scheduled + running jobs one tenant may have at once (429 past it)."
    )
    log_format: str = Field(default="text", pattern="^(text|json)$", description="text, or json: one object per line.")
    max_dataset_rows: int | None = Field(default=1_000_000, description="Most rows one dataset may hold.")
    max_body_bytes: int = Field(default=64 * 1024 * 1024, description="Largest request body accepted (413 past it).")
    open_max_body_bytes: int = Field(
        default=16 * 1024, ge=1, description="Largest request body on a path that needs no API key (the dashboard's "
        "sign-in form, health, docs): 413 past it, refused before any of it is read.")
    header_timeout_seconds: float = Field(
        default=10.0, gt=0, description="A connection must send a request's complete headers within this many seconds "
        "of opening, or of its last answer; else it is closed (slow or idle connections).")
    body_timeout_seconds: float = Field(
        default=30.0, gt=0, description="A connection sending a request body is closed when no byte of it arrives for "
        "this many seconds.")
    keep_alive_seconds: float = Field(default=5.0, gt=0, description="An idle connection between two requests is "
                                      "closed after this many seconds.")
    connections_per_address: int | None = Field(
        default=64, ge=1, description="Open connections one client address (IPv6: its /64) may hold; the next is "
        "answered 429 and closed. None: no cap.")
    failed_auth_per_minute: int | None = Field(
        default=60, ge=1, description="Requests a minute one client address may make with no key or a wrong one before "
        "it gets 429 (with Retry-After) instead of 401; a valid key is not affected.")
    sign_in_attempts_per_minute: int | None = Field(
        default=10, ge=1, description="Dashboard sign-in attempts (POST /ui/login) a minute per client address (429 past it).")
    body_bytes_per_minute: int | None = Field(
        default=256 * 1024 * 1024, ge=1, description="Request body bytes a minute per API key (per client address "
        "without keys), counted from Content-Length before the body is read; 429 with Retry-After past it. Bursts "
        "reach a quarter of it, or one largest body. None: no budget.")
    allow_http_datasets: bool = Field(
        default=False, description="Let dataset URIs be http(s):// URLs, fetched once at registration."
    )
    http_dataset_allow_private: bool = Field(
        default=False,
        description="Let http(s) dataset URLs reach loopback, private, link-local and other non-public addresses.",
    )
    http_dataset_max_bytes: int = Field(default=256 * 1024 * 1024, ge=1, description="Largest http(s) dataset fetched.")
    http_dataset_timeout_seconds: float = Field(default=30.0, gt=0, description="Time limit for fetching one http(s) dataset.")
    store_busy_timeout_seconds: float = Field(
        default=3.0, gt=0, le=60, description="How long a store write waits for a lock or a connection before the API "
        "answers 503 with Retry-After (SQLite busy_timeout; PostgreSQL lock_timeout and connect_timeout).")
    serve_memory_bytes: int = Field(
        default=8 * 1024**3, ge=1, description="Bytes of model parameters the serving worker keeps loaded (bases and "
        "LoRA adapters, least recently used evicted first).")
    serve_max_batch: int = Field(default=32, ge=1, le=1024, description="Most rows (choices) the serving worker "
                                 "decodes together in one batch.")
    serve_max_waiting: int = Field(default=1024, ge=1, description="Requests waiting for the serving worker past "
                                   "which new ones are refused as overloaded.")
    serve_threads: int | None = Field(default=None, ge=1, description="torch CPU threads of the serving worker; "
                                      "default: torch's own (all cores).")
    serve_engine: Literal["auto", "transformers", "vllm"] = Field(
        default="auto", description="What generates text: transformers' models with our own batching, or vLLM with "
        "runtime LoRA adapters; auto takes vLLM where the serving Python has it and a GPU is present.")
    serve_python: Path | None = Field(
        default=None, description="The Python interpreter of the serving worker (a venv with vLLM, say); default: "
        "the server's own. The worker imports only posttrain.serving and posttrain.domain from this checkout.")
    serve_kv_cache_bytes: int = Field(default=1024**3, ge=1, description="vLLM engine: bytes of its KV cache.")
    serve_max_lora_rank: int = Field(default=64, ge=1, description="vLLM engine: the largest LoRA rank it serves "
                                     "(vLLM sizes its adapter slots by it).")
    serve_start_timeout_seconds: float = Field(default=120.0, gt=0, description="How long the API waits for a "
                                               "newly started serving worker to answer.")
    ready_timeout_seconds: float = Field(default=1.0, gt=0, le=30, description="How long /readyz waits to read and "
                                         "write the store before it answers 503.")

    @cached_property
    def resolved_home(self) -> Path:
        return self.home.expanduser().resolve()

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.resolved_home / 'posttrain.db'}"

    @property
    def allowed_host_names(self) -> frozenset[str]:
        """The Host names the gate accepts (lower case, no port); IP addresses are always accepted."""
        names = {"localhost", self.host.strip("[]").lower()} | {h.strip().strip("[]").lower() for h in self.allowed_hosts}
        return frozenset(n for n in names if n)

    @property
    def resolved_wandb_dir(self) -> Path:
        return (self.resolved_home / (self.wandb_dir or Path("wandb")).expanduser()).resolve()

    @property
    def datasets_dir(self) -> Path:
        return self.resolved_home / "datasets"

    @property
    def jobs_dir(self) -> Path:
        return self.resolved_home / "jobs"

    @property
    def allowed_model_roots(self) -> list[Path]:
        roots = self.model_roots or [self.resolved_home / "models", self.hf_cache]
        return [Path(r).expanduser().resolve() for r in roots]

    @property
    def allowed_file_roots(self) -> list[Path]:
        roots = self.file_roots or [self.resolved_home / "files"]
        return [Path(r).expanduser().resolve() for r in roots]

    @property
    def allowed_shared_file_roots(self) -> list[Path]:
        return [Path(r).expanduser().resolve() for r in self.shared_file_roots]

    @property
    def grader_hidden_paths(self) -> list[str]:
        """What a python grader's sandbox hides: the data folder, the file roots (tenants' areas and the
        shared ones), a SQLite store outside the data folder, and the W&B folder."""
        paths = [self.resolved_home, *self.allowed_file_roots, *self.allowed_shared_file_roots, self.resolved_wandb_dir]
        url = self.resolved_database_url
        if url.startswith("sqlite:///"):
            paths.append(Path(url.removeprefix("sqlite:///")).expanduser().resolve().parent)
        return list(dict.fromkeys(str(p) for p in paths))

    def ensure_dirs(self) -> None:
        home = self.resolved_home
        for path in (home, self.datasets_dir, self.jobs_dir, home / "models", home / "files"):
            path.mkdir(parents=True, exist_ok=True)
