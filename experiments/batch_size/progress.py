"""Progress output that suits where it goes: one rewritten line on a terminal, plain
lines (no carriage returns or cursor escapes) in a file or pipe."""

from __future__ import annotations

import sys
import time
from typing import IO, Optional

__all__ = ["Progress"]


class Progress:
    """Steps of one task. On a terminal the line is rewritten at most twice a second; else a
    plain line is written at each quarter of the task. Disabled, it writes nothing."""

    def __init__(self, total: int, label: str, enabled: bool = True, stream: Optional[IO[str]] = None) -> None:
        self.total, self.label, self.enabled = max(1, total), label, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.terminal = enabled and bool(getattr(self.stream, "isatty", lambda: False)())
        self.done = 0
        self._start = self._shown = time.perf_counter()
        self._next_quarter = 1

    def update(self, steps: int = 1, note: str = "") -> None:
        self.done += steps
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.terminal:
            if now - self._shown >= 0.5 or self.done >= self.total:
                self._shown = now
                self.stream.write(f"\r{self._text(now, note)}".ljust(79))
                self.stream.flush()
        elif self.done * 4 >= self._next_quarter * self.total:
            while self.done * 4 >= self._next_quarter * self.total:
                self._next_quarter += 1
            self.stream.write(self._text(now, note) + "\n")
            self.stream.flush()

    def _text(self, now: float, note: str) -> str:
        percent = 100 * self.done // self.total
        text = f"{self.label}: {self.done}/{self.total} ({percent}%), {now - self._start:.0f} s"
        return f"{text}, {note}" if note else text

    def close(self) -> None:
        """End the terminal line, so the next output starts on a fresh line."""
        if self.terminal:
            self.stream.write("\r" + " " * 79 + "\r")
            self.stream.flush()
