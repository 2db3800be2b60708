"""GRPO on this CPU: our trainer against TRL's ``GRPOTrainer``, same model, task, reward and knobs.

    .venv/bin/python bench/grpo.py            # 2 warm-up + 20 measured steps a side
    .venv/bin/python bench/grpo.py --quick    # 1 warm-up + 4 measured steps a side

The model is the ~34M-parameter bench Llama of ``train_throughput.py`` (``build_model``), first
taught in this process (a plain torch loop, full weights, not measured) to answer "Pick a colour."
with one of eight colours, about uniformly. Then each side trains a LoRA adapter on it with GRPO
for the same number of steps, in its own process (so its peak RSS, ``ru_maxrss`` from ``wait4``, is
its own): the reward is 1 for a completion that is exactly "red" and 0 otherwise, the OpenAI
``string_check`` grader of ``GRADER`` run by ``posttrain.trainer.grading.score_batch`` on both
sides (TRL gets it as its reward function), so the reward starts near 1/8.

Ours is a real job: ``python -m posttrain.trainer SPEC`` with a GRPO recipe, read through its
``metric`` events, which carry the step's phase times (``sample_seconds``, ``score_seconds``,
``reference_seconds``, ``forward_backward_seconds``, ``optim_seconds``). TRL's runs ``GRPOTrainer``
subclassed only to time the same phases: ``_generate_single_turn`` (generation), ``_calculate_rewards``
(score), the rest of ``_generate_and_score_completions`` (the reference log-probs, tokenizing,
advantages), ``training_step`` less ``_prepare_inputs`` (forward and backward), and the optimizer
step (gradient clipping, then ``on_pre_optimizer_step`` to ``on_optimizer_step``: the optimizer itself).

steps/s and the phase shares are over the measured steps (from the end of the last warm-up step to
the end of the last step, as ``train_throughput.py`` counts); generation tokens/s is the completion
tokens sampled (up to and including each one's end-of-sequence token) over the generation time;
the reward "after N steps" is the mean over the last ``REWARD_WINDOW`` steps' batches.
"""

from __future__ import annotations

import argparse
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

from bench.train_throughput import LORA_ALPHA, LORA_RANK, LORA_TARGETS, build_model  # noqa: E402

COLOURS = ["red", "blue", "green", "yellow", "white", "black", "purple", "brown"]
PROMPT = [{"role": "user", "content": "Pick a colour."}]
TARGET = "red"
GRADER = {"type": "string_check", "name": "is_red", "input": "{{sample.output_text}}",
          "reference": "{{item.answer}}", "operation": "eq"}
#: The knobs both sides train with (TRL's names; ours map one to one, printed by the bench).
KNOBS = {"batch_prompts": 4, "num_generations": 8, "max_completion_length": 8, "temperature": 1.0, "top_p": 1.0,
         "beta": 0.04, "epsilon": 0.2, "loss_type": "dapo", "scale_rewards": "group", "learning_rate": 5e-3,
         "lr_scheduler": "linear, no warm-up", "max_grad_norm": 1.0, "weight_decay": 0.0,
         "lora_rank": LORA_RANK, "lora_alpha": LORA_ALPHA, "lora_targets": LORA_TARGETS}
REWARD_WINDOW = 3
PHASES = ("sample", "score", "reference", "forward_backward", "optim")

# --------------------------------------------------------------------------- the colour model


def colour_model(work: Path, *, steps: int) -> Path:
    """The bench model after ``steps`` full-weight SFT steps on 'Pick a colour.' -> one of COLOURS
    (the loss on the answer and its end token only), saved beside it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = build_model(work / "model")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    prompt = tokenizer.apply_chat_template(PROMPT, tokenize=True, add_generation_prompt=True, return_dict=False)
    rows = [tokenizer.apply_chat_template([*PROMPT, {"role": "assistant", "content": c}], tokenize=True,
                                          return_dict=False) for c in COLOURS]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, : len(prompt)] = -100
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    torch.manual_seed(0)
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    out = work / "colour-model"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    tokens = statistics.mean(len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in COLOURS)
    print(f"colour model: {steps} SFT steps, final answer loss {float(loss):.3f} (a colour is {tokens:.1f} tokens "
          f"+ eos on average)", flush=True)
    return out


def write_rows(path: Path, count: int) -> Path:
    path.write_text("".join(json.dumps({"messages": PROMPT, "answer": TARGET}) + "\n" for _ in range(count)))
    return path


# --------------------------------------------------------------------------- our side: a real trainer job


def _wait(proc: subprocess.Popen) -> tuple[int, float]:
    """Reap the child; returns (exit status, its own peak RSS in MB)."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss / 1024


def _env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path}


