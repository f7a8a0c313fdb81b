"""The process's memory, as the report states it: resident set (`/proc/self/statm`) and, apart from it, the
anonymous part — what the job itself allocated, without the pages of memory-mapped weight files that the kernel
can drop again (`--offload-folder`). Linux only; None elsewhere."""
from __future__ import annotations

import re
import resource
import threading
from pathlib import Path

_ANON = re.compile(r"RssAnon:\s+(\d+) kB")


def rss_mb() -> float | None:
    """Resident memory now."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * resource.getpagesize() / 2**20


def anon_mb() -> float | None:
    """Anonymous resident memory now (heap, tensors the job made), without file-backed pages."""
    try:
        found = _ANON.search(Path("/proc/self/status").read_text())
    except OSError:
        return None
    return int(found.group(1)) / 1024 if found else None


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class AnonPeak:
    """The highest `anon_mb` seen while the context runs, sampled every `interval` seconds by a daemon thread
    (a spike shorter than that can be missed; the kernel keeps no peak of the anonymous part)."""

    def __init__(self, interval: float = 0.05):
        self.interval, self.peak_mb = interval, anon_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _update(self) -> None:
        now = anon_mb()
        if now is not None and (self.peak_mb is None or now > self.peak_mb):
            self.peak_mb = now

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._update()

    def __enter__(self) -> "AnonPeak":
        if self.peak_mb is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self._update()
