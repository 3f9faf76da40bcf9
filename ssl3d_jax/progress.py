"""A dependency-free progress bar for long loops (preprocessing, training, inference).

On a terminal it redraws one line on stderr (`desc  12/40 [30%] 1.8 it/s ETA 0:15 loss=0.31`);
when stderr is not a terminal (batch jobs, log files) it stays quiet except for at most one
`logging` line per ~10 % of the total, so logs are not flooded with carriage returns.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, TextIO

log = logging.getLogger(__name__)

# Terminal redraws are throttled: printing every step of a fast loop costs more than the step.
_REDRAW_S = 0.1


def _fmt_time(seconds: float) -> str:
    seconds = int(max(seconds, 0) + 0.5)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


class Progress:
    """Context manager counting work items towards `total`.

    Args:
      total: number of items (None: unknown; no percentage or ETA).
      desc: label at the start of the line.
      enabled: draw the bar; None: only when stderr is a TTY. Disabled bars log at most one line
        per ~10 % of `total` (logger `ssl3d_jax.progress`, level INFO).
      stream: where an enabled bar draws (default sys.stderr).
      initial: items already done before this bar started (a resumed run): counted in the
        position and percentage, not in the rate.
      unit: what an item is, as shown in the rate ('it/s', 'steps/s', ...).

    Usage:
      with Progress(len(cases), "preprocess") as bar:
          for case in cases:
              ...
              bar.update(loss=0.31)
    """

    def __init__(
        self,
        total: int | None,
        desc: str = "",
        *,
        enabled: bool | None = None,
        stream: TextIO | None = None,
        initial: int = 0,
        unit: str = "it",
    ):
        self.total = None if total is None else int(total)
        self.desc = desc
        self.stream = sys.stderr if stream is None else stream
        if enabled is None:
            isatty = getattr(self.stream, "isatty", None)
            enabled = bool(isatty and isatty())
        self.enabled = enabled
        self.initial = int(initial)
        self.unit = unit
        self.n = self.initial
        self.postfix: dict[str, Any] = {}
        self._start = time.monotonic()
        self._last_draw = 0.0
        self._last_decile = self._decile()
        self._width = 0

    def __enter__(self) -> Progress:
        self._start = time.monotonic()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def format(self) -> str:
        """The current status line (without carriage return)."""
        elapsed = time.monotonic() - self._start
        rate = (self.n - self.initial) / elapsed if elapsed > 0 else 0.0
        parts = [self.desc] if self.desc else []
        if self.total is not None:
            pct = 100.0 * self.n / self.total if self.total else 100.0
            parts.append(f" {self.n}/{self.total} [{pct:.0f}%]")
        else:
            parts.append(f" {self.n}")
        u = self.unit
        parts.append(f"{rate:.3g} {u}/s" if rate >= 0.1 or rate == 0 else f"{1 / rate:.3g} s/{u}")
        if self.total is not None and rate > 0 and self.n < self.total:
            parts.append(f"ETA {_fmt_time((self.total - self.n) / rate)}")
        parts += [f"{k}={_fmt_value(v)}" for k, v in self.postfix.items()]
        return " ".join(parts)

    def update(self, n: int = 1, **postfix: Any) -> None:
        """Counts `n` more items; keyword values (e.g. loss=0.31) are shown after the ETA."""
        self.n += int(n)
        self.postfix.update(postfix)
        now = time.monotonic()
        done = self.total is not None and self.n >= self.total
        if self.enabled:
            if done or now - self._last_draw >= _REDRAW_S:
                self._draw()
                self._last_draw = now
        elif self.total:
            decile = self._decile()
            if decile > self._last_decile:
                self._last_decile = decile
                log.info("%s", self.format().strip())

    def _decile(self) -> int:
        return min(10, self.n * 10 // self.total) if self.total else 0

    def _draw(self) -> None:
        line = self.format()
        pad = max(self._width - len(line), 0)
        self._width = len(line)
        self.stream.write("\r" + line + " " * pad)
        self.stream.flush()

    def close(self) -> None:
        """Draws the final state and ends the line (enabled bars only)."""
        if self.enabled:
            self._draw()
            self.stream.write("\n")
            self.stream.flush()
            self.enabled = False