def run_ours(*, work: Path, model: Path, rows: Path, warmup: int, steps: int, threads: int | None,
             dtype: str) -> dict:
    from posttrain.domain.recipes import JobPlan, TrainerSpec, build_recipe

    folder = Path(tempfile.mkdtemp(dir=work, prefix="ours-"))
    total = warmup + steps
    recipe = {"method": "grpo",
              "adapter": {"attention": ["q_proj", "v_proj", "output_proj"], "mlp": True, "rank": LORA_RANK,
                          "alpha": LORA_ALPHA},
              "data": {"batch_size": KNOBS["batch_prompts"]},
              "schedule": {"n_epochs": 1, "max_steps_per_epoch": total},
              "optimizer": {"lr": KNOBS["learning_rate"], "weight_decay": 0.0, "num_warmup_steps": 0},
              "dtype": dtype, "seed": 0,
              "grpo": {"grader": GRADER, "num_generations": KNOBS["num_generations"],
                       "max_completion_length": KNOBS["max_completion_length"], "temperature": KNOBS["temperature"],
                       "top_p": KNOBS["top_p"], "beta": KNOBS["beta"], "epsilon": KNOBS["epsilon"],
                       "loss_type": KNOBS["loss_type"], "scale_rewards": KNOBS["scale_rewards"],
                       "eval_interval": total + 1}}  # no evaluation inside the measured steps
    plan = JobPlan(recipe=build_recipe(recipe), model=str(model), output_dir=str(folder / "out"),
                   train_rows_path=str(rows))
    spec = TrainerSpec(job_uuid="bench-grpo", plan=plan, device="cpu", threads=threads, compile="off")
    spec_path = folder / "spec.json"
    spec_path.write_text(spec.model_dump_json())
    stderr = open(folder / "stderr.txt", "w")  # noqa: SIM115 - the trainer's, open while it runs
    proc = subprocess.Popen([sys.executable, "-m", "posttrain.trainer", str(spec_path)], cwd=REPO, env=_env(),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True)
    step_ends, metrics, failure, computed = [], [], None, dtype
    for line in proc.stdout:
        now = time.perf_counter()
        event = json.loads(line)
        if event["event"] == "started":
            computed = event["resources"].get("dtype", dtype)
        elif event["event"] == "metric":
            step_ends.append(now)
            metrics.append(event)
            if len(step_ends) == total:
                proc.send_signal(signal.SIGTERM)  # skip the epoch-end validation and checkpoint
        elif event["event"] == "failed":
            failure = event["message"]
    proc.stdout.close()
    code, rss = _wait(proc)
    proc.stdin.close()
    if failure or len(step_ends) < total:
        return {"error": failure or f"exit {code} after {len(step_ends)} steps: "
                f"{(folder / 'stderr.txt').read_text()[-1500:]}"}
    completions = KNOBS["batch_prompts"] * KNOBS["num_generations"]
    steps_rows = [{"reward": m["reward_mean"], "tokens": m["completion_length"] * completions,
                   **{p: m[f"{p}_seconds"] for p in PHASES}} for m in metrics]
    return summarise(step_ends, steps_rows, warmup=warmup, rss=rss, dtype=computed)


# --------------------------------------------------------------------------- TRL's side


def run_trl(*, work: Path, model: Path, warmup: int, steps: int, threads: int | None, bf16: bool) -> dict:
    folder = Path(tempfile.mkdtemp(dir=work, prefix="trl-"))
    job = {"model": str(model), "out": str(folder), "max_steps": warmup + steps, "threads": threads, "bf16": bf16}
    stderr = open(folder / "stderr.txt", "w")  # noqa: SIM115 - the worker's, open while it runs
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--trl-worker", json.dumps(job)],
                            cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=stderr, text=True)
    out = proc.stdout.read()
    proc.stdout.close()
    code, rss = _wait(proc)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if code or not lines:
        return {"error": f"exit {code}: {(folder / 'stderr.txt').read_text()[-1500:]}"}
    result = json.loads(lines[-1])
    return summarise(result["step_ends"], result["steps"], warmup=warmup, rss=rss,
                     dtype="bf16" if bf16 else "fp32")


def trl_settings(*, bf16: bool) -> dict:
    """TRL's fastest honest CPU settings for this task (printed by the bench): plain transformers
    generation (no vLLM), bf16 autocast where the CPU has native bf16, no gradient checkpointing."""
    return {"use_vllm": False, "bf16": bf16, "gradient_checkpointing": False, "use_cpu": True,
            "per_device_train_batch_size": KNOBS["batch_prompts"] * KNOBS["num_generations"],
            "gradient_accumulation_steps": 1, "steps_per_generation": 1, "num_iterations": 1,
            "dataloader_num_workers": 0}


