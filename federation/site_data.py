"""What one site trains and validates on: its base data root plus any reviewed-export roots.

Node config of a SuperNode (TOML values, set by the site's administrator):

    site="tehran-lisc" data-root="/data/wbc-site" extra-data-roots="/data/reviewed/2026-11,/data/reviewed/2026-12"

`extra-data-roots` is optional: a comma-separated list of absolute paths, each a data root in the same
layout as the base one (`manifest.csv` + image files), e.g. what `wbc review export` writes from the cells
clinicians reviewed in the service. Every round re-reads the manifests, so a scheduled run (`wbc schedule`)
picks up newly exported cells without restarting the SuperNode. Only rows of this site are used, each in
the split its manifest gives it; a root that is missing or unreadable fails the step with a clear error
(a silently ignored export would make a run look like it learned from data it never saw). Each reply names
its sources (root, rows used, manifest digest), so the registered version's lineage says which data made it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from federation.sites import MANIFEST, DataError, DataRoot, Sample


class SiteConfigError(ValueError):
    """The SuperNode was started without a usable site / data root."""


@dataclass(frozen=True)
class SiteData:
    site: str
    base_root: Path
    extra_roots: tuple[Path, ...] = ()

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> SiteData:
        site = str(node_config.get("site", "")).strip()
        root = str(node_config.get("data-root", "")).strip()
        if not site or not root:
            raise SiteConfigError(
                "this SuperNode has no site: start it with "
                "--node-config 'site=\"NAME\" data-root=\"/abs/path\"'"
            )
        extras = tuple(p.strip() for p in str(node_config.get("extra-data-roots", "") or "").split(",") if p.strip())
        for path in (root, *extras):
            if not Path(path).is_absolute():
                raise SiteConfigError(f"data roots must be absolute paths, got {path!r}")
        return cls(site, Path(root), tuple(Path(p) for p in extras))

    @property
    def roots(self) -> tuple[Path, ...]:
        return (self.base_root, *self.extra_roots)

    def select(self, split: str, classes: Sequence[str]) -> tuple[list[Sample], list[dict[str, Any]]]:
        """This site's samples of `split` and `classes` from every root, and where they came from."""
        samples: list[Sample] = []
        sources: list[dict[str, Any]] = []
        for root in self.roots:
            if not (root / MANIFEST).is_file():
                raise DataError(f"site {self.site}: data root {root} has no {MANIFEST}")
            data = DataRoot(root)
            chosen = data.select([self.site], [split], classes) if self.site in data.sites else []
            samples.extend(chosen)
            sources.append({"root": str(root), "rows": len(chosen), "manifest_sha256": _digest(root / MANIFEST)})
        return samples, sources


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
