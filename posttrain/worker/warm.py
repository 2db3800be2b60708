"""Warm trainer processes: started ahead of time, with torch, transformers and peft already
imported, waiting on stdin for the path of a job's spec.

Importing the training stack takes seconds (more on a busy CPU); paying it before the job arrives
is what brings "submit to first optimizer step" down to the time it takes to load the model.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import threading
from pathlib import Path

log = logging.getLogger("posttrain.worker")


def trainer_command(python: str, nice: int, *args: str, module: str = "posttrain.trainer") -> list[str]:
    """``python -m module args``; ``module`` is the trainer unless a test stands another program
    speaking the trainer protocol in its place."""
    command = [python, "-m", module, *args]
    nice_bin = shutil.which("nice")
    if nice and nice_bin:
        # Lower the trainer's priority so the API stays responsive on a busy CPU.
        command = [nice_bin, "-n", str(nice), *command]
    return command


def spawn_trainer(command: list[str], stderr_path: Path) -> subprocess.Popen[bytes]:
    with open(stderr_path, "ab") as stderr:
        return subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            # A process group of its own (so a stop reaches its whole tree), but the server's
            # session: Linux's autogroup scheduling weighs niceness only within a session, and the
            # trainer's nice must make it yield to the API.
            process_group=0,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"},
        )


class WarmPool:
    """Keeps up to ``size`` idle trainer processes ready; ``take`` hands one over (or None)."""

    def __init__(self, *, size: int, python: str, nice: int, log_dir: Path) -> None:
        self.size = size
        self.python = python
        self.nice = nice
        self.log_dir = log_dir
        self._idle: list[subprocess.Popen[bytes]] = []
        self._lock = threading.Lock()
        self._closed = False

    def take(self) -> subprocess.Popen[bytes] | None:
        with self._lock:
            while self._idle:
                process = self._idle.pop(0)
                if process.poll() is None:
                    return process
        return None

    def refill(self) -> None:
        """Start processes until ``size`` are idle; cheap to call often."""
        with self._lock:
            if self._closed:
                return
            self._idle = [p for p in self._idle if p.poll() is None]
            missing = self.size - len(self._idle)
            for _ in range(missing):
                self.log_dir.mkdir(parents=True, exist_ok=True)
                command = trainer_command(self.python, self.nice, "--warm")
                self._idle.append(spawn_trainer(command, self.log_dir / "warm-trainers.log"))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for process in idle:
            if process.stdin:
                process.stdin.close()  # a warm trainer exits when its stdin closes
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def log_tail(path: Path, lines: int = 3) -> str:
    """The last ``lines`` of a trainer's log on one line (at most 500 characters), for a failure's
    message; empty when the log cannot be read."""
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])[-500:]
