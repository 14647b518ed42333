"""Differential privacy in a real deployment: Flower's clipping mod at the sites, noise at the server,
the privacy parameters and the spent epsilon in the registered version's lineage (slow: a real run)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from test_deploy import CLASSES, TINY_RUN

from federation.deploy import run_federation
from federation.sites import DEFAULT_TRAINING_SITES, DataRoot
from models.registry import Registry

pytestmark = pytest.mark.slow


def test_a_dp_run_clips_at_the_sites_and_records_its_privacy_in_the_lineage(
    data_root: DataRoot, tiny_root_factory, tmp_path: Path
) -> None:
    sites = list(DEFAULT_TRAINING_SITES)
    root = tiny_root_factory(data_root, tmp_path / "data", sites, CLASSES, train_per_class=4, val_per_class=2)
    config = {**TINY_RUN, "num-server-rounds": 1, "strategy": "fedavg", "gate-tolerance": 1.0,
              "dp-noise": 0.001, "dp-clip": 5.0}
    result = run_federation(root, sites, tmp_path / "registry", config, tmp_path / "work", show_progress=False)
    assert result.ok, f"{result.error} (logs: {result.logs})"

    for site in sites:  # Flower's fixedclipping_mod ran in every site's ClientApp
        log = result.logs[f"supernode-{site}"].read_text(errors="replace")
        assert "fixedclipping_mod: parameters are clipped by value: 5.0000" in log, site
    if not result.registered:
        pytest.skip(f"round 1 was not accepted ({result.decisions}); the lineage check needs a version")
    info = Registry(tmp_path / "registry", "wbc-classifier").get(result.registered[0]["version"])
    dp = info.metadata["privacy"]["dp"]
    assert dp["noise_multiplier"] == 0.001 and dp["clipping_norm"] == 5.0 and dp["sites"] == 3
    assert dp["releases"] == 1 and dp["delta"] == 1e-5 and dp["uniform_weights"] is True
    assert dp["epsilon"] is None or (dp["epsilon"] > 0 and math.isfinite(dp["epsilon"]))
    assert info.metadata["privacy"]["secure_aggregation"] is None
    assert info.metadata["flower"]["run_config"]["dp-noise"] == 0.001
