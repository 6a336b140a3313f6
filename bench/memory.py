"""Peak memory of one step, on CPU (resident set) and CUDA (caching allocator).

CPU: the kernel keeps the high-water mark of the resident set (``VmHWM``); writing
``5`` to ``/proc/self/clear_refs`` resets it to the current resident set. Before a step
we hand free heap pages back to the OS (``malloc_trim``) so that memory freed by earlier
steps is neither counted in the baseline nor silently reused, read ``VmRSS``, reset the
mark, run the step and read ``VmHWM``: the difference is the step's peak above what was
live before it (inputs and weights). CUDA: ``max_memory_allocated`` above
``memory_allocated``, after ``reset_peak_memory_stats``.

glibc serves allocations below its mmap threshold from a heap that keeps freed blocks;
by default the threshold grows to 32 MiB, so chunk-sized tensors (~32 MiB) are recycled
there and the heap fragments: the resident set then exceeds the live tensors by a
history-dependent amount (tens of MiB, growing with the number of chunks). So there are
two allocator settings:

* *steady* (timed steps): the threshold fixed at 32 MiB, where glibc's own heuristic
  ends up after the first large free, so timing does not depend on history;
* *precise* (one memory step per point): 256 KiB, so every tensor is its own mapping,
  returned to the OS when freed; the resident set then follows the live tensor bytes,
  like CUDA's ``max_memory_allocated``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from functools import cache

import torch

MIB = 2**20
GIB = 2**30
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
STEADY_MMAP_THRESHOLD = 32 * MIB
PRECISE_MMAP_THRESHOLD = 256 * 1024


def _status_kib(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``), in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def rss_bytes() -> int:
    """Current resident set of this process."""
    return _status_kib("VmRSS") * 1024


def hwm_bytes() -> int:
    """High-water mark of the resident set since start or the last reset."""
    return _status_kib("VmHWM") * 1024


def reset_hwm() -> None:
    """Reset ``VmHWM`` to the current resident set (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


@cache
def _libc():
    name = ctypes.util.find_library("c")
    lib = ctypes.CDLL(name) if name else None
    return lib if lib is not None and hasattr(lib, "malloc_trim") else None


def set_allocator(precise: bool) -> bool:
    """Switch glibc between the steady and precise settings; False if not glibc."""
    lib = _libc()
    if lib is None or not hasattr(lib, "mallopt"):
        return False
    threshold = PRECISE_MMAP_THRESHOLD if precise else STEADY_MMAP_THRESHOLD
    ok = lib.mallopt(_M_MMAP_THRESHOLD, threshold) == 1
    return ok and lib.mallopt(_M_TRIM_THRESHOLD, 2 * threshold) == 1


def release_free_heap() -> None:
    """Collect garbage and return free heap pages to the OS (glibc ``malloc_trim``).

    The survivors are then frozen (``gc.freeze``): the next collection scans only what
    was made since, which keeps it in milliseconds in a process holding the many objects
    of compiled graphs (a full collection there takes ~0.5 s per step). A cycle among
    frozen objects is never freed: acceptable for a benchmark process.
    """
    gc.collect()
    gc.freeze()
    lib = _libc()
    if lib is not None:
        lib.malloc_trim(0)


@cache
def cpu_peak_supported() -> tuple[bool, str]:
    """Check that resetting ``VmHWM`` works here: ``(ok, why not)``.

    Touches 64 MiB, frees it, resets the mark and checks that it fell back.
    """
    try:
        release_free_heap()
        x = torch.ones(64 * MIB // 4)
        high = hwm_bytes()
        del x
        release_free_heap()
        reset_hwm()
        after = hwm_bytes()
    except OSError as exc:
        return False, f"/proc/self/clear_refs unusable: {exc}"
    if after > high - 32 * MIB:
        return False, "writing 5 to /proc/self/clear_refs did not reset VmHWM"
    return True, ""


class PeakMeter:
    """Measures the peak memory of a step above what was live when it started.

    Use as ``meter.start(precise); step(); peak = meter.stop()``. The bookkeeping of
    :meth:`start` (garbage collection, heap trim) belongs outside any timed region.
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.base = 0
        self.precise = False
        if self.device.type == "cpu":
            ok, why = cpu_peak_supported()
            if not ok:
                raise RuntimeError(why)

    def start(self, precise: bool = False) -> None:
        """Record the baseline and reset the high-water mark.

        ``precise``: on CPU, use the precise allocator setting until :meth:`stop`.
        """
        if self.device.type == "cuda":
            release_free_heap()
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return
        self.precise = precise and set_allocator(precise=True)
        release_free_heap()
        self.base = rss_bytes()
        reset_hwm()

    def stop(self) -> int:
        """Peak bytes above the baseline since :meth:`start`."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.base
        peak = max(0, hwm_bytes() - self.base)
        if self.precise:
            set_allocator(precise=False)
            self.precise = False
        return peak


def available_bytes(device: torch.device) -> int:
    """Memory a benchmark may still use: ``MemAvailable`` or the free device memory."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("MemAvailable not found in /proc/meminfo")
