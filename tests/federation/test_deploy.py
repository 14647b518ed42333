"""The real deployment: a SuperLink and three SuperNodes as separate processes on loopback.

The integration test is a mechanics test on a tiny real subset (two visually distinct classes, 4 train +
2 val images per class and site, 64 px, 2 rounds): it checks that the run completes, that every round
is recorded per site and pooled, and that an accepted round lands in the registry as a verified ONNX
version. Its accuracy means nothing. Flower's fixed cost dominates its wall time (a fresh ClientApp
process importing torch for every train and evaluate message, SuperNodes polling every 3 s).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from cli.federate_cmd import rounds_table
from federation import events as ev
from federation.deploy import build_run_config, run_federation
from federation.server_app import RunSettings
from federation.sites import DEFAULT_TRAINING_SITES, DataRoot
from models.contract import SizePrior
from models.export import read_contract
from models.registry import Registry

CLASSES = ("eosinophil", "lymphocyte")
TINY_RUN = {
    "num-server-rounds": 2,
    "strategy": "fedprox",
    "proximal-mu": 0.01,
    "local-epochs": 2,
    "lr": 0.003,
    "batch-size": 16,
    "input-size": 64,
    "classes": ",".join(CLASSES),
    "round-timeout": 240.0,
    "gate-tolerance": 0.05,
}


def flower_processes_under(folder: Path) -> list[str]:
    """Live processes whose FLWR_HOME lies under `folder` (every Flower process of a deployment has one)."""
    found = []
    marker = f"FLWR_HOME={folder}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
            cmdline = (
                Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            )
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and any(v.startswith(marker) for v in environ.split(b"\0")):
            found.append(f"{entry}: {cmdline[:120]}")
    return found


# ---- run config ----------------------------------------------------------------------------------------
def test_run_config_defaults_come_from_pyproject_and_bad_values_fail_early(tmp_path: Path) -> None:
    paths = {
        "registry": str(tmp_path / "r"),
        "run-dir": str(tmp_path / "run"),
        "parity-images": str(tmp_path),
    }
    config = build_run_config({"strategy": "fedadam", "server-lr": 0.001}, **paths)
    settings = RunSettings.from_run_config(config)
    assert settings.strategy == "fedadam" and settings.server_lr == 0.001 and settings.num_server_rounds == 5
    assert settings.class_names == ("basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil")
    with pytest.raises(ValueError, match="unknown run-config key"):
        build_run_config({"rounds": 3}, **paths)
    with pytest.raises(ValueError, match="strategy 'fedsgd'"):
        build_run_config({"strategy": "fedsgd"}, **paths)
    with pytest.raises(ValueError, match="run-dir must be an absolute path"):
        build_run_config({}, **{**paths, "run-dir": "relative/run"})
    with pytest.raises(ValueError, match="local-epochs must be >= 1"):
        build_run_config({"local-epochs": 0}, **paths)
    with pytest.raises(ValueError, match="average-rounds must be >= 1"):
        build_run_config({"average-rounds": 0}, **paths)
    assert settings.average_rounds == 5  # pyproject's default, as RunSettings' own


def test_unknown_site_is_refused_before_anything_starts(data_root: DataRoot, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no site"):
        run_federation(
            data_root.root, ["st-elsewhere"], tmp_path / "reg", {}, tmp_path / "work", show_progress=False
        )
    assert not (tmp_path / "work" / "flwr").exists()


# ---- the real thing ------------------------------------------------------------------------------------
def test_three_site_federation_registers_verified_versions(
    data_root: DataRoot, tiny_root_factory, tmp_path: Path
) -> None:
    sites = list(DEFAULT_TRAINING_SITES)
    root = tiny_root_factory(data_root, tmp_path / "data", sites, CLASSES, train_per_class=4, val_per_class=2)
    work = tmp_path / "work"

    result = run_federation(root, sites, tmp_path / "registry", TINY_RUN, work, show_progress=False)
    print(f"\nfederation wall time: {result.wall_seconds:.1f} s; {json.dumps(result.summary())}")
    assert result.ok, f"{result.error} (logs: {result.logs})"
    assert flower_processes_under(work) == []

    # Each SuperNode saw only its own site, and kept its frozen trunk's outputs in its own cache
    # (view-pool = 8 by default: the pool of its training cells' views, and its val cells' test views).
    for site in sites:
        assert DataRoot(work / "sites" / site).sites == (site,)
        cached = sorted(p.name for p in (work / "site-cache" / site / "features").glob("*.npy"))
        assert any("-v8-" in n for n in cached) and any(n.startswith("test-views-") for n in cached), cached

    # Every round recorded: raw per-site train and val results, pooled from the summed confusions, a decision.
    assert [r["round"] for r in result.rounds] == [1, 2]
    for record in result.rounds:
        assert sorted(record["sites"]) == sorted(sites) and record["failures"] == []
        for site, entry in record["sites"].items():
            assert entry["train"]["num_examples"] == 8
            assert entry["train"]["class_counts"] == {"eosinophil": 4, "lymphocyte": 4}
            assert entry["evaluate"]["n"] == 4 and len(entry["evaluate"]["confusion"]) == 2
        summed = sum(np.asarray(e["evaluate"]["confusion"]) for e in record["sites"].values())
        assert record["pooled"]["confusion"] == summed.tolist() and record["pooled"]["n"] == 12
        assert isinstance(record["gate"]["accepted"], bool) and record["gate"]["reason"]
    assert result.rounds[1]["start_weights"]["from_round"] == (
        1 if result.rounds[0]["gate"]["accepted"] else 0
    )
    # Averaged rounds (average-rounds = 5 by default): round 2 is judged as the mean of its aggregate and
    # round 1's when round 1 was accepted.
    assert result.rounds[0]["averaged_rounds"] == [1]
    assert result.rounds[1]["averaged_rounds"] == ([1, 2] if result.rounds[0]["gate"]["accepted"] else [2])

    # At least one accepted round became a registry version, with its lineage and a passed parity check.
    assert result.registered, f"no version registered: {result.decisions}"
    registry = Registry(tmp_path / "registry", "wbc-classifier")
    versions = registry.versions()
    assert [v.version for v in versions] == [r["version"] for r in result.registered]
    for info in versions:
        info.verify()
        meta = info.metadata
        record = result.rounds[meta["round"] - 1]
        assert record["gate"]["accepted"] and record["publish"]["version"] == info.version
        assert meta["run_id"] == result.run_id and meta["strategy"] == {
            "name": "fedprox",
            "proximal_mu": 0.01,
        }
        assert meta["sites"]["bccd"]["train_examples"] == 8
        assert set(meta["metrics"]["per_site_val"]) == set(sites)
        assert meta["metrics"]["pooled_val"]["confusion"] == record["pooled"]["confusion"]
        assert meta["gate"]["accepted"] is True
        assert meta["averaged_rounds"] == record["averaged_rounds"] and meta["training"]["average_rounds"] == 5
        assert meta["weight_source"]["kind"] in ("pypi-wheel", "timm-hub")
        assert (
            meta["parity"]["ok"] and meta["parity"]["max_abs_diff"] <= 1e-4 and meta["parity"]["n_images"] > 0
        )
        contract = read_contract(info.onnx_path)
        assert (
            contract.class_names == CLASSES and contract.input_size == 64 and contract.version == info.version
        )
        # The relative-size opinion, pooled from each site's per-class size sums (models.size_prior).
        assert all(meta["sites"][s]["size"]["size-count"] == [4.0, 4.0] for s in sites)
        assert contract.size_prior is not None and contract.size_prior.cells == 24
        assert contract.size_prior.anchor is None  # no neutrophil class here: each site's all-cells median
        assert contract.size_prior.weight == 2.0 and SizePrior.model_validate(meta["size_prior"]) == contract.size_prior
        # ... and the granule opinion from their per-class granule sums (models.granule_prior); a cell with
        # too little cytoplasm to measure is left out of them.
        granule_counts = [meta["sites"][s]["granules"]["granule-count"] for s in sites]
        assert all(len(c) == 2 and sum(c) > 0 for c in granule_counts)
        assert contract.granule_prior is not None and contract.granule_prior.cells == sum(map(sum, granule_counts))
        assert contract.granule_prior.weight == 1.0
        assert SizePrior.model_validate(meta["granule_prior"]) == contract.granule_prior

    # The first registered version became production (there was none); the rounds table says so.
    first = result.rounds[result.registered[0]["round"] - 1]
    assert first["lifecycle"]["promoted"] and first["lifecycle"]["production"] == result.registered[0]["version"]
    console = Console(width=200, record=True)
    console.print(rounds_table(result))
    assert f"v{result.registered[0]['version']} → production" in console.export_text()

    # `wbc registry list` says which rounds each version is the mean of.
    listed = subprocess.run(
        [sys.executable, "-m", "cli.main", "registry", "list", "--json", "--registry", str(tmp_path / "registry")],
        cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, check=True,
    )
    rows = json.loads(listed.stdout)["versions"]
    assert [r["lineage"]["averaged_rounds"] for r in rows] == [v.metadata["averaged_rounds"] for v in versions]

    # The event log tells the same story.
    kinds = [e["kind"] for e in ev.read_events(result.run_dir / ev.EVENTS_FILE)]
    assert kinds[0] == ev.RUN_STARTED and kinds[-1] == ev.RUN_FINISHED
    assert kinds.count(ev.ROUND_STARTED) == 2 and kinds.count(ev.GATE_DECISION) == 2
    assert kinds.count(ev.SITE_REPLIED) == 2 * 2 * len(sites)
    assert kinds.count(ev.VERSION_REGISTERED) == len(versions)

    # The registered model is served and classifies a real external-site image over real HTTP.
    served = serve_and_classify(tmp_path / "registry", data_root)
    # The service follows `production` (set by the promotion policy), else the latest version.
    assert served["model"] == "wbc-classifier" and served["version"] == registry.resolve().version
    (cell,) = served["results"]
    assert cell["label"] in CLASSES and abs(sum(cell["probabilities"].values()) - 1) < 1e-4


def serve_and_classify(registry: Path, data_root: DataRoot) -> dict:
    """`wbc serve` in its own process on a free port; one Barcelona crop through POST /v1/classify."""
    import httpx

    from federation.deploy import free_port

    port = free_port()
    image = data_root.select(["barcelona-pbc"], ["test"], ["lymphocyte"])[0].path
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "serve", "--registry", str(registry), "--port", str(port)],
        cwd=Path(__file__).resolve().parents[2],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None, "wbc serve exited"
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "service not ready within 60 s"
            time.sleep(0.3)
        response = httpx.post(
            f"{url}/v1/classify", files=[("files", (image.name, image.read_bytes(), "image/jpeg"))], timeout=30
        )
        assert response.status_code == 200, response.text
        return response.json()
    finally:
        proc.terminate()
        proc.wait(timeout=15)


_INTERRUPTED_RUN = """
import signal, sys
# A terminal's Ctrl-C: Python's own handler, even when this test runs as a background job whose shell set
# SIGINT to "ignore" (the disposition children inherit, and then Python never raises KeyboardInterrupt).
signal.signal(signal.SIGINT, signal.default_int_handler)
from federation.deploy import run_federation
result = run_federation(
    sys.argv[1], sys.argv[2].split(","), sys.argv[3], {run_config!r}, sys.argv[4], show_progress=False, insecure=False
)
print("RESULT", result.status, result.error, flush=True)
"""


def test_ctrl_c_during_a_round_stops_every_flower_process_tls_on(
    data_root: DataRoot, tiny_root_factory, tmp_path: Path
) -> None:
    sites = list(DEFAULT_TRAINING_SITES)
    root = tiny_root_factory(data_root, tmp_path / "data", sites, CLASSES, train_per_class=2, val_per_class=1)
    work = tmp_path / "work"
    # Many short rounds: Ctrl-C always lands inside the run (a 1-round tiny run can finish before it).
    long_run = {**TINY_RUN, "num-server-rounds": 50}
    script = _INTERRUPTED_RUN.format(run_config=long_run)
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(root), ",".join(sites), str(tmp_path / "registry"), str(work)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.time() + 120
        started = False
        while time.time() < deadline and proc.poll() is None and not started:
            time.sleep(0.5)
            for events in (work / "runs").glob(f"*/{ev.EVENTS_FILE}"):
                started = any(e["kind"] == ev.ROUND_STARTED for e in ev.read_events(events))
        assert started, (
            f"round 1 never started: {proc.communicate(timeout=30)[0] if proc.poll() is not None else ''}"
        )
        assert flower_processes_under(work), "the deployment should be running now"
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "RESULT interrupted" in output, output[-2000:]
    assert flower_processes_under(work) == []
    assert (work / "certs" / "ca.crt").is_file()  # the deployment ran with TLS (insecure=False)


def test_one_run_per_workdir_at_a_time(data_root: DataRoot, tmp_path: Path) -> None:
    from federation.deploy import FederationError, _exclusive

    with (
        _exclusive(tmp_path / "work"),
        pytest.raises(FederationError, match="in use by another federation run"),
    ):
        run_federation(data_root.root, ["bccd"], tmp_path / "reg", {}, tmp_path / "work", show_progress=False)
