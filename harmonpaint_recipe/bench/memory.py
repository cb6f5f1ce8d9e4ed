"""Peak-memory measurement of one benchmark run.

CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (absolute
peak of tensors the caching allocator handed out during the run).

CPU: the resident set size is process-wide and its high-water mark (``VmHWM``) only ever
grows, so each run is measured on its own:

- before the run, freed heap memory is handed back to the kernel (``malloc_trim``) and the
  baseline RSS is read;
- a sampling thread reads the RSS every ``interval`` seconds while the run executes (torch
  releases the GIL in its kernels, so the thread keeps sampling during long ops);
- where the kernel allows it, ``VmHWM`` is reset (``echo 5 > /proc/self/clear_refs``) before
  the run and read after it: an exact peak that also catches spikes shorter than the
  sampling interval.

Both peaks are reported as the increase over the baseline. glibc's dynamic mmap threshold
is pinned (``mallopt``) so large tensors are always mmapped and their pages return to the
kernel on free; otherwise a run could reuse pages an earlier run left in the heap and look
cheaper than it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import threading
from dataclasses import dataclass

import torch

_M_MMAP_THRESHOLD = -3
_libc = None


def _glibc():
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc.malloc_trim  # noqa: B018 - probe: glibc only
        except (OSError, AttributeError):
            _libc = False
    return _libc or None


def pin_mmap_threshold(nbytes: int = 1 << 20) -> bool:
    """Make glibc mmap every allocation of ``nbytes`` or more (and stop adapting the threshold)."""
    libc = _glibc()
    return bool(libc and libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(nbytes)))


def trim_heap() -> None:
    """Collect garbage and give freed heap pages back to the kernel."""
    gc.collect()
    libc = _glibc()
    if libc:
        libc.malloc_trim(0)


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def current_rss() -> int:
    """Resident set size of this process in bytes."""
    rss = _status_kb("VmRSS")
    if rss is not None:
        return rss
    import psutil

    return psutil.Process().memory_info().rss


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


@dataclass
class MemoryResult:
    """Peak memory of one run, in bytes.

    Attributes:
        peak: the reported peak (CUDA: max allocated; CPU: sampled RSS increase).
        peak_hwm: CPU only: VmHWM increase over the baseline (None where it can't be reset).
        baseline: CPU: RSS before the run; CUDA: allocated before the run.
        samples: CPU: number of RSS samples taken.
    """

    peak: int
    peak_hwm: int | None = None
    baseline: int = 0
    samples: int = 0


class PeakMemory:
    """Context manager measuring the peak memory of the block it wraps (see module doc)."""

    def __init__(self, device: torch.device, interval: float = 0.002):
        self.device = torch.device(device)
        self.interval = interval
        self.result: MemoryResult | None = None
        self._stop = threading.Event()
        self._peak = 0
        self._samples = 0
        self._hwm = False

    def __enter__(self) -> PeakMemory:
        trim_heap()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._baseline = torch.cuda.memory_allocated(self.device)
            return self
        self._baseline = current_rss()
        self._peak = self._baseline
        self._hwm = _reset_hwm()
        self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            rss = current_rss()
            self._samples += 1
            if rss > self._peak:
                self._peak = rss
            self._stop.wait(self.interval)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.result = MemoryResult(torch.cuda.max_memory_allocated(self.device), baseline=self._baseline)
            return
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, current_rss())
        hwm = _status_kb("VmHWM") if self._hwm else None
        self.result = MemoryResult(
            peak=self._peak - self._baseline,
            peak_hwm=None if hwm is None else hwm - self._baseline,
            baseline=self._baseline,
            samples=self._samples,
        )
