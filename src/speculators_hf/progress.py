"""Progress of long work (bench, data regeneration, training): a tqdm bar when stderr is a terminal, and a
plain line every `interval` seconds otherwise (a log file, CI, nohup), so that output sent to a log still
says how far the work is, how fast it goes and when it will end."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


def format_seconds(seconds: float) -> str:
    hours, rest = divmod(round(seconds), 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """`update(n, postfix)` as work is done; `close()` at the end. `initial`: work already done (a resumed run)."""

    def __init__(
        self,
        total: int,
        desc: str,
        unit: str = "it",
        enabled: bool = True,
        interval: float = 30.0,
        initial: int = 0,
        stream: TextIO | None = None,
    ):
        self.total, self.desc, self.unit, self.interval = total, desc, unit, interval
        self.done = self.start_done = initial
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.bar: Any = None
        self.start = self.last_print = time.perf_counter()
        if enabled and self.stream.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=self.stream)

    def update(self, n: int = 1, postfix: str | None = None, line: bool | None = None) -> None:
        """`n` more units done. Without a terminal a line is printed when `line` is True, never when False, and
        by default every `interval` seconds and at the end."""
        self.done += n
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix_str(postfix, refresh=False)
            self.bar.update(n)
            return
        now = time.perf_counter()
        due = now - self.last_print >= self.interval or self.done >= self.total if line is None else line
        if self.enabled and due:
            self.last_print = now
            print(self.line(postfix), file=self.stream, flush=True)

    def line(self, postfix: str | None = None) -> str:
        """`desc: done/total unit (pct%), rate unit/s, elapsed, ETA` (+ postfix)."""
        elapsed = time.perf_counter() - self.start
        rate = (self.done - self.start_done) / elapsed if elapsed > 0 else 0.0
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta = format_seconds(left) if left != float("inf") else "?"
        pct = 100.0 * self.done / self.total if self.total else 100.0
        text = (
            f"{self.desc}: {self.done}/{self.total} {self.unit} ({pct:.0f}%), {rate:.2f} {self.unit}/s, "
            f"elapsed {format_seconds(elapsed)}, ETA {eta}"
        )
        return text + (f" [{postfix}]" if postfix else "")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
