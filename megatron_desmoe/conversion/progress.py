"""Progress bars and throughput figures for the converters."""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass, field

from tqdm import tqdm


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class ConversionStats:
    """What one conversion moved, how fast, and its memory high-water mark."""

    direction: str
    tensors: int = 0
    bytes: int = 0
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    notes: list[str] = field(default_factory=list)
    _start: float = field(default_factory=time.perf_counter, repr=False)

    def count(self, nbytes: int) -> None:
        self.tensors += 1
        self.bytes += nbytes

    def finish(self) -> "ConversionStats":
        self.seconds = time.perf_counter() - self._start
        self.peak_rss_mb = peak_rss_mb()
        return self

    def summary(self) -> str:
        seconds = max(self.seconds, 1e-9)
        megabytes = self.bytes / 1e6
        return (f"{self.direction}: {self.tensors} tensors, {megabytes:.1f} MB in {self.seconds:.2f} s "
                f"({self.tensors / seconds:.0f} tensors/s, {megabytes / seconds:.1f} MB/s), "
                f"peak RSS {self.peak_rss_mb:.0f} MB" + "".join(f"; {note}" for note in self.notes))


def bar(iterable, total: int, desc: str, enabled: bool):
    return tqdm(iterable, total=total, desc=desc, unit="tensor", disable=not enabled,
                file=sys.stderr, dynamic_ncols=True)
