"""Peak resident memory of this process over a stretch of code (Linux: VmHWM, reset through
``/proc/self/clear_refs``), so cases timed one after another in one process each get their own peak."""
from __future__ import annotations

import resource
from pathlib import Path


def reset_peak_rss() -> bool:
    """Start a new peak-RSS window; False where the kernel does not allow it (then the peak is the process's)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak RSS since the last :func:`reset_peak_rss` (else since the process started), in bytes."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
