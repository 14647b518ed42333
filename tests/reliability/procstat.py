"""Resident memory of a process from /proc (Linux): now (VmRSS) and the peak so far (VmHWM), in MiB."""

from __future__ import annotations

from pathlib import Path


def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(f"{key} not in /proc/{pid}/status")


def rss_mib(pid: int) -> float:
    return _status_kib(pid, "VmRSS") / 1024


def peak_rss_mib(pid: int) -> float:
    return _status_kib(pid, "VmHWM") / 1024


def load_average() -> str:
    """The 1-minute load average and the core count, to print beside any figure measured here."""
    import os

    one, five, _ = os.getloadavg()
    return f"load {one:.1f}/{five:.1f} (1/5 min) on {os.cpu_count()} cores"
