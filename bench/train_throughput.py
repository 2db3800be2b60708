"""Training throughput on this CPU: our trainer against plain TRL, on the same model and data.

    .venv/bin/python bench/train_throughput.py            # every configuration, two rounds
    .venv/bin/python bench/train_throughput.py --quick    # fewer steps, one round

(How long a run takes, and the figures measured with it, are in bench/README.md.)

One model (random-init Llama: hidden 512, 8 layers, 8 heads, intermediate 1376, vocab 8192: ~34M
parameters) and one set of rows (20-300 tokens each, generated here) for every configuration.
Each configuration runs in its own subprocess (so its peak RSS, ``ru_maxrss`` from ``wait4``, is
its own), does ``--warmup`` optimizer steps and then ``--steps`` measured ones; the measured time
runs from the end of the last warm-up step to the end of the last step (everything in between:
data, forward, backward, optimizer, logging). With ``--rounds 2`` (the default) every
configuration runs twice, the second round in reverse order, and the median over rounds is
reported (each round's figure is printed too), so load from other processes on the machine hits
each configuration alike as far as possible; use more ``--rounds`` on a busy machine.

Our configurations run the real trainer process (``python -m posttrain.trainer SPEC``) and read
its ``metric`` events; TRL's run ``SFTTrainer``/``DPOTrainer`` with a callback that timestamps each
optimizer step. "Real" tokens are the rows' tokens, padding excluded; padding % is the share of
the step's token positions that are padding.

MFU = model FLOPs per second / the fp32 matmul peak measured in this run (best of several
2048x2048 ``torch.matmul``, 8192x8192 on a GPU). Model FLOPs per real token, with N = the parameters used in matmuls
(all but the input embedding), attention score FLOPs left out:
  full fine-tune  6N  (forward 2N, backward: activation grads 2N + weight grads 2N)
  LoRA            4N  (forward 2N + activation grads 2N through the frozen weights; the adapters'
                       weight grads are negligible)
  DPO (LoRA)      6N per chosen/rejected token: the policy's 4N plus the reference forward 2N.
The count is the model's, not the hardware's: skipping work (e.g. our trainer applies the output
head only at label positions) raises MFU as defined here.
"""

from __future__ import annotations

import argparse
import json
import os
import random
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