def trl_worker(job: dict) -> None:
    """Runs in its own process: TRL's GRPOTrainer, per-step phase times on stdout as JSON."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from posttrain.domain.graders import make_sample, parse_grader
    from posttrain.trainer.grading import score_batch

    if job["threads"]:
        torch.set_num_threads(job["threads"])
    grader = parse_grader(GRADER)
    tokenizer = AutoTokenizer.from_pretrained(job["model"])
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32)
    rows = Dataset.from_list([{"prompt": PROMPT, "answer": TARGET} for _ in range(64)])
    settings = trl_settings(bf16=job["bf16"])
    args = GRPOConfig(output_dir=job["out"], max_steps=job["max_steps"], report_to="none", save_strategy="no",
                      logging_steps=1, disable_tqdm=True, seed=0, learning_rate=KNOBS["learning_rate"],
                      lr_scheduler_type="linear", warmup_steps=0, max_grad_norm=KNOBS["max_grad_norm"],
                      weight_decay=KNOBS["weight_decay"], num_generations=KNOBS["num_generations"],
                      max_completion_length=KNOBS["max_completion_length"], temperature=KNOBS["temperature"],
                      top_p=KNOBS["top_p"], beta=KNOBS["beta"], epsilon=KNOBS["epsilon"],
                      loss_type=KNOBS["loss_type"], scale_rewards=KNOBS["scale_rewards"], **settings)
    peft_config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules=LORA_TARGETS, lora_dropout=0.0,
                             task_type="CAUSAL_LM")
    current: dict = {}
    steps: list[dict] = []
    step_ends: list[float] = []

    def new_step() -> None:
        current.clear()
        current.update(dict.fromkeys(PHASES, 0.0) | {"prepare": 0.0, "step": 0.0, "reward": 0.0, "tokens": 0})

    new_step()

    def is_red(completions, answer, completion_ids, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        results = score_batch(grader, [make_sample(t) for t in texts], [{"answer": a} for a in answer])
        rewards = [float(r.score) for r in results]
        current["reward"] = sum(rewards) / len(rewards)
        current["tokens"] += sum(len(ids) for ids in completion_ids)
        return rewards

    def timed(phase: str, fn):
        def wrapper(*a, **k):
            started = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                current[phase] += time.perf_counter() - started
        return wrapper

    class Timed(GRPOTrainer):
        def _generate_single_turn(self, *a, **k):
            return timed("sample", super()._generate_single_turn)(*a, **k)

        def _calculate_rewards(self, *a, **k):
            return timed("score", super()._calculate_rewards)(*a, **k)

        def _generate_and_score_completions(self, *a, **k):
            return timed("prepare", super()._generate_and_score_completions)(*a, **k)

        def training_step(self, *a, **k):
            return timed("step", super().training_step)(*a, **k)

        def _clip_grad_norm(self, *a, **k):  # ours clips inside its optim_step: counted alike
            return timed("optim", super()._clip_grad_norm)(*a, **k)

    class Steps(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            current["optim_started"] = time.perf_counter()

        def on_optimizer_step(self, args, state, control, **kwargs):
            current["optim"] += time.perf_counter() - current.pop("optim_started")

        def on_step_end(self, args, state, control, **kwargs):
            step_ends.append(time.perf_counter())
            row = dict(current)
            row["reference"] = row["prepare"] - row["sample"] - row["score"]  # ref log-probs, tokenizing, advantages
            row["forward_backward"] = row["step"] - row["prepare"]
            steps.append({k: row[k] for k in (*PHASES, "reward", "tokens")})
            new_step()

    trainer = Timed(model=model, reward_funcs=[is_red], args=args, train_dataset=rows, processing_class=tokenizer,
                    peft_config=peft_config, callbacks=[Steps()])
    trainer.train()
    print(json.dumps({"step_ends": step_ends, "steps": steps}), flush=True)


# --------------------------------------------------------------------------- figures


def summarise(step_ends: list[float], rows: list[dict], *, warmup: int, rss: float, dtype: str) -> dict:
    measured = rows[warmup:]
    span = step_ends[-1] - step_ends[warmup - 1]
    phases = {p: sum(r[p] for r in measured) for p in PHASES}
    sample_seconds = phases["sample"]
    return {"steps": len(measured), "seconds": span, "steps_per_s": len(measured) / span,
            "gen_tokens_per_s": sum(r["tokens"] for r in measured) / max(sample_seconds, 1e-9),
            "phases": phases, "other": span - sum(phases.values()), "peak_rss_mb": rss, "dtype": dtype,
            "rewards": [r["reward"] for r in rows],
            "reward_end": statistics.mean(r["reward"] for r in rows[-REWARD_WINDOW:]),
            "reward_start": rows[0]["reward"]}


def _share(result: dict, phase: str) -> str:
    seconds = result["phases"][phase] if phase in result["phases"] else result["other"]
    return f"{seconds / result['steps']:6.3f} s {100 * seconds / result['seconds']:4.0f}%"


def report(ours: dict, trl: dict, *, trl_config: dict) -> None:
    print()
    print("knobs (both sides): " + ", ".join(f"{k}={v}" for k, v in KNOBS.items()))
    print("TRL settings: " + ", ".join(f"{k}={v}" for k, v in trl_config.items()))
    results = {"ours": ours, "TRL": trl}
    for name, r in results.items():
        if "error" in r:
            print(f"{name} failed: {r['error'][-800:]}")
    if any("error" in r for r in results.values()):
        return
    print(f"{'':<20} {'ours':>16} {'TRL':>16} {'ours/TRL':>9}")
    rows = [("steps/s", "steps_per_s", "{:16.3f}"), ("gen tokens/s", "gen_tokens_per_s", "{:16.0f}"),
            ("peak RSS MB", "peak_rss_mb", "{:16.0f}")]
    for label, key, fmt in rows:
        print(f"{label:<20} {fmt.format(ours[key])} {fmt.format(trl[key])} {ours[key] / trl[key]:8.2f}x")
    print(f"{'reward, first step':<20} {ours['reward_start']:16.3f} {trl['reward_start']:16.3f}")
    print(f"{f'reward, last {REWARD_WINDOW} steps':<20} {ours['reward_end']:16.3f} {trl['reward_end']:16.3f}")
    print(f"{'dtype':<20} {ours['dtype']:>16} {trl['dtype']:>16}")
    print("where a measured step's time goes (seconds a step, share of the step):")
    labels = {"sample": "generation", "score": "score (grader)", "reference": "reference/prep",
              "forward_backward": "forward+backward", "optim": "optimizer step", "other": "other"}
    for phase, label in labels.items():
        print(f"  {label:<18} {_share(ours, phase):>16} {_share(trl, phase):>16}")
    print("  (TRL's reference/prep: the rest of _generate_and_score_completions: reference log-probs, "
          "tokenizing, advantages, metrics)")
    print("rewards per step: ours " + " ".join(f"{x:.2f}" for x in ours["rewards"]))
    print("                  TRL  " + " ".join(f"{x:.2f}" for x in trl["rewards"]))
    ratio = ours["steps_per_s"] / trl["steps_per_s"]
    no_worse = ours["reward_end"] >= trl["reward_end"] - 0.05
    print(f"target ours >= 2x TRL's steps/s at no worse reward: {ratio:.2f}x, reward {ours['reward_end']:.3f} vs "
          f"{trl['reward_end']:.3f} - {'met' if ratio >= 2 and no_worse else 'missed'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 warm-up + 4 measured steps a side")
    parser.add_argument("--steps", type=int, help="measured steps a side")
    parser.add_argument("--warmup", type=int, help="warm-up steps a side")
    parser.add_argument("--sft-steps", type=int, default=40, help="steps teaching the model the colours")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                        help="both sides (auto: bf16 where the CPU has it natively)")
    parser.add_argument("--trl-first", action="store_true", help="run TRL's side first (load hits the sides alike?)")
    parser.add_argument("--trl-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trl_worker:
        trl_worker(json.loads(args.trl_worker))
        return
    steps = args.steps or (4 if args.quick else 20)
    warmup = args.warmup or (1 if args.quick else 2)
    from posttrain.trainer.precision import cpu_has_native_bf16

    bf16 = cpu_has_native_bf16() if args.dtype == "auto" else args.dtype == "bf16"
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-grpo-") as tmp:
        work = Path(tmp)
        model = colour_model(work, steps=args.sft_steps)
        # One epoch holds every step of ours (TRL's sampler cycles its 64 rows).
        rows = write_rows(work / "grpo.jsonl", max(64, (warmup + steps) * KNOBS["batch_prompts"]))
        print(f"{warmup} warm-up + {steps} measured steps a side; dtype {'bf16' if bf16 else 'fp32'}", flush=True)
        sides = {"ours": lambda: run_ours(work=work, model=model, rows=rows, warmup=warmup, steps=steps,
                                          threads=args.threads, dtype="bf16" if bf16 else "fp32"),
                 "TRL": lambda: run_trl(work=work, model=model, warmup=warmup, steps=steps, threads=args.threads,
                                        bf16=bf16)}
        results = {}
        for name in (["TRL", "ours"] if args.trl_first else ["ours", "TRL"]):
            results[name] = sides[name]()
            print(f"  {name} done: {results[name].get('steps_per_s', float('nan')):.3f} steps/s", flush=True)
        ours, trl = results["ours"], results["TRL"]
    report(ours, trl, trl_config=trl_settings(bf16=bf16))
    print(f"bench wall time: {time.perf_counter() - started:.0f} s; machine load average now: "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
