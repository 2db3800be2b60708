"""Past one device: a job on 1 vs 2 processes (or 1 vs all GPUs), and a search against its trials in a row.

    .venv/bin/python bench/scale.py --quick                  # the tiny model, few steps, one round
    .venv/bin/python bench/scale.py [--threads-per-rank 1]   # the bench model of train_throughput.py

Part 1, data parallel. The real trainer job (``python -m posttrain.trainer SPEC``; for N ranks the
command the worker's launcher builds, ``launcher.ranks_command``: torch's ``torch.distributed.run``
with N processes) trains SFT LoRA at the same global batch on every row: ``BATCH`` rows a
micro-batch, accumulation 2 on one process, 1 on two (so every optimizer step sees the same 8
rows). On a CPU three rows: 1 rank x 2T threads (the same cores as two ranks), 1 rank x T threads
and 2 ranks x T threads (T = ``--threads-per-rank``; the trainer shares its spec's threads out among
the ranks, so the spec asks for T x N). Tokens/s count the real tokens of the global batch (the
``metric`` events' ``tokens``), timed from the end of the last warm-up step to the end of the last
step; scaling efficiency = tokens/s on N / (N x tokens/s on 1 at the same threads per rank). Memory
per rank is each rank's own peak resident set (``VmHWM`` in /proc/PID/status, the kernel's figure that
``ru_maxrss`` reports at exit), read at every step and at the last one before the stop; torch's
launcher process itself is left out. When CUDA is available the rows are 1 GPU vs every GPU
(``torch.cuda.device_count()``), with rank 0's GPU memory peak from its events.

Part 2, hyperparameter search. A real ``posttrain serve`` (its local worker, 2 slots) runs a 4-trial
search (``max_concurrent_trials`` 2, ``pruner`` none so every trial trains in full, as the sequential
jobs do) on the tiny model, submit to the parent's completion; then the same 4 trial configurations
(the values the search chose, from its status) run as plain jobs, each submitted when the one before
has ended. Both phases share one server, so trainer start-up (warm trainer pool included) is alike.

Nothing is asserted on time: the figures are printed with their ratios, measured in the same run.
On a machine shared with other work they are noise; the script prints the load average.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_throughput import LORA_ALPHA, LORA_RANK, _env, build_model, make_rows  # noqa: E402

BATCH = 4  # rows a micro-batch on every rank
GLOBAL_ACCUMULATION = 2  # micro-batches an optimizer step over all ranks: 1 process x 2, or 2 x 1


# --------------------------------------------------------------------------- part 1: 1 vs N ranks


def _peak_rss_mb(pid: int) -> float | None:
    """The process's peak resident set so far (VmHWM), or None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _spec(folder: Path, *, model: Path, rows: Path, ranks: int, threads: int | None, device: str,
          steps: int) -> Path:
    from tests.trainer_specs import typed_spec_file

    accumulation = max(1, GLOBAL_ACCUMULATION // ranks)
    spec = {
        "job_uuid": "scale", "method": "sft", "model": str(model), "adapter": None,
        "output_dir": str(folder / "out"), "train_rows_path": str(rows), "validation_rows_path": None,
        "training_config": {
            "n_epochs": 1, "max_steps_per_epoch": steps, "gradient_accumulation_steps": accumulation,
            "max_validation_steps": 1,
            "data_config": {"dataset_id": "bench", "batch_size": BATCH, "shuffle": True, "data_format": "instruct",
                            "packed": False},
            "optimizer_config": {"optimizer_type": "adamw", "lr": 1e-4, "weight_decay": 0.0, "num_warmup_steps": 0},
            "dtype": "bf16",
        },
        "algorithm_config": {"type": "LoRA", "lora_attn_modules": ["q_proj", "v_proj", "output_proj"],
                             "apply_lora_to_mlp": True, "apply_lora_to_output": False, "rank": LORA_RANK,
                             "alpha": LORA_ALPHA},
        "device": device, "threads": threads, "seed": 0, "trust_remote_code": False, "compile": "off",
    }
    (folder / "spec.json").write_text(json.dumps(spec))
    return typed_spec_file(folder / "spec.json")


def run_ranks(*, work: Path, model: Path, rows: Path, ranks: int, threads: int | None, device: str, warmup: int,
              steps: int) -> dict:
    """One job on ``ranks`` processes, started as the worker's launcher starts it."""
    from posttrain.worker.launcher import rank_pids, ranks_command

    folder = Path(tempfile.mkdtemp(dir=work, prefix=f"ranks-{ranks}-"))
    spec = _spec(folder, model=model, rows=rows, ranks=ranks, threads=threads, device=device, steps=warmup + steps)
    command = ranks_command(sys.executable, 0, str(spec), module="posttrain.trainer", ranks=ranks)
    stderr = open(folder / "stderr.txt", "w")  # noqa: SIM115 - the trainer's, open while it runs
    proc = subprocess.Popen(command, cwd=REPO, env=_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=stderr, text=True)
    step_ends, tokens, losses, failure, resources, gpu_peak = [], [], [], None, {}, None
    peaks: dict[int, float] = {}

    def sample() -> None:
        for pid in ([proc.pid] if ranks == 1 else rank_pids(proc.pid)):
            peak = _peak_rss_mb(pid)
            if peak is not None:
                peaks[pid] = max(peaks.get(pid, 0.0), peak)

    for line in proc.stdout:
        now = time.perf_counter()
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue  # a rank's stray print on the shared stdout
        if event["event"] == "started":
            resources = event.get("resources", {})
        elif event["event"] == "metric":
            step_ends.append(now)
            tokens.append(event["tokens"])
            losses.append(event.get("loss"))
            gpu_peak = event.get("gpu_memory_peak_mb", gpu_peak)
            sample()
            if len(step_ends) == warmup + steps:
                proc.send_signal(signal.SIGTERM)  # skip the epoch end; torch's launcher forwards it to every rank
        elif event["event"] == "failed":
            failure = event.get("message")
    proc.stdout.close()
    code = proc.wait()
    proc.stdin.close()
    stderr.close()
    if failure or len(step_ends) < warmup + steps:
        tail = (folder / "stderr.txt").read_text()[-1500:]
        return {"error": failure or f"exit {code} after {len(step_ends)} steps: {tail}"}
    span = step_ends[-1] - step_ends[warmup - 1]
    return {"tokens_per_s": sum(tokens[warmup:]) / span, "rank_rss_mb": sorted(peaks.values()),
            "gpu_peak_mb": gpu_peak, "losses": losses, "world_size": resources.get("world_size"),
            "global_batch": resources.get("global_batch_size"), "threads": resources.get("threads")}


def data_parallel(*, work: Path, model: Path, rows: Path, threads_per_rank: int, warmup: int, steps: int,
                  rounds: int) -> None:
    import torch

    if torch.cuda.is_available():
        gpus = torch.cuda.device_count()
        rows_run = [("1 GPU", 1, None)] + ([(f"{gpus} GPUs", gpus, None)] if gpus > 1 else [])
        device, pairs = "cuda", [(f"{gpus} GPUs", "1 GPU")] if gpus > 1 else []  # one GPU: no scaling figure
    else:
        t = threads_per_rank
        rows_run = [(f"1 rank x {2 * t} threads", 1, 2 * t), (f"1 rank x {t} threads", 1, t),
                    (f"2 ranks x {t} threads", 2, 2 * t)]
        device, pairs = "cpu", [(rows_run[2][0], rows_run[1][0])]
    results: dict[str, list[dict]] = {name: [] for name, _, _ in rows_run}
    for round_index in range(rounds):
        for name, ranks, threads in rows_run if round_index % 2 == 0 else rows_run[::-1]:
            result = run_ranks(work=work, model=model, rows=rows, ranks=ranks, threads=threads, device=device,
                               warmup=warmup, steps=steps)
            results[name].append(result)
            shown = (f"{result['tokens_per_s']:8.0f} tok/s  rss/rank {result['rank_rss_mb']}"
                     if "error" not in result else result["error"][-400:])
            print(f"  round {round_index + 1}  {name:<22} {shown}", flush=True)
    best = {}
    for name, runs in results.items():
        ok = [r for r in runs if "error" not in r]
        if ok:
            best[name] = {**ok[0], "tokens_per_s": statistics.median(r["tokens_per_s"] for r in ok),
                          "rank_rss_mb": [max(r["rank_rss_mb"][i] for r in ok if len(r["rank_rss_mb"]) > i)
                                          for i in range(max(len(r["rank_rss_mb"]) for r in ok))],
                          "rounds": [r["tokens_per_s"] for r in ok]}
    first = rows_run[0][0]
    print()
    print(f"SFT LoRA, global batch {BATCH * GLOBAL_ACCUMULATION} rows an optimizer step (micro-batch {BATCH}), "
          f"{warmup} warm-up + {steps} measured steps, median of {rounds} round(s), device {device}")
    header = (f"{'ranks x threads':<22} {'real tok/s':>10} {'vs ' + first:>28} {'peak RSS MB per rank':>22}"
              + (f" {'GPU MB rank 0':>13}" if device == "cuda" else "") + "  final loss  per round")
    print(header)
    print("-" * len(header))
    for name, _, _ in rows_run:
        if name not in best:
            print(f"{name:<22} failed: {results[name][-1].get('error', '')[-300:]}")
            continue
        r = best[name]
        ratio = f"{r['tokens_per_s'] / best[first]['tokens_per_s']:.2f}x" if first in best else "-"
        rss = " / ".join(f"{m:.0f}" for m in r["rank_rss_mb"])
        gpu = f" {r['gpu_peak_mb'] or 0:13.0f}" if device == "cuda" else ""
        loss = r["losses"][-1]
        print(f"{name:<22} {r['tokens_per_s']:10.0f} {ratio:>28} {rss:>22}{gpu}  "
              f"{loss if loss is None else f'{loss:.4f}':>10}  {' '.join(f'{t:.0f}' for t in r['rounds'])}")
    for many, one in pairs:
        if many in best and one in best:
            n = best[many]["world_size"] or 2
            efficiency = best[many]["tokens_per_s"] / (n * best[one]["tokens_per_s"])
            print(f"scaling efficiency {many} vs {one}: {100 * efficiency:.0f}% "
                  f"(tokens/s at N / (N x tokens/s at 1), N = {n})")
    if device == "cpu" and rows_run[0][0] in best and rows_run[2][0] in best:
        same = best[rows_run[2][0]]["tokens_per_s"] / best[rows_run[0][0]]["tokens_per_s"]
        print(f"same cores, {rows_run[2][0]} vs {rows_run[0][0]}: {same:.2f}x (what DDP costs or gains on "
              "one CPU: the ranks share its cores and add an all-reduce per step)")


# --------------------------------------------------------------------------- part 2: search vs in a row


def _set(request: dict, path: str, value) -> None:
    node = request
    *parents, last = path.split(".")
    for key in parents:
        node = node[key]
    node[last] = value


def _wait_terminal(server, job_uuid: str, *, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = server.get("/v1/post-training/job/status", params={"job_uuid": job_uuid}).json()
        if status["status"] in ("completed", "failed", "cancelled"):
            return status
        time.sleep(0.3)
    raise TimeoutError(f"{job_uuid} not finished within {timeout:.0f} s")


def search_vs_sequential(*, work: Path, epochs: int, steps: int, timeout: float) -> None:
    from posttrain.demo import colour_rows
    from posttrain.trainer.tiny_model import create_tiny_model
    from tests.conftest import start_server, stop_server
    from tests.integration.test_api import lora_request

    tiny = create_tiny_model(work / "tiny-llama")
    (work / "home").mkdir()
    server = start_server(work / "home", tiny, extra_env={"POSTTRAIN_WORKER_SLOTS": "2"})
    try:
        assert server.post("/v1/datasets", json={"purpose": "post-training/messages", "dataset_id": "demo",
                                                 "source": {"type": "rows", "rows": colour_rows()}}).status_code == 200
        base = lora_request(str(tiny), "demo")
        base["training_config"].update(n_epochs=epochs, max_steps_per_epoch=steps)
        search = {"search_space": {"optimizer_config.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-1},
                                   "algorithm_config.rank": {"type": "choice", "values": [4, 8, 16]}},
                  "num_trials": 4, "max_concurrent_trials": 2, "metric": "train_loss", "mode": "min",
                  "pruner": "none", "seed": 0}
        body = {**copy.deepcopy(base), "hyperparam_search_config": search}
        started = time.monotonic()
        response = server.post("/v1/post-training/supervised-fine-tune", json=body)
        assert response.status_code == 200, response.text
        status = _wait_terminal(server, body["job_uuid"], timeout=timeout)
        search_wall = time.monotonic() - started
        summary = (status.get("resources_allocated") or {}).get("search") or {}
        trials = summary.get("trials", [])
        print(f"search: {status['status']}, {len(trials)} trials, best {summary.get('best')}", flush=True)
        for trial in trials:
            print(f"  trial {trial['number']}: {trial['status']}, {trial['params']}, {summary['metric']} "
                  f"{trial['metric']}", flush=True)
        sequential = []
        for trial in sorted(trials, key=lambda t: t["number"]):
            plain = copy.deepcopy(base)
            plain["job_uuid"] = f"{base['job_uuid']}-plain-{trial['number']}"
            for path, value in trial["params"].items():
                _set(plain, path, value)
            began = time.monotonic()
            response = server.post("/v1/post-training/supervised-fine-tune", json=plain)
            assert response.status_code == 200, response.text
            done = _wait_terminal(server, plain["job_uuid"], timeout=timeout)
            sequential.append(time.monotonic() - began)
            print(f"  plain job {trial['number']}: {done['status']} in {sequential[-1]:.1f} s", flush=True)
    finally:
        stop_server(server)
    total = sum(sequential)
    print()
    print(f"search of {len(trials)} trials (max_concurrent_trials 2, 2 worker slots, {epochs} epochs x {steps} steps "
          f"each, tiny model): {search_wall:.1f} s submit to completion")
    print(f"the same {len(sequential)} configurations as plain jobs one after another: {total:.1f} s "
          f"({' + '.join(f'{s:.1f}' for s in sequential)})")
    if total:
        print(f"search / sequential: {search_wall / total:.2f}x (1.0 = no gain; 0.5 = two trials fully in parallel)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the tiny model, few steps, one round: a smoke run")
    parser.add_argument("--threads-per-rank", type=int, default=None,
                        help="torch threads each rank (default: half the cores, at least 1)")
    parser.add_argument("--steps", type=int, help="measured optimizer steps per configuration")
    parser.add_argument("--warmup", type=int, help="warm-up optimizer steps per configuration")
    parser.add_argument("--rounds", type=int, help="runs of every configuration, alternating order")
    parser.add_argument("--skip-search", action="store_true", help="only part 1")
    parser.add_argument("--skip-ranks", action="store_true", help="only part 2")
    args = parser.parse_args()
    steps = args.steps or (3 if args.quick else 8)
    warmup = args.warmup or (1 if args.quick else 2)
    rounds = args.rounds or (1 if args.quick else 2)
    threads_per_rank = args.threads_per_rank or max(1, (os.cpu_count() or 2) // 2)
    started = time.perf_counter()

    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="scale-") as tmp:
        work = Path(tmp)
        if not args.skip_ranks:
            if args.quick:
                from posttrain.trainer.tiny_model import create_tiny_model

                model = create_tiny_model(work / "model")
            else:
                model = build_model(work / "model")
            rows = work / "rows.jsonl"
            rows.write_text("".join(json.dumps(r) + "\n" for r in make_rows(AutoTokenizer.from_pretrained(model), 320)))
            print(f"part 1: {'tiny test model' if args.quick else 'bench model (~34M parameters)'}; "
                  f"{threads_per_rank} thread(s) a rank", flush=True)
            data_parallel(work=work, model=model, rows=rows, threads_per_rank=threads_per_rank, warmup=warmup,
                          steps=steps, rounds=rounds)
            print()
        if not args.skip_search:
            print("part 2: hyperparameter search vs its trials in a row", flush=True)
            search_vs_sequential(work=work, epochs=2 if args.quick else 3, steps=2 if args.quick else 6,
                                 timeout=600)
    print()
    print(f"bench wall time: {time.perf_counter() - started:.0f} s; machine load average now: "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (above about 1 on this machine's cores: the figures "
          "are noise)")


if __name__ == "__main__":
    main()
