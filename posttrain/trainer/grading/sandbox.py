"""Runs a tenant's python grader where it cannot reach the network, the server's files or the machine.

One sandbox process per batch of samples (start-up is paid once, not per sample), built with
``unshare``: new network (only a downed loopback), mount and pid namespaces (``--fork --mount-proc
--kill-child``); as a non-root server also a user namespace (``-r``). Inside, ``sandbox_child.py`` hides
the configured paths, puts fresh tmpfs on the temp folders, drops privileges, sets the resource limits
and only then runs the source. Its results come back as JSON lines on a pipe of their own.

This side enforces the clock: the child must be ready within ``startup_seconds`` and answer each sample
within ``per_sample_seconds``; past that the whole process group is killed (the pid namespace dies with
its pid 1), that sample scores 0 with the reason, and a fresh sandbox goes on with the rest (after
``max_restarts`` sandboxes lost in a row the rest of the batch scores 0 unrun, so a grader that hangs on
every sample costs a few timeouts, not one per sample). A line that
is not the expected JSON, or a score that is not a finite number, scores 0 with the reason.
If ``unshare`` is missing or refused, every sample scores 0 saying so: never run open.
"""

from __future__ import annotations

import json
import math
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHILD_SOURCE = (Path(__file__).parent / "sandbox_child.py").read_text()
MAX_LINE_BYTES = 1 << 20


@dataclass(frozen=True)
class SandboxLimits:
    """What one python-grader sandbox may use. ``hidden_paths``: folders (or files) the grader must not
    see, e.g. the server's data folder; they read as empty inside."""

    per_sample_seconds: float = 10.0
    startup_seconds: float = 30.0
    cpu_seconds: int = 120
    memory_bytes: int = 2 << 30
    max_processes: int = 64
    file_size_bytes: int = 16 << 20
    tmpfs_bytes: int = 64 << 20
    hidden_paths: tuple[str, ...] = ()
    max_restarts: int = 3


@dataclass(frozen=True)
class SampleOutcome:
    score: float
    error: str | None = None


class SandboxUnavailable(RuntimeError):
    """The namespaces cannot be made here; python graders are refused rather than run open."""


def _command() -> list[str]:
    unshare = shutil.which("unshare")
    if unshare is None:
        raise SandboxUnavailable("the python-grader sandbox needs util-linux's unshare, which is not installed")
    flags = ["--net", "--mount", "--pid", "--fork", "--mount-proc", "--kill-child"]
    if os.geteuid() != 0:
        flags.insert(0, "--map-root-user")
    return [unshare, *flags]


def _interpreter_paths() -> list[str]:
    return sorted({os.path.realpath(p) for p in (sys.base_prefix, sys.prefix, os.path.dirname(sys.executable))})


def _request(source: str, pairs: list[dict[str, Any]], limits: SandboxLimits, fd: int) -> bytes:
    return json.dumps({
        "source": source, "pairs": pairs, "hidden_paths": [os.path.realpath(p) for p in limits.hidden_paths],
        "tmpfs_bytes": limits.tmpfs_bytes, "memory_bytes": limits.memory_bytes, "cpu_seconds": limits.cpu_seconds,
        "file_size_bytes": limits.file_size_bytes, "max_processes": _process_limit(limits.max_processes),
        "real_root": os.geteuid() == 0, "interpreter_paths": _interpreter_paths(),
    }).encode()


def _process_limit(extra: int) -> int:
    """RLIMIT_NPROC counts every task of the real user: as nobody that is the sandboxes alone; as the
    server's own user, its threads count too, so the limit is what it runs now plus ``extra``."""
    if os.geteuid() == 0:
        return extra
    uid = os.getuid()
    tasks = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    tasks += len(os.listdir(f"/proc/{entry.name}/task"))
            except OSError:
                continue
    return tasks + extra


