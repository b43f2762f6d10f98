"""Process resource readings shared by stats and benchmarks."""

from __future__ import annotations

import resource
import sys


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far, in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS counter (``VmHWM``) for this process; False where unsupported
    (not Linux, or ``/proc/self/clear_refs`` not writable), in which case the peak stays process-wide."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def peak_rss_since_reset_bytes() -> int:
    """Peak RSS since the last :func:`reset_peak_rss` (``VmHWM``); the process-wide peak where unsupported."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return peak_rss_bytes()
