"""The trainer's two channels to its launcher: protocol events out, stop requests in.

Events are JSON lines on the real stdout, one per line and flushed at once, because the launcher
parses stdout line by line and library chatter must never reach it. Stop requests come as SIGTERM
or as stdin closing (the launcher died); both only set a flag, which the training loop polls at
safe points, so a checkpoint is never half-written by a signal handler. A pause request comes as
SIGUSR1 and sets a flag of its own, which the loop polls between optimizer steps.
"""

from __future__ import annotations

import os
import signal
import stat
import sys
import threading
from typing import TextIO

from posttrain.domain.protocol import LogLine, TrainerEvent


class Reporter:
    """Writes protocol events (``domain.protocol``) as JSON lines to one stream."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def emit(self, event: TrainerEvent) -> None:
        line = event.to_line()
        with self._lock:
            self._stream.write(line + "\n")
            self._stream.flush()

    def log(self, message: str, *, level: str = "info") -> None:
        self.emit(LogLine(message=message, level=level))


class StopRequested(BaseException):
    """Raised by a stop that arrives before the training loop arms the flag.

    Loading torch and a model can take many seconds on a busy machine, and nothing polls the flag
    then; a cancel must not wait for it. A BaseException, like KeyboardInterrupt, so library code
    that catches Exception cannot swallow it.
    """


class StopFlag:
    """Set by SIGTERM/SIGINT or by stdin reaching EOF; polled by the training loop."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._pause = threading.Event()
        self._armed = False
        self.reason: str | None = None

    def is_set(self) -> bool:
        return self._event.is_set()

    def pause_requested(self) -> bool:
        """SIGUSR1 arrived: write a resume point at the next step boundary and stop (``paused``).
        Never raises, even before the loop is armed: the loop sees it before its first step."""
        return self._pause.is_set()

    def request_pause(self) -> None:
        self._pause.set()

    def arm(self) -> None:
        """From now on a stop only sets the flag, for the training loop to see at a safe point.

        Until then (reading rows, loading torch and the model, which can take many seconds on a
        busy machine) a stop ends the process at once: nothing has been trained to lose.
        """
        self._armed = True

    def set(self, reason: str) -> None:
        if not self._event.is_set():
            self.reason = reason
            self._event.set()

    def _on_signal(self, reason: str) -> None:
        self.set(reason)
        if not self._armed:
            raise StopRequested(reason)

    def install(self) -> None:
        """Install the signal handlers and, when stdin is a pipe, the stdin watcher thread.

        Only a pipe (or socket) is watched: a launcher holds the other end, so EOF means it died.
        A terminal or /dev/null (someone running the trainer by hand) is not a launcher.
        """
        signal.signal(signal.SIGTERM, lambda *_: self._on_signal("SIGTERM"))
        signal.signal(signal.SIGINT, lambda *_: self._on_signal("SIGINT"))
        signal.signal(signal.SIGUSR1, lambda *_: self.request_pause())
        try:
            mode = os.fstat(sys.stdin.fileno()).st_mode
        except (OSError, ValueError, AttributeError):
            return
        if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
            threading.Thread(target=self._watch_stdin, name="stdin-watch", daemon=True).start()

    def _watch_stdin(self) -> None:
        fd = sys.stdin.fileno()
        try:
            while os.read(fd, 65536):
                pass
        except OSError:
            pass
        self.set("stdin closed")
        if not self._armed:
            os._exit(0)  # the launcher is gone and nothing has been trained yet: nobody to tell
