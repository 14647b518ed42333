"""Least-recently-used housekeeping for the on-disk caches (a site's `cache-dir`, `federation.site_cache`).

A cache file's modification time is its last use: the writers set it, and every read marks it again
(`mark_used`). `prune` then removes the files no one has used for longest until the folder fits its budget,
never one used since `keep_since` (what the current round needs stays, even over budget). Every cached
entry is one self-contained file (a prepared cell, a cell's clean trunk output, a site's view pool), so a
removed one is computed again on its next use, never read half-gone.

Why: the entries are keyed by the files, the trunk and the recipe, so a hospital that adds or replaces
images, or a run with another backbone, leaves the old entries behind; a SuperNode's cache is an `emptyDir`
with a size limit (k8s/supernode), and a pod over it is evicted.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TMP_MARK = ".tmp"  # a file being written (`*.<pid>.tmp.npy`, `*.<pid>.tmp`): its writer renames it when done


def _tmp_for(path: Path, suffix: str) -> Path:
    # One writer's own name: two processes filling the same cache (two benchmarks, a benchmark beside a
    # SuperNode) may compute the same entry at once, and a shared name let one rename the other's file away.
    return path.with_name(f"{path.name}.{os.getpid()}{TMP_MARK}{suffix}")


def save_array(path: Path, array: np.ndarray) -> None:
    """Write a cache entry whole or not at all: into the writer's own temporary file, then renamed."""
    tmp = _tmp_for(path, ".npy")  # np.save appends .npy to a name without it
    np.save(tmp, array)
    tmp.replace(path)


def save_text(path: Path, text: str) -> None:
    """`save_array` for a text entry (the prepared cells' measures)."""
    tmp = _tmp_for(path, "")
    tmp.write_text(text)
    tmp.replace(path)


def mark_used(path: Path) -> None:
    """Set `path`'s modification time to now: it was just read. A read-only cache stays as it is."""
    try:
        os.utime(path)
    except OSError:
        pass


@dataclass(frozen=True)
class Pruned:
    removed_files: int
    removed_bytes: int
    kept_bytes: int
    over_budget: bool  # what was used since keep_since alone exceeds the budget


def prune(root: Path, budget_bytes: int, keep_since: float) -> Pruned:
    """Remove the least recently used files under `root` until it holds at most `budget_bytes`, never a file
    used at or after `keep_since` (seconds since the epoch) nor one being written."""
    entries = []
    for folder, _dirs, names in os.walk(root):
        for name in names:
            if TMP_MARK in name:
                continue
            path = Path(folder) / name
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            entries.append((st.st_mtime, st.st_size, path))
    total = sum(size for _t, size, _p in entries)
    removed = removed_bytes = 0
    for mtime, size, path in sorted(entries, key=lambda e: e[0]):
        if total <= budget_bytes or mtime >= keep_since:
            break
        path.unlink(missing_ok=True)
        total -= size
        removed, removed_bytes = removed + 1, removed_bytes + size
    if removed:
        _remove_empty_folders(root)
    return Pruned(removed, removed_bytes, total, total > budget_bytes)


def _remove_empty_folders(root: Path) -> None:
    for folder, _dirs, _names in os.walk(root, topdown=False):  # children before their parents
        path = Path(folder)
        if path != root and not any(path.iterdir()):
            try:
                path.rmdir()
            except OSError:  # filled again meanwhile
                pass
