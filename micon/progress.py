"""Progress for long jobs that reads well in a terminal and in a Slurm `.out` file alike.

`bar(...)` takes tqdm's arguments. On a terminal it is tqdm's bar. When stderr is not a terminal (a
redirected log, a Slurm job, a Ray worker) it writes plain lines instead, with no carriage returns or
cursor codes:

    evaluate top-k query blocks: 12/40 blocks (30%), 1.9 blocks/s, 6 s elapsed, ETA 15 s

A line is written at most every `MICON_PROGRESS_EVERY` seconds (default 30) and once at the end.
`MICON_PROGRESS=plain` forces plain lines on a terminal too, and `MICON_PROGRESS=off` silences both.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Iterable, Iterator

DEFAULT_EVERY_S = 30.0


def _duration(seconds: float) -> str:
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds // 60:.0f} min {seconds % 60:02.0f} s"
    return f"{seconds // 3600:.0f} h {seconds % 3600 // 60:02.0f} min"


def _count(n: float, unit_scale: bool) -> str:
    if unit_scale and n >= 1000:
        for suffix, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
            if n >= size:
                return f"{n / size:.1f}{suffix}"
    return f"{int(n):,}"


class PlainBar:
    """tqdm's interface (iteration, update, close, set_postfix, n, total, refresh, write) as plain lines."""

    def __init__(self, iterable: Iterable | None = None, *, total: float | None = None, desc: str = "",
                 unit: str = "it", unit_scale: bool = False, initial: float = 0, disable: bool = False,
                 every: float | None = None, file=None, **_ignored):
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.desc, self.unit, self.unit_scale = total, desc, unit, unit_scale
        self.n = initial
        self.disable = disable
        self.every = float(os.environ.get("MICON_PROGRESS_EVERY", DEFAULT_EVERY_S)) if every is None else every
        self.file = file or sys.stderr
        self.postfix = ""
        self._start = self._last = time.monotonic()
        self._start_n = initial
        self._closed = False

    # --- tqdm's interface -------------------------------------------------------------------
    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __len__(self) -> int:
        return int(self.total or 0)

    def __enter__(self) -> "PlainBar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, k: float = 1) -> None:
        self.n += k
        if time.monotonic() - self._last >= self.every:
            self._emit()

    def refresh(self) -> None:
        if time.monotonic() - self._last >= self.every:
            self._emit()

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def write(self, s: str) -> None:
        print(s, file=self.file, flush=True)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._emit(final=True)

    # --- the line ---------------------------------------------------------------------------
    def line(self) -> str:
        elapsed = time.monotonic() - self._start
        done = self.n - self._start_n
        rate = done / elapsed if elapsed > 0 else 0.0
        units = f"{self.unit}s" if not self.unit.endswith("s") and self.unit not in ("B",) else self.unit
        if self.total:
            text = (f"{_count(self.n, self.unit_scale)}/{_count(self.total, self.unit_scale)} {units} "
                    f"({100 * self.n / self.total:.0f}%)")
        else:
            text = f"{_count(self.n, self.unit_scale)} {units}"
        text += f", {rate:.3g} {units}/s, {_duration(elapsed)} elapsed"
        if self.total and rate > 0 and self.n < self.total:
            text += f", ETA {_duration((self.total - self.n) / rate)}"
        return f"{self.desc + ': ' if self.desc else ''}{text}{'; ' + self.postfix if self.postfix else ''}"

    def _emit(self, final: bool = False) -> None:
        if self.disable or (final and self.n == self._start_n and not self.total):
            return
        self._last = time.monotonic()
        print(self.line(), file=self.file, flush=True)


def plain() -> bool:
    """True when progress should be plain lines: stderr is not a terminal, or MICON_PROGRESS=plain."""
    mode = os.environ.get("MICON_PROGRESS", "").lower()
    return mode == "plain" or (mode != "tqdm" and not sys.stderr.isatty())


def bar(iterable: Iterable | None = None, **kwargs):
    """tqdm on a terminal, `PlainBar` lines otherwise (see the module's docstring); tqdm's arguments."""
    if os.environ.get("MICON_PROGRESS", "").lower() == "off":
        kwargs["disable"] = True
    if plain():
        kwargs.pop("position", None)
        kwargs.pop("leave", None)
        kwargs.pop("dynamic_ncols", None)
        return PlainBar(iterable, **kwargs)
    from tqdm import tqdm

    return tqdm(iterable, **kwargs)
