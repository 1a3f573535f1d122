"""Progress a person can follow: a bar on a terminal, a plain line now and then in a log file.

On a cluster stderr is a file: a progress bar there writes a carriage-return update and cursor
escapes several times a second (tens of KB of unreadable log per job). When stderr is not a
terminal (nor a notebook), :func:`progress` returns a :class:`PlainProgress` instead, which logs
one line such as ``CMU-1: 1,200/5,000 tiles (24 %), 75.2 tiles/s, ETA 0:00:51`` at most every
``interval_s`` seconds.
"""

from __future__ import annotations

import datetime
import logging
import sys
import time
from collections.abc import Sized
from typing import Any, Iterable, Iterator


def is_interactive() -> bool:
    """True when progress bars can be drawn: stderr is a terminal, or we run in a notebook."""
    return "ipykernel" in sys.modules or bool(getattr(sys.stderr, "isatty", lambda: False)())


class PlainProgress:
    """The part of tqdm's interface the jobs use, as rate-limited log lines."""

    def __init__(
        self,
        iterable: Iterable[Any] | None = None,
        *,
        total: int | None = None,
        desc: str = "",
        unit: str = "it",
        interval_s: float = 30.0,
        log: logging.Logger | None = None,
        initial: int = 0,
        disable: bool = False,
    ) -> None:
        self.iterable, self.desc, self.unit, self.interval_s = iterable, desc, unit, interval_s
        self.total = total if total is not None else (len(iterable) if isinstance(iterable, Sized) else None)
        self.n, self._initial, self.disable, self.postfix = initial, initial, disable, ""
        self._log = log or logging.getLogger(__name__)
        self._started = self._last = time.monotonic()
        self._closed = False
        if not disable:
            self._log.info("%s: started%s", self.desc, f", {self.total:,} {self.unit}s" if self.total else "")

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[Any]:
        for item in self.iterable or ():
            yield item
            self.update(1)
        self.close()  # like tqdm, an exhausted iteration ends the bar

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if not self.disable and now - self._last >= self.interval_s:
            self._last = now
            self._log.info("%s", self.line(now))

    def line(self, now: float | None = None) -> str:
        """The progress line: done/total, share, rate and remaining time."""
        elapsed = (time.monotonic() if now is None else now) - self._started
        rate = (self.n - self._initial) / elapsed if elapsed > 0 else 0.0
        units = self.unit + "s"
        text = f"{self.desc}: {self.n:,}" + (f"/{self.total:,}" if self.total else "") + f" {units}"
        if self.total:
            text += f" ({100 * self.n / self.total:.0f} %)"
        text += f", {rate:.1f} {units}/s"
        if self.total and rate > 0:
            text += f", ETA {datetime.timedelta(seconds=round((self.total - self.n) / rate))}"
        return text + (f" ({self.postfix})" if self.postfix else "")

    def set_postfix(self, **values: Any) -> None:
        """Values shown at the end of the next line (tqdm's ``set_postfix``)."""
        self.postfix = ", ".join(f"{key} {value}" for key, value in values.items())

    def close(self) -> None:
        """The end line (once); a log line is never rewritten."""
        if not self._closed and not self.disable:
            elapsed = datetime.timedelta(seconds=round(time.monotonic() - self._started))
            self._log.info("%s: finished in %s", self.line(), elapsed)
        self._closed = True


def progress(
    iterable: Iterable[Any] | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    position: int = 0,
    leave: bool = True,
    interval_s: float = 30.0,
    log: logging.Logger | None = None,
    initial: int = 0,
    disable: bool = False,
) -> Any:
    """A tqdm bar when :func:`is_interactive`, else a :class:`PlainProgress` logging a start line,
    a line at most every ``interval_s`` and an end line. ``disable``: nothing (e.g. ranks > 0)."""
    if is_interactive():
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, position=position, leave=leave, initial=initial, disable=disable)
    return PlainProgress(
        iterable, total=total, desc=desc, unit=unit, interval_s=interval_s, log=log, initial=initial, disable=disable
    )
