"""A real federation over TLS with SuperNode authentication, and a SuperNode with an unregistered key refused.

One deployment on loopback: a SuperLink with TLS (throwaway CA, certificate for 127.0.0.1) and
`--enable-supernode-auth`, two SuperNodes whose public keys were registered with `flwr supernode register`.
While the run goes on, a third SuperNode with a valid TLS setup but a key nobody registered tries to join:
it must exit with an error and never be listed as a node, and the run must complete without it.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
import tomllib
from pathlib import Path

from test_deploy import CLASSES, TINY_RUN, flower_processes_under

from federation import events as ev
from federation.credentials import make_site_key
from federation.deploy import _BIN, free_port, run_federation
from federation.sites import DataRoot
from models.registry import Registry

SITES = ["jiangxi-tecom", "bccd"]


def test_tls_and_node_auth_run_completes_and_an_unregistered_node_is_refused(
    data_root: DataRoot, tiny_root_factory, tmp_path: Path
) -> None:
    root = tiny_root_factory(data_root, tmp_path / "data", SITES, CLASSES, train_per_class=4, val_per_class=2)
    work = tmp_path / "work"
    outcome: dict = {}

    def federate() -> None:
        outcome["result"] = run_federation(
            root,
            SITES,
            tmp_path / "registry",
            {**TINY_RUN, "num-server-rounds": 1, "strategy": "fedavg"},
            work,
            insecure=False,
            auth=True,
            show_progress=False,
        )

    runner = threading.Thread(target=federate, daemon=True)
    runner.start()
    try:
        events = _wait_for_event(work, ev.NODES_READY, runner, timeout=180)
        assert events is not None, f"the secure deployment never got its nodes: {outcome}"

        # The intruder: right CA, right address, a well-formed key that was never registered.
        address = tomllib.loads((work / "flwr" / "cli" / "config.toml").read_text())["superlink"]["wbc-local"]["address"]
        rogue_key = make_site_key(tmp_path / "rogue", "rogue-site")["private"]
        log = tmp_path / "rogue.log"
        with log.open("wb") as fh:
            rogue = subprocess.run(
                [
                    str(_BIN / "flower-supernode"),
                    "--superlink",
                    address,
                    "--root-certificates",
                    str(work / "certs" / "ca.crt"),
                    "--auth-supernode-private-key",
                    str(rogue_key),
                    "--port",
                    str(free_port()),
                    "--max-retries",
                    "1",
                    "--node-config",
                    f'site="rogue-site" data-root="{root}"',
                ],
                env={"FLWR_TELEMETRY_ENABLED": "0", "FLWR_HOME": str(tmp_path / "rogue-home"), "PATH": str(_BIN)},
                stdout=fh,
                stderr=subprocess.STDOUT,
                timeout=120,
            )
        text = log.read_text(errors="replace")
        assert rogue.returncode != 0, text[-2000:]
        # Flower's exit code 305 (the process status is taken modulo 256): the SuperLink refused activation.
        assert "Exit Code: 305" in text and "Failed to activate SuperNode" in text, text[-2000:]
    finally:
        runner.join(timeout=600)

    result = outcome["result"]
    assert result.ok, f"{result.error} (logs: {result.logs})"
    assert sorted(result.rounds[0]["sites"]) == sorted(SITES)  # the intruder never took part
    assert flower_processes_under(work) == []
    # TLS and auth were on: HTTPS only, two keys registered, the intruder's key refused at activation.
    superlink_log = (result.run_dir / "logs" / "superlink.log").read_text(errors="replace")
    assert "running on https://127.0.0.1" in superlink_log and "running on http://" not in superlink_log
    assert superlink_log.count("[ControlServicer.RegisterNode] Created node_id") == len(SITES)
    assert "Attempted to register SuperNode with public key" in superlink_log  # the refusal, server side
    assert (work / "keys" / "jiangxi-tecom.key").stat().st_mode & 0o077 == 0  # private keys: owner only
    versions = Registry(tmp_path / "registry", "wbc-classifier").versions()
    assert [r["version"] for r in result.registered] == [v.version for v in versions]
    print("\nsecure run:", json.dumps(result.summary())[:800])


def _wait_for_event(work: Path, kind: str, runner: threading.Thread, timeout: float):
    deadline = time.time() + timeout
    while time.time() < deadline and runner.is_alive():
        for path in (work / "runs").glob(f"*/{ev.EVENTS_FILE}"):
            found = [e for e in ev.read_events(path) if e["kind"] == kind]
            if found:
                return found
        time.sleep(0.5)
    return None