MODEL_SHAPE = dict(hidden_size=512, num_layers=8, num_heads=8, intermediate_size=1376, max_position_embeddings=1024)
VOCAB = 8192
PACK_LENGTH = 1024  # = max_position_embeddings: our trainer packs to the model's limit
BATCH = 4  # rows per optimizer step (unpacked)
DEVICE = "cpu"  # --device: where every configuration trains and the matmul peaks are measured
COMPILE_WARMUP = 3  # extra warm-up steps for compiled configurations (the compile happens in the first)
PACKED_BATCH = 1  # packs of up to PACK_LENGTH tokens per optimizer step (about as many tokens as BATCH rows)
LORA_TARGETS = ["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_RANK, LORA_ALPHA = 16, 32
WORDS = ("the cat sees a red apple and my friend likes green leaves while our team paints the blue sea "
         "under a yellow sun where white snow falls on black coffee in the brown box near a grey stone "
         "what is the colour of this short story can you describe why does it matter one two three").split()

# --------------------------------------------------------------------------- data and model


def build_model(folder: Path) -> Path:
    """The ~34M-parameter Llama with the tiny BPE tokenizer, its vocabulary padded to ``VOCAB``."""
    import torch
    from transformers import AutoModelForCausalLM

    from posttrain.trainer.tiny_model import create_tiny_model

    path = create_tiny_model(folder, vocab_size=VOCAB, **MODEL_SHAPE)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if model.config.vocab_size < VOCAB:
        torch.manual_seed(0)
        model.resize_token_embeddings(VOCAB, mean_resizing=False)
        model.save_pretrained(path)
    return path


def make_rows(tokenizer, count: int, *, seed: int = 0) -> list[dict]:
    """Question/answer rows whose chat-rendered length is spread over about 20-300 tokens; the
    answer is 15-50% of the row, as in typical SFT data."""
    rng = random.Random(seed)

    def text(n_tokens: int) -> str:
        words, length = [], 0
        while length < n_tokens:
            word = rng.choice(WORDS)
            words.append(word)
            length += len(tokenizer(" " + word, add_special_tokens=False)["input_ids"])
        return " ".join(words)

    overhead = len(tokenizer.apply_chat_template([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                                                 tokenize=True, return_dict=False)) - 2
    rows = []
    for _ in range(count):
        total = rng.randint(20, 300) - overhead
        answer = max(1, int(total * rng.uniform(0.15, 0.5)))
        rows.append({"question": text(max(1, total - answer)), "answer": text(answer)})
    return rows


def preference_rows(rows: list[dict], *, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": r["question"], "chosen": r["answer"],
             "rejected": " ".join(rng.sample(r["answer"].split(), len(r["answer"].split())))} for r in rows]


# --------------------------------------------------------------------------- configurations


def configurations(*, dpo: bool, native_bf16: bool) -> list[dict]:
    """TRL runs with its defaults (on a CPU: bf16 autocast and gradient checkpointing), with the
    issue's "best settings" (fp32, no gradient checkpointing, with and without packing) and, on a
    CPU with native bf16, with bf16 autocast and no gradient checkpointing (its fastest there)."""
    def trl(name: str, method: str, lora: bool, settings: str, packed: bool = False) -> dict:
        return {"name": name, "kind": "trl", "method": method, "lora": lora, "packed": packed, "settings": settings}

    configs = [
        {"name": "ours SFT LoRA", "kind": "ours", "method": "sft", "lora": True, "packed": False},
        {"name": "ours SFT LoRA packed", "kind": "ours", "method": "sft", "lora": True, "packed": True},
        # What a longer job gets (compile=auto compiles once a job has >5 min left): torch.compile'd,
        # measured after COMPILE_WARMUP more warm-up steps, so the compile itself is not in the figure.
        {"name": "ours SFT LoRA compiled", "kind": "ours", "method": "sft", "lora": True, "packed": False,
         "compile": "on"},
        {"name": "ours SFT full", "kind": "ours", "method": "sft", "lora": False, "packed": False},
        trl("TRL SFT LoRA default", "sft", True, "default"),
        trl("TRL SFT LoRA fp32", "sft", True, "fp32"),
        trl("TRL SFT LoRA fp32 packed", "sft", True, "fp32", packed=True),
        *([trl("TRL SFT LoRA bf16", "sft", True, "bf16")] if native_bf16 else []),
        trl("TRL SFT full fp32", "sft", False, "fp32"),
        *([trl("TRL SFT full bf16", "sft", False, "bf16")] if native_bf16 else []),
    ]
    if dpo:
        configs += [
            {"name": "ours DPO LoRA", "kind": "ours", "method": "dpo", "lora": True, "packed": False},
            trl("TRL DPO LoRA default", "dpo", True, "default"),
            trl("TRL DPO LoRA fp32", "dpo", True, "fp32"),
            *([trl("TRL DPO LoRA bf16", "dpo", True, "bf16")] if native_bf16 else []),
        ]
    return configs


def _baseline_for(config: dict, names: list[str]) -> list[str]:
    """The TRL rows a configuration is compared with: same method and LoRA/full, any settings
    (default, fp32 or bf16); the fastest counts."""
    mode = "LoRA" if config["lora"] else "full"
    method = config["method"].upper()
    return [n for n in names if n.startswith(f"TRL {method} {mode} ")]


# --------------------------------------------------------------------------- running one configuration


def _wait(proc: subprocess.Popen) -> tuple[int, float]:
    """Reap the child; returns (exit status, its own peak RSS in MB)."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss / 1024


def _env() -> dict[str, str]:
    """The environment for a trainer process: this checkout first on the path, the caller's path kept
    (a GPU machine may hold the dependencies in a folder named by PYTHONPATH)."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path}


def _measure(step_ends: list[float], tokens: list[int], positions: list[int], *, warmup: int) -> dict:
    span = step_ends[-1] - step_ends[warmup - 1]
    real = sum(tokens[warmup:])
    padding = 1 - real / max(1, sum(positions[warmup:]))
    return {"steps": len(step_ends) - warmup, "seconds": span, "tokens_per_s": real / span, "padding": padding}


def run_ours(config: dict, *, work: Path, model: Path, rows_path: Path, warmup: int, steps: int,
             threads: int | None) -> dict:
    if config.get("compile") == "on":
        warmup += COMPILE_WARMUP
    folder = Path(tempfile.mkdtemp(dir=work, prefix="ours-"))
    lora = {"type": "LoRA", "lora_attn_modules": ["q_proj", "v_proj", "output_proj"], "apply_lora_to_mlp": True,
            "apply_lora_to_output": False, "rank": LORA_RANK, "alpha": LORA_ALPHA}
    if config["method"] == "dpo":
        algorithm = {"beta": 0.1, "loss_type": "sigmoid", "lora": {**lora, "use_dora": False, "quantize_base": False}}
    else:
        algorithm = lora if config["lora"] else None
    spec = {
        "job_uuid": "bench", "method": config["method"], "model": str(model), "adapter": None,
        "output_dir": str(folder / "out"), "train_rows_path": str(rows_path), "validation_rows_path": None,
        "training_config": {
            "n_epochs": 1, "max_steps_per_epoch": warmup + steps, "gradient_accumulation_steps": 1,
            "max_validation_steps": 1,
            "data_config": {"dataset_id": "bench", "batch_size": PACKED_BATCH if config["packed"] else BATCH,
                            "shuffle": True, "data_format": "instruct", "packed": config["packed"]},
            "optimizer_config": {"optimizer_type": "adamw", "lr": 1e-4 if config["lora"] else 1e-5,
                                 "weight_decay": 0.0, "num_warmup_steps": 0},
            "dtype": "bf16",  # the Llama Stack default: bf16 where the CPU has it natively, else fp32
        },
        "algorithm_config": algorithm, "device": DEVICE, "threads": threads, "seed": 0, "trust_remote_code": False,
        "compile": config.get("compile", "auto"),  # auto: these short runs are never worth compiling
    }
    (folder / "spec.json").write_text(json.dumps(spec))
    started = time.perf_counter()
    from tests.trainer_specs import typed_spec_file

    command = [sys.executable, "-m", "posttrain.trainer", str(typed_spec_file(folder / "spec.json"))]
    stderr = open(folder / "stderr.txt", "w")  # noqa: SIM115 - the trainer's, open while it runs
    proc = subprocess.Popen(command, cwd=REPO, env=_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
                            text=True)
    step_ends, tokens, positions, first_step, failure, dtype, gpu_peak = [], [], [], None, None, "fp32", None
    for line in proc.stdout:
        now = time.perf_counter()
        event = json.loads(line)
        if event["event"] == "started":
            dtype = event["resources"]["dtype"]
        if event["event"] == "metric":
            first_step = first_step or now - started
            count = event["tokens"]
            step_ends.append(now)
            tokens.append(count)
            gpu_peak = event.get("gpu_memory_peak_mb", gpu_peak)
            positions.append(round(count / (1 - event["padding_fraction"])))
            if len(step_ends) == warmup + steps:
                proc.send_signal(signal.SIGTERM)  # skip the epoch-end validation and checkpoint
        elif event["event"] == "failed":
            failure = event["message"]
    proc.stdout.close()
    code, rss = _wait(proc)
    proc.stdin.close()
    if failure or len(step_ends) < warmup + steps:
        tail = (folder / "stderr.txt").read_text()[-1500:]
        return {"error": failure or f"exit {code} after {len(step_ends)} steps: {tail}"}
    return {**_measure(step_ends, tokens, positions, warmup=warmup), "peak_rss_mb": rss, "first_step_s": first_step,
            "compile_s": step_ends[0] - started if config.get("compile") == "on" else None,
            "dtype": dtype, "peak_gpu_mb": gpu_peak}


def run_trl(config: dict, *, work: Path, model: Path, rows_path: Path, warmup: int, steps: int,
            threads: int | None) -> dict:
    folder = Path(tempfile.mkdtemp(dir=work, prefix="trl-"))
    job = {**config, "device": DEVICE, "model": str(model), "rows": str(rows_path), "out": str(folder),
           "max_steps": warmup + steps, "threads": threads}
    stderr = open(folder / "stderr.txt", "w")  # noqa: SIM115 - the worker's, open while it runs
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--trl-worker", json.dumps(job)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=stderr, text=True)
    out = proc.stdout.read()
    proc.stdout.close()
    code, rss = _wait(proc)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if code or not lines:
        return {"error": f"exit {code}: {(folder / 'stderr.txt').read_text()[-1500:]}"}
    result = json.loads(lines[-1])
    dtype = "fp32" if config["settings"] == "fp32" else "bf16"  # TRL's default on a CPU is bf16 autocast
    return {**_measure(result["step_ends"], result["tokens"], result["positions"], warmup=warmup), "peak_rss_mb": rss,
            "dtype": dtype, "peak_gpu_mb": result["peak_gpu_mb"]}


def trl_worker(job: dict) -> None:
    """Runs in its own process: plain TRL, timestamps per optimizer step on stdout as JSON."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    if job["threads"]:
        torch.set_num_threads(job["threads"])
    rows = [json.loads(line) for line in Path(job["rows"]).read_text(encoding="utf-8").splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(job["model"])
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32)
    peft_config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules=LORA_TARGETS, lora_dropout=0.0,
                             task_type="CAUSAL_LM") if job["lora"] else None
    common = dict(output_dir=job["out"], use_cpu=job["device"] == "cpu", max_steps=job["max_steps"], report_to="none",
                  save_strategy="no", logging_steps=10**6, disable_tqdm=True, dataloader_num_workers=0, seed=0,
                  learning_rate=1e-4 if job["lora"] else 1e-5)
    if job["settings"] == "fp32":
        common.update(bf16=False, gradient_checkpointing=False)
    elif job["settings"] == "bf16":
        common.update(bf16=True, gradient_checkpointing=False)
    tokens: list[int] = []
    positions: list[int] = []
    step_ends: list[float] = []
    pending = [0, 0]

    def count(inputs) -> None:
        masks = [v for k, v in inputs.items() if k.endswith("attention_mask") and torch.is_tensor(v)]
        if masks:
            pending[0] += sum(int(m.sum()) for m in masks)
            pending[1] += sum(m.numel() for m in masks)
        else:  # padding-free: one flat row of real tokens
            pending[0] += inputs["input_ids"].numel()
            pending[1] += inputs["input_ids"].numel()

    class Steps(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            step_ends.append(time.perf_counter())
            tokens.append(pending[0])
            positions.append(pending[1])
            pending[0] = pending[1] = 0

    if job["method"] == "sft":
        from trl import SFTConfig, SFTTrainer

        data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["question"]}],
                                   "completion": [{"role": "assistant", "content": r["answer"]}]} for r in rows])
        args = SFTConfig(per_device_train_batch_size=PACKED_BATCH if job["packed"] else BATCH,
                         packing=job["packed"], max_length=PACK_LENGTH, **common)
        base = SFTTrainer
    else:
        from trl import DPOConfig, DPOTrainer

        data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                                   "chosen": [{"role": "assistant", "content": r["chosen"]}],
                                   "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])
        args = DPOConfig(per_device_train_batch_size=BATCH, max_length=PACK_LENGTH, beta=0.1, **common)
        base = DPOTrainer

    class Counting(base):
        def training_step(self, model, inputs, *rest, **kwargs):
            count(inputs)
            return super().training_step(model, inputs, *rest, **kwargs)

    trainer = Counting(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                       peft_config=peft_config, callbacks=[Steps()])
    trainer.train()
    peak_gpu_mb = torch.cuda.max_memory_allocated() / 2**20 if job["device"] == "cuda" else None
    print(json.dumps({"step_ends": step_ends, "tokens": tokens, "positions": positions, "peak_gpu_mb": peak_gpu_mb}),
          flush=True)


# --------------------------------------------------------------------------- the rest


def matmul_peak_gflops(*, threads: int | None, repeats: int = 10, dtype: str = "fp32") -> float:
    import torch

    if threads:
        torch.set_num_threads(threads)
    kind = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    size = 8192 if DEVICE == "cuda" else 2048  # a GPU reaches its peak only on large products
    a, b = (torch.randn(size, size, dtype=kind, device=DEVICE) for _ in range(2))
    torch.matmul(a, b)
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        torch.matmul(a, b)
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def first_step_latency(work: Path) -> list[float]:
    """Process start to first ``metric`` event, the tiny test model, LoRA, as a submitted job."""
    from posttrain.trainer.tiny_model import create_tiny_model

    tiny = create_tiny_model(work / "tiny")
    rows = work / "tiny-rows.jsonl"
    rows.write_text("".join(json.dumps({"question": f"What is the colour of the {t}?", "answer": f"It is {c}."}) + "\n"
                            for t, c in zip(["sky", "sea", "sun", "snow"] * 4, ["blue", "blue", "yellow", "white"] * 4,
                                            strict=True)))
    times = []
    for attempt in range(2):
        folder = work / f"first-{attempt}"
        folder.mkdir()
        spec = {"job_uuid": "first", "method": "sft", "model": str(tiny), "adapter": None,
                "output_dir": str(folder / "out"), "train_rows_path": str(rows), "validation_rows_path": None,
                "training_config": {"n_epochs": 1, "max_steps_per_epoch": 2, "gradient_accumulation_steps": 1,
                                    "max_validation_steps": 1,
                                    "data_config": {"dataset_id": "toy", "batch_size": 4, "shuffle": True,
                                                    "data_format": "instruct", "packed": False},
                                    "optimizer_config": {"optimizer_type": "adamw", "lr": 1e-4, "weight_decay": 0.0,
                                                         "num_warmup_steps": 0}, "dtype": "bf16"},
                "algorithm_config": {"type": "LoRA", "lora_attn_modules": ["q_proj", "v_proj"], "rank": 8, "alpha": 16},
                "device": "cpu", "threads": None, "seed": 0, "trust_remote_code": False}
        (folder / "spec.json").write_text(json.dumps(spec))
        started = time.perf_counter()
        from tests.trainer_specs import typed_spec_file

        command = [sys.executable, "-m", "posttrain.trainer", str(typed_spec_file(folder / "spec.json"))]
        proc = subprocess.Popen(command, cwd=REPO, env=_env(), stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        elapsed = float("nan")
        for line in proc.stdout:
            if json.loads(line)["event"] == "metric":
                elapsed = time.perf_counter() - started
                proc.send_signal(signal.SIGTERM)
                break
        proc.stdout.read()
        proc.stdout.close()
        proc.wait()
        proc.stdin.close()
        times.append(elapsed)
    return times


def parameters_in_matmuls(model_path: Path) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))
    total = sum(p.numel() for p in model.parameters())
    return total - model.get_input_embeddings().weight.numel()


def _percent(fraction: float | None) -> str:
    return "?" if fraction is None else f"{100 * fraction:.1f}"


def flops_per_token(config: dict, n: int) -> float:
    if config["method"] == "dpo":
        return 6 * n
    return 4 * n if config["lora"] else 6 * n


def _print_targets(best: dict, names: list[str], *, peak: float, n: int) -> None:
    """The issue's targets for SFT LoRA on a CPU, each with its figures: for a short job (eager, as
    every job starts) and for a long one (compiled, as compile=auto makes a job with >5 min left)."""
    trl = {b: best[b] for b in _baseline_for({"method": "sft", "lora": True}, names) if b in best}
    if not trl:
        return
    fastest = max(trl, key=lambda b: trl[b]["tokens_per_s"])
    # The "best settings" for TRL on a CPU: fp32, no gradient checkpointing, with or without
    # packing. Where the CPU has native bf16, TRL in bf16 is faster still: both comparisons are printed.
    fp32 = [b for b in trl if " fp32" in b]  # "TRL SFT LoRA fp32", "... fp32 packed"
    best_fp32 = max(fp32, key=lambda b: trl[b]["tokens_per_s"]) if fp32 else None
    baselines = {"TRL's best fp32 settings": best_fp32} if best_fp32 else {}
    if fastest != best_fp32:
        baselines["TRL's fastest"] = fastest
    memory = min(t["peak_rss_mb"] for t in trl.values())
    print()
    for name in ("ours SFT LoRA", "ours SFT LoRA compiled"):
        ours = best.get(name)
        if not ours:
            continue
        mfu = 100 * 4 * n * ours["tokens_per_s"] / (peak * 1e9)
        for label, baseline in baselines.items():
            ratio = ours["tokens_per_s"] / trl[baseline]["tokens_per_s"]
            print(f"target {name} >= 2.5x {label} ({baseline}): {ratio:.2f}x - {'met' if ratio >= 2.5 else 'missed'}")
        print(f"target {name} >= 50% MFU (fp32 peak): {mfu:.1f}% - {'met' if mfu >= 50 else 'missed'}")
        print(f"target {name} peak memory <= TRL's lowest: {ours['peak_rss_mb']:.0f} vs {memory:.0f} MB - "
              f"{'met' if ours['peak_rss_mb'] <= memory else 'missed'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="about 2 minutes: fewer steps, one round")
    parser.add_argument("--steps", type=int, help="measured optimizer steps per configuration")
    parser.add_argument("--warmup", type=int, help="warm-up optimizer steps per configuration (1-2)")
    parser.add_argument("--rounds", type=int, help="runs of every configuration, alternating order")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to train (default cpu)")
    parser.add_argument("--only", action="append", default=[], help="run only configurations whose name contains this")
    parser.add_argument("--skip", action="append", default=[], help="leave out configurations whose name contains this")
    parser.add_argument("--no-dpo", action="store_true", help="skip DPO even when posttrain/trainer/dpo.py exists")
    parser.add_argument("--trl-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trl_worker:
        trl_worker(json.loads(args.trl_worker))
        return
    global DEVICE
    DEVICE = args.device
    steps = args.steps or (2 if args.quick else 6)
    warmup = args.warmup or (1 if args.quick else 2)
    rounds = args.rounds or (1 if args.quick else 2)
    dpo = (REPO / "posttrain/trainer/dpo.py").is_file() and not args.no_dpo
    bench_started = time.perf_counter()

    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="train-throughput-") as tmp:
        work = Path(tmp)
        model = build_model(work / "model")
        tokenizer = AutoTokenizer.from_pretrained(model)
        rows = make_rows(tokenizer, 320)
        rows_path = work / "rows.jsonl"
        rows_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        preference_path = work / "preference.jsonl"
        preference_path.write_text("".join(json.dumps(r) + "\n" for r in preference_rows(rows)))
        lengths = [len(tokenizer.apply_chat_template([{"role": "user", "content": r["question"]},
                                                      {"role": "assistant", "content": r["answer"]}], tokenize=True,
                                                     return_dict=False)) for r in rows]
        n = parameters_in_matmuls(model)
        print(f"model: {n / 1e6:.1f}M parameters in matmuls; rows: {len(rows)}, {min(lengths)}-{max(lengths)} tokens "
              f"(mean {statistics.mean(lengths):.0f}); batch {BATCH} rows or {PACKED_BATCH} pack of {PACK_LENGTH}; "
              f"{warmup} warm-up + {steps} measured steps, {rounds} round(s); DPO: {'yes' if dpo else 'no (no dpo.py)'}",
              flush=True)

        import torch

        from posttrain.trainer.precision import cpu_has_native_bf16

        native_bf16 = cpu_has_native_bf16() if DEVICE == "cpu" else torch.cuda.is_bf16_supported()
        configs = [c for c in configurations(dpo=dpo, native_bf16=native_bf16)
                   if (not args.only or any(o in c["name"] for o in args.only))
                   and not any(s in c["name"] for s in args.skip)]
        peaks = [matmul_peak_gflops(threads=args.threads)]
        bf16_peaks = [matmul_peak_gflops(threads=args.threads, dtype="bf16")]
        results: dict[str, list[dict]] = {c["name"]: [] for c in configs}
        for round_index in range(rounds):
            order = configs if round_index % 2 == 0 else configs[::-1]
            for config in order:
                runner = run_ours if config["kind"] == "ours" else run_trl
                data = preference_path if config["method"] == "dpo" else rows_path
                result = runner(config, work=work, model=model, rows_path=data, warmup=warmup, steps=steps,
                                threads=args.threads)
                results[config["name"]].append(result)
                shown = (f"{result['tokens_per_s']:8.0f} tok/s  pad {_percent(result['padding']):>5}%  "
                         f"rss {result['peak_rss_mb']:6.0f} MB" if "error" not in result else result["error"][-300:])
                print(f"  round {round_index + 1}  {config['name']:<26} {shown}", flush=True)
                peaks.append(matmul_peak_gflops(threads=args.threads, repeats=4))
                bf16_peaks.append(matmul_peak_gflops(threads=args.threads, repeats=4, dtype="bf16"))
        latency = first_step_latency(work)

    peak, bf16_peak = max(peaks), max(bf16_peaks)
    best = {}
    for name, runs in results.items():
        ok = [r for r in runs if "error" not in r]
        if ok:
            rates = sorted(r["tokens_per_s"] for r in ok)
            middle = ok[[r["tokens_per_s"] for r in ok].index(rates[(len(rates) - 1) // 2])]  # the median run
            best[name] = {**middle, "tokens_per_s": statistics.median(rates),
                          "peak_rss_mb": max(r["peak_rss_mb"] for r in ok), "rounds": [r["tokens_per_s"] for r in ok],
                          "peak_gpu_mb": max((r["peak_gpu_mb"] or 0 for r in ok), default=0) or None}
    print()
    shape = "8192x8192" if DEVICE == "cuda" else "2048x2048"
    print(f"matmul peak ({shape}, best of {len(peaks)} measurements): fp32 {peak:.1f} GFLOP/s, bf16 "
          f"{bf16_peak:.1f} GFLOP/s (native bf16: {'yes' if native_bf16 else 'no'}); "
          f"model FLOPs/token: full 6N, LoRA 4N, DPO-LoRA 6N, N = {n / 1e6:.1f}M")
    print("MFU % is against the fp32 peak (the issue's measure); 'own %' against the peak of the dtype the "
          "configuration computed in (dtype column)")
    gpu = DEVICE == "cuda"  # then the GPU memory peak (torch's allocator) matters more than the host RSS
    header = (f"{'config':<26} {'real tok/s':>10} {'padding %':>9} {'peak RSS MB':>11} "
              + (f"{'peak GPU MB':>11} " if gpu else "")
              + f"{'dtype':>5} {'MFU %':>6} {'own %':>6} {'vs TRL fastest':>14}  per round")
    print(header)
    print("-" * len(header))
    names = list(results)
    for config in configs:
        name = config["name"]
        if name not in best:
            print(f"{name:<26} failed: {results[name][-1].get('error', '')[-200:]}")
            continue
        r = best[name]
        mfu = 100 * flops_per_token(config, n) * r["tokens_per_s"] / (peak * 1e9)
        own = mfu * peak / (bf16_peak if r["dtype"] == "bf16" else peak)
        baselines = [best[b]["tokens_per_s"] for b in _baseline_for(config, names) if b in best]
        ratio = f"{r['tokens_per_s'] / max(baselines):.2f}x" if baselines else "-"
        rounds_text = " ".join(f"{t:.0f}" for t in r["rounds"])
        gpu_text = f"{r['peak_gpu_mb'] or 0:11.0f} " if gpu else ""
        print(f"{name:<26} {r['tokens_per_s']:10.0f} {_percent(r['padding']):>9} {r['peak_rss_mb']:11.0f} {gpu_text}"
              f"{r['dtype']:>5} {mfu:6.1f} {own:6.1f} {ratio:>14}  {rounds_text}")
    for name, r in best.items():
        if r.get("compile_s"):
            print(f"{name}: process start to the end of its first (compiling) step {r['compile_s']:.0f} s "
                  "(inductor's on-disk cache makes later compiles of the same model faster)")
    _print_targets(best, names, peak=peak, n=n)
    print()
    print("submit to first optimizer step (tiny model, trainer process start to first metric event): "
          + ", ".join(f"{t:.2f} s" for t in latency))
    print(f"bench wall time: {time.perf_counter() - bench_started:.0f} s; machine load average now: "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
