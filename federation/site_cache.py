"""A site's own disk cache of what its frozen trunk computes (node config `cache-dir`); nothing leaves the site.

With `train-top` "head", "stage" or "two-stages" the trunk is frozen and the same in every message of a
run (the server averages identical copies of it), so what it computes for a cell never changes between
rounds. A SuperNode runs every message in a fresh process, so without a disk cache each round located
every cell again and ran the trunk on every view of it. Here, once per site and run:

- prepared cells (the contract's `prepare`: cell crop, colour normalisation) and the locator's measures
  (`federation.prepared.PreparedImages`, keyed by each file's path, size and mtime);
- the trunk's outputs for a finite pool of views of every training cell: the clean cell and `views`
  augmented ones, seeded per cell and view (`federation.features.trunk_features`, exactly the
  benchmark's recipe); each epoch draws one of them per cell (`view_batches`), so the clean cell comes
  one step in 1 + views;
- the trunk's outputs for the contract's test-time views of every validation cell (`models.test_views`):
  an evaluation is then the top alone, log-mean-softmax over the views as the exported graph computes it.

Every entry is keyed by a digest of the trunk's own weights, the contract's preprocessing, the augmentation
and the seed, so a change in any of them misses the cache instead of reusing stale features. The entries
such a change leaves behind are removed, least recently used first, once the folder is over its budget
(node config `cache-max-mb`, `federation.disk_cache`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from federation.augment import AugmentConfig
from federation.disk_cache import Pruned, mark_used, prune, save_array
from federation.features import render_view, trunk_features
from federation.top_training import top_logits
from federation.prepared import PreparedImages
from federation.sites import Sample
from federation.trunk import Split
from models.contract import ModelContract
from models.test_views import VIEW_SETS, apply_view

CACHE_KEY = "cache-dir"  # node config entry: an absolute folder of this site's own
BUDGET_KEY = "cache-max-mb"  # node config entry: what the folder may hold after each message
DEFAULT_BUDGET_MB = 6144  # under the SuperNode's 8 GiB emptyDir (k8s/supernode), room for one round's writes


def trunk_digest(split: Split) -> str:
    """A digest of the frozen part's weights and buffers (everything outside the trained top)."""
    top = set(split.top_state_keys())
    h = hashlib.sha1()
    for name, value in split.model.state_dict().items():
        if name not in top:
            h.update(name.encode())
            h.update(np.ascontiguousarray(value.detach().cpu().numpy()).tobytes())
    return h.hexdigest()[:16]


def files_digest(samples: Sequence[Sample]) -> str:
    """Which files, as they are now: a replaced or edited image changes it."""
    h = hashlib.sha1()
    for s in samples:
        st = Path(s.path).stat()
        h.update(f"{s.path}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class SiteCache:
    root: Path
    budget_bytes: int = DEFAULT_BUDGET_MB << 20

    @classmethod
    def of(cls, node_config: Mapping[str, Any]) -> SiteCache | None:
        raw = str(node_config.get(CACHE_KEY, "") or "")
        if not raw:
            return None
        root = Path(raw)
        if not root.is_absolute():
            raise ValueError(f"node config {CACHE_KEY}={raw!r} must be an absolute path")
        budget = node_config.get(BUDGET_KEY, DEFAULT_BUDGET_MB)
        try:
            megabytes = float(budget)
        except (TypeError, ValueError):
            megabytes = -1.0
        if not (megabytes > 0 and math.isfinite(megabytes)):
            raise ValueError(f"node config {BUDGET_KEY}={budget!r} must be a positive number of megabytes")
        return cls(root, int(megabytes * (1 << 20)))

    def prune(self, keep_since: float) -> Pruned:
        """Drop the entries unused for longest until the folder fits its budget (`federation.disk_cache`);
        what was used since `keep_since` (this message's start) stays."""
        return prune(self.root, self.budget_bytes, keep_since)

    def prepared(self, samples: Sequence[Sample], contract: ModelContract) -> PreparedImages:
        return PreparedImages.build(samples, contract, self.root / "prepared", log=lambda _s: None,
                                    diameters=True, with_stat=True)

    def view_pool(
        self,
        split: Split,
        samples: Sequence[Sample],
        prepared: PreparedImages,
        contract: ModelContract,
        augment: AugmentConfig,
        views: int,
        seed: int,
    ) -> np.ndarray:
        """(N, 1 + views, *trunk output), float16: the clean cell, then `views` seeded augmented views."""
        variant = f"site-trunk-{trunk_digest(split)}-files-{files_digest(samples)}"
        return trunk_features(split, samples, prepared, contract, views=views, augment=augment, seed=seed,
                              cache_dir=self.root / "features", log=lambda _s: None, variant=variant)

    def test_view_features(
        self, split: Split, samples: Sequence[Sample], prepared: PreparedImages, contract: ModelContract
    ) -> np.ndarray:
        """(N, V, *trunk output), float32: the trunk on each of the contract's test-time views of the cell."""
        views = VIEW_SETS[contract.test_views]
        key = hashlib.sha1(
            f"{trunk_digest(split)}|{files_digest(samples)}|{contract.test_views}|{_input_key(contract)}".encode()
        ).hexdigest()[:20]
        path = self.root / "features" / f"test-views-{split.top_name}-{key}.npy"
        if path.is_file():
            mark_used(path)
            return np.load(path)
        parts = []
        for start in range(0, len(samples), 32):
            x = torch.from_numpy(np.stack([render_view(prepared, i, 0, contract, None, 0)
                                          for i in range(start, min(start + 32, len(samples)))]))
            parts.append(np.stack([split.trunk_features(apply_view(x, v)).numpy() for v in views], axis=1))
        out = np.concatenate(parts).astype(np.float32)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_array(path, out)
        return out


def _input_key(contract: ModelContract) -> str:
    """The contract fields between a prepared cell and the network input."""
    return str((contract.architecture, contract.input_size, contract.color, contract.mean, contract.std,
                contract.interpolation, contract.resize, contract.detail, contract.cell_crop, contract.color_norm))


@torch.no_grad()
def view_averaged_logits(
    split: Split, features: np.ndarray, contract: ModelContract, batch_size: int = 256
) -> np.ndarray:
    """What `federation.task.predict_logits` answers for the full model, from cached trunk outputs
    (N, V, ...): log(mean over views of softmax(top(view))) as `models.test_views.AveragedViews` computes
    it, or the top's logits themselves when the contract has no test-time views."""
    split.top.eval()
    if contract.test_views == "none":
        return top_logits(split, features[:, 0], batch_size)
    out = []
    for start in range(0, len(features), batch_size):
        chunk = torch.from_numpy(np.asarray(features[start : start + batch_size], dtype=np.float32))
        n, v = chunk.shape[:2]
        probs = torch.softmax(split.top(chunk.reshape(n * v, *chunk.shape[2:])).float(), dim=-1)
        out.append(torch.log(probs.reshape(n, v, -1).mean(dim=1).clamp_min(1e-12)).numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

