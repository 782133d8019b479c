"""Progress for long steps: a tqdm bar on a terminal, plain lines every `interval_s` elsewhere, as
`for shard in progress(shards, desc="download", unit="shard")` or `with progress(total=n) as bar: bar.update(k)`.
Steps shorter than `min_time_s` show nothing (a quick evaluation inside a training loop stays quiet);
only rank 0 reports; NANOCHAT_PROGRESS=bar|plain|off overrides (docs/QUICKSTART.md).
"""

import os
import sys
import time

MODES = ("bar", "plain", "off")


def _choose_mode(stream):
    forced = os.environ.get("NANOCHAT_PROGRESS", "").strip().lower()
    if forced in MODES:
        return forced
    if int(os.environ.get("RANK", 0)) != 0:
        return "off"
    try:
        return "bar" if stream.isatty() else "plain"
    except (AttributeError, ValueError):  # a closed or unusual stream
        return "plain"


def _duration(seconds):
    minutes, seconds = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def plural(unit):
    """English plural of a unit: batch -> batches, doc -> docs; a unit already plural stays."""
    if unit.endswith(("ch", "sh", "x", "z")):
        return unit + "es"
    return unit if unit.endswith("s") else unit + "s"


class Progress:
    """An iterable wrapper and/or a counter with update(n); use as a context manager or close()."""

    def __init__(self, iterable=None, total=None, desc="", unit="it", interval_s=15.0, stream=None, min_time_s=2.0):
        self.iterable = iterable
        if total is None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.desc, self.unit, self.interval_s, self.min_time_s = total, desc, unit, interval_s, min_time_s
        self.stream = stream if stream is not None else sys.stdout
        self.mode = _choose_mode(self.stream)
        self.n, self.closed = 0, False
        self.start = self.last_print = time.monotonic()
        self._bar = None
        if self.mode == "bar":
            from tqdm import tqdm
            self._bar = tqdm(total=total, desc=desc, unit=unit, file=self.stream, dynamic_ncols=True, leave=True,
                             delay=min_time_s)

    def __iter__(self):
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def update(self, n=1):
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.mode == "plain":
            now = time.monotonic()
            if now - self.last_print >= self.interval_s and now - self.start >= self.min_time_s:
                self._print()

    def line(self):
        elapsed = time.monotonic() - self.start
        unit = self.unit if (self.total or self.n) == 1 else plural(self.unit)
        text = f"{self.desc}: {self.n}" + (f"/{self.total}" if self.total else "") + f" {unit}"
        if self.total:
            text += f" ({100 * self.n / self.total:.0f}%)"
        text += f" {_duration(elapsed)} elapsed"
        if elapsed > 0 and self.n:
            rate = self.n / elapsed
            text += f", {rate:.3g} {unit}/s"
            if self.total and self.n < self.total:
                text += f", ~{_duration((self.total - self.n) / rate)} left"
        return text

    def _print(self):
        self.last_print = time.monotonic()
        print(self.line(), file=self.stream, flush=True)

    def close(self):
        if self.closed:
            return
        self.closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.mode == "plain" and time.monotonic() - self.start >= self.min_time_s:
            self._print()


progress = Progress  # the spelling call sites use (see the module docstring)
