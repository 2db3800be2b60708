"""The ``posttrain`` command: the composition root that builds settings, services, the scheduler
and the app, and starts them. Nothing imports this module."""

from __future__ import annotations

import gc
import importlib.util
import signal
import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from posttrain.remote import datasets_app, jobs_app, models_app
from posttrain.remote.chat import chat
from posttrain.settings import Settings

app = typer.Typer(help="posttrain: fine-tune language models behind the Llama Stack Post-Training API.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
keys_app = typer.Typer(help="API keys (stored hashed in POSTTRAIN_API_KEYS_FILE).", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(keys_app, name="keys")
app.add_typer(datasets_app, name="datasets")
app.add_typer(jobs_app, name="jobs")
app.command("chat")(chat)
console = Console(stderr=True)


def _logging(level: str) -> None:
    from posttrain.logs import configure_logging

    configure_logging(level, Settings().log_format)


def _scheduler(settings: Settings):  # noqa: ANN202
    from posttrain.store.engine import make_engine, migrate
    from posttrain.store.jobs import JobStore
    from posttrain.worker.devices import visible_gpus
    from posttrain.worker.scheduler import Scheduler, launch_config_from
    from posttrain.worker.warm import WarmPool

    engine = make_engine(settings.resolved_database_url, busy_timeout_seconds=settings.store_busy_timeout_seconds)
    migrate(engine)
    config = launch_config_from(settings)
    if settings.executor == "ray":
        # The cluster places each job's ranks and gives them their devices: no warm local trainers,
        # no GPUs of this machine handed out.
        config = replace(config, executor="ray", ray_address=settings.ray_address, ray_workers=settings.ray_workers,
                         ray_max_failures=settings.ray_max_failures)
        return Scheduler(store=JobStore(engine), slots=settings.worker_slots, poll_seconds=settings.poll_seconds,
                         config=config)
    warm = None
    if settings.warm_trainers:
        warm = WarmPool(size=settings.warm_trainers, python=config.python, nice=config.nice,
                        log_dir=settings.resolved_home / "logs")
    gpus = visible_gpus(device=settings.device, configured=settings.gpus)
    return Scheduler(store=JobStore(engine), slots=settings.worker_slots, poll_seconds=settings.poll_seconds,
                     config=config, warm=warm, gpus=gpus)


def _prepare_demo(settings: Settings, services) -> None:  # noqa: ANN001
    """Build the tiny demo model and register the demo dataset, unless they already exist."""
    from posttrain.demo import DEMO_DATASET_ID, DEMO_MODEL_NAME, colour_rows
    from posttrain.errors import DuplicateDataset

    model_dir = settings.resolved_home / "models" / DEMO_MODEL_NAME
    if not (model_dir / "config.json").is_file():
        from posttrain.trainer.tiny_model import create_tiny_model

        console.print(f"building the demo model in {model_dir} …")
        create_tiny_model(model_dir)
    try:
        services.datasets.register(tenant="default", purpose="post-training/messages",
                                   source={"type": "rows", "rows": colour_rows()}, metadata={"description": "demo"},
                                   dataset_id=DEMO_DATASET_ID)
    except DuplicateDataset:
        pass  # registered by an earlier start
    console.print(f"[bold]demo model:[/bold] {model_dir}\n[bold]demo dataset:[/bold] {DEMO_DATASET_ID}")


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default 8321).")] = None,
    worker: Annotated[bool, typer.Option("--worker/--no-worker", help="Run the scheduler in this process.")] = True,
    demo: Annotated[bool, typer.Option(help="Build the tiny demo model and register the demo dataset first.")] = False,
    log_level: Annotated[str, typer.Option(help="Logging level.")] = "info",
) -> None:
    """Run the API server (and, by default, a local worker) on the data folder."""
    import uvicorn

    from posttrain.api.app import create_app
    from posttrain.api.connections import ConnectionLimits, limited_protocol
    from posttrain.services.container import build_services

    _logging(log_level)
    settings = Settings()
    services = build_services(settings)
    if demo:
        _prepare_demo(settings, services)
    background = _scheduler(settings) if worker and settings.run_worker and settings.worker_slots > 0 else None
    application = create_app(settings, services=services, background=background)
    # What start-up built lives as long as the process: frozen, the cycle collector's full passes
    # (each holding the GIL, so the event loop waits) no longer walk it.
    gc.collect()
    gc.freeze()
    console.print(f"posttrain serving on http://{host or settings.host}:{port or settings.port} "
                  f"(data folder {settings.resolved_home})")
    limits = ConnectionLimits(header_seconds=settings.header_timeout_seconds,
                              body_idle_seconds=settings.body_timeout_seconds,
                              per_address=settings.connections_per_address)
    uvicorn.run(application, host=host or settings.host, port=port or settings.port, log_level=log_level.lower(),
                log_config=None, http=limited_protocol(limits),
                timeout_keep_alive=settings.keep_alive_seconds)  # type: ignore[arg-type]  # a float works


