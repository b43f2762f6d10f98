"""Process resource readings shared by stats and benchmarks."""

from __future__ import annotations

import os
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


def current_rss_bytes() -> int:
    """Resident set size of this process now, in bytes (Linux ``/proc/self/statm``); the peak so far where
    that is not readable."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss_bytes()
