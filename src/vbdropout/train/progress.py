"""A dependency-free progress bar on stderr (silent when stderr is not a terminal)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressBar:
    """``bar.update(n, text)`` redraws ``[#####.....] n/total text``; ``close()`` ends the line."""

    def __init__(
        self, total: int, label: str = "", stream: TextIO | None = None, enabled: bool | None = None
    ) -> None:
        self.total = max(1, total)
        self.label = label
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self._last = 0.0

    def update(self, done: int, text: str = "", force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and done < self.total and now - self._last < 0.1):
            return
        self._last = now
        filled = int(30 * done / self.total)
        bar = "#" * filled + "." * (30 - filled)
        self.stream.write(f"\r{self.label} [{bar}] {done}/{self.total} {text}\x1b[K")
        self.stream.flush()

    def close(self, text: str = "") -> None:
        if self.enabled:
            self.update(self.total, text, force=True)
            self.stream.write("\n")
            self.stream.flush()
