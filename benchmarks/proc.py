"""Process figures the benchmarks read from /proc: peak RSS of this process, CPU seconds of another."""

from __future__ import annotations

import os
import resource
from pathlib import Path


def peak_rss_bytes() -> int:
    """This process's peak RSS: VmHWM (ru_maxrss would carry the parent's peak over fork/exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