class _Run:
    """One sandbox process over ``pairs``: the request written to its stdin, its result lines read back."""

    def __init__(self, source: str, pairs: list[dict[str, Any]], limits: SandboxLimits) -> None:
        self.limits = limits
        read_fd, write_fd = os.pipe()
        try:
            self.process = subprocess.Popen(
                [*_command(), sys.executable, "-I", "-c", CHILD_SOURCE, str(write_fd)],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                pass_fds=(write_fd,), start_new_session=True, cwd="/",
                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
            )
        finally:
            os.close(write_fd)
        self.reader = read_fd
        self.buffer = b""
        self.ended = False  # the child closed its end: it exited (or was killed), not just slow
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(_request(source, pairs, limits, write_fd))
            self.process.stdin.close()
        except BrokenPipeError:
            pass

    def _line(self, deadline: float) -> bytes | None:
        """The next line from the child, or None when it ended or the deadline passed."""
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or len(self.buffer) > MAX_LINE_BYTES:
                return None
            ready, _, _ = select.select([self.reader], [], [], left)
            if not ready:
                return None
            chunk = os.read(self.reader, 65536)
            if not chunk:
                self.ended = True
                return None
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line

    def kill(self) -> None:
        if self.reader < 0:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()
        os.close(self.reader)
        self.reader = -1

    def stderr_tail(self) -> str:
        assert self.process.stderr is not None
        text = self.process.stderr.read().decode(errors="replace").strip()
        return text.splitlines()[-1][:300] if text else ""


def _parse_outcome(line: bytes, index: int) -> SampleOutcome:
    try:
        message = json.loads(line)
    except ValueError:
        return SampleOutcome(0.0, f"the grader's output was not JSON: {line[:80]!r}")
    if not isinstance(message, dict) or message.get("i") != index:
        return SampleOutcome(0.0, f"the grader's output was not a result for sample {index}: {line[:80]!r}")
    if "error" in message:
        return SampleOutcome(0.0, str(message["error"])[:600])
    value = message.get("score")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return SampleOutcome(0.0, f"the grader's score was not a finite number: {value!r}")
    return SampleOutcome(float(value))


def run_python_grader(source: str, pairs: list[dict[str, Any]],
                      limits: SandboxLimits | None = None) -> list[SampleOutcome]:
    """Score each ``{"sample": ..., "item": ...}`` with ``grade(sample, item)`` in the sandbox."""
    limits = limits or SandboxLimits()
    outcomes: list[SampleOutcome] = []
    lost_in_a_row = 0
    while len(outcomes) < len(pairs):
        start = len(outcomes)
        if lost_in_a_row >= limits.max_restarts:
            reason = f"not run: the grader's sandbox was lost on {lost_in_a_row} samples in a row"
            return outcomes + [SampleOutcome(0.0, reason)] * (len(pairs) - start)
        try:
            run = _Run(source, pairs[start:], limits)
        except (SandboxUnavailable, OSError) as error:
            reason = str(error) if isinstance(error, SandboxUnavailable) else f"the sandbox could not start: {error}"
            return outcomes + [SampleOutcome(0.0, reason)] * (len(pairs) - start)
        try:
            first = run._line(time.monotonic() + limits.startup_seconds)
            message = _ready_message(first)
            if message is not None:
                run.kill()
                tail = run.stderr_tail()
                if first is None and run.ended:
                    message = "the python-grader sandbox could not start (namespaces refused?)"
                reason = message + (f": {tail}" if tail and first is None else "")
                return outcomes + [SampleOutcome(0.0, reason)] * (len(pairs) - start)
            for index in range(len(pairs) - start):
                line = run._line(time.monotonic() + limits.per_sample_seconds)
                if line is None:
                    why = ("the sandbox ended before answering (a limit was hit or the process was killed)"
                           if run.ended else f"timed out after {limits.per_sample_seconds:g}s; the sandbox was killed")
                    outcomes.append(SampleOutcome(0.0, why))
                    lost_in_a_row += 1
                    break
                lost_in_a_row = 0
                outcomes.append(_parse_outcome(line, index))
        finally:
            run.kill()
    return outcomes


def _ready_message(first: bytes | None) -> str | None:
    """None when the child said it is ready, else why it is not."""
    if first is None:
        return "the python grader did not start in time"
    try:
        message = json.loads(first)
    except ValueError:
        return f"the python grader wrote garbage before starting: {first[:80]!r}"
    if isinstance(message, dict) and message.get("ready") is True:
        return None
    if isinstance(message, dict) and "fatal" in message:
        return str(message["fatal"])[:600]
    return f"the python grader wrote garbage before starting: {first[:80]!r}"