@app.command()
def worker(
    log_level: Annotated[str, typer.Option(help="Logging level.")] = "info",
    executor: Annotated[str | None, typer.Option(help="Where jobs train: local (a trainer process here) or ray "
                                                      "(a Ray Train run on a Ray cluster); default POSTTRAIN_EXECUTOR.")] = None,
    address: Annotated[str | None, typer.Option(help="The Ray cluster's head, host:port (the ray executor); "
                                                     "default POSTTRAIN_RAY_ADDRESS.")] = None,
) -> None:
    """Run a standalone worker (scheduler + trainers) against the configured store."""
    _logging(log_level)
    if executor not in (None, "local", "ray"):
        raise typer.BadParameter(f"--executor is local or ray, not {executor!r}")
    chosen = {name: value for name, value in (("executor", executor), ("ray_address", address)) if value is not None}
    settings = Settings(**chosen)  # type: ignore[arg-type]  # the options override the environment
    if settings.executor == "ray" and importlib.util.find_spec("ray") is None:
        raise typer.BadParameter("the ray executor needs Ray Train: pip install 'posttrain[ray]'")
    settings.ensure_dirs()
    scheduler = _scheduler(settings)

    def _stop(_signum, _frame) -> None:  # noqa: ANN001
        scheduler.stop()
        sys.exit(0)

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    where = f", jobs on the Ray cluster at {settings.ray_address or 'auto'}" if settings.executor == "ray" else ""
    console.print(f"posttrain worker {scheduler.owner} with {settings.worker_slots} slot(s){where}")
    scheduler.run_forever()


@app.command()
def migrate() -> None:
    """Create or upgrade the store's schema."""
    from posttrain.store.engine import make_engine
    from posttrain.store.engine import migrate as run_migrations

    settings = Settings()
    settings.ensure_dirs()
    run_migrations(make_engine(settings.resolved_database_url))
    console.print("store is at the newest schema")


@models_app.command("create-tiny")
def create_tiny(path: Annotated[Path, typer.Argument(help="Folder to write the model and tokenizer to.")]) -> None:
    """Write a tiny random-init Llama model with a trained tokenizer (for demos and tests; no hub needed)."""
    from posttrain.trainer.tiny_model import create_tiny_model

    create_tiny_model(path)
    console.print(f"tiny model written to {path}")


@keys_app.command("create")
def create_key(
    tenant: Annotated[str, typer.Argument(help="The tenant the key acts for.")],
    keys_file: Annotated[Path | None, typer.Option(help="Keys file (default: POSTTRAIN_API_KEYS_FILE).")] = None,
) -> None:
    """Make a new API key for TENANT: print it once, and store only its digest in the keys file."""
    from posttrain.services.access import digest, new_key

    target = keys_file or Settings().api_keys_file
    if target is None:
        raise typer.BadParameter("set POSTTRAIN_API_KEYS_FILE or pass --keys-file")
    if not tenant or ":" in tenant or any(c.isspace() for c in tenant):
        raise typer.BadParameter("a tenant name has no spaces and no ':'")
    key = new_key()
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "a", encoding="utf-8") as handle:
        handle.write(f"{tenant}:{digest(key)}\n")
    target.chmod(0o600)
    console.print(f"new key for tenant [bold]{tenant}[/bold] (shown once; restart the server to load it):")
    print(key)


def main() -> None:
    try:
        app()
    except Exception as exc:  # noqa: BLE001 - print the cause chain in one line, exit non-zero
        chain: list[str] = []
        current: BaseException | None = exc
        while current is not None:
            chain.append(f"{type(current).__name__}: {current}")
            current = current.__cause__ or current.__context__
        console.print("[red]error:[/red] " + " <- ".join(chain))
        sys.exit(1)
