"""The training CronJob's script (k8s/base/federation/submit_run.py): the run config it submits is valid
for the ServerApp, and the Job's exit status follows the run's real event log."""

from __future__ import annotations

import importlib.util
import tomllib
from pathlib import Path

from k8s_helpers import K8S, ROOT

from federation import events as ev


def load_script():
    spec = importlib.util.spec_from_file_location("submit_run", K8S / "base" / "federation" / "submit_run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_run_config_gets_this_runs_folder(tmp_path: Path) -> None:
    from federation.server_app import RunSettings

    script = load_script()
    text = script.run_config_for(K8S / "base" / "federation" / "run-config.toml", tmp_path / "runs" / "r1")
    config = tomllib.loads(text)
    assert config["run-dir"] == str(tmp_path / "runs" / "r1")
    defaults = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    RunSettings.from_run_config({**defaults, **config})


def test_connection_config_uses_tls(tmp_path: Path) -> None:
    script = load_script()
    script.write_connection(tmp_path, "wbc-superlink:9092", "/etc/flwr/tls/ca.crt")
    config = tomllib.loads((tmp_path / "config.toml").read_text())
    connection = config["superlink"][config["superlink"]["default"]]
    assert connection == {"address": "wbc-superlink:9092", "root-certificates": "/etc/flwr/tls/ca.crt"}


def test_exit_status_follows_the_event_log(tmp_path: Path) -> None:
    script = load_script()
    rejected, accepted = tmp_path / "rejected", tmp_path / "accepted"
    log = ev.EventLog(rejected)
    for n in (1, 2):
        log.emit(ev.GATE_DECISION, round=n, accepted=False, reason="pooled balanced accuracy fell")
    log = ev.EventLog(accepted)
    log.emit(ev.GATE_DECISION, round=1, accepted=False, reason="worse")
    log.emit(ev.GATE_DECISION, round=2, accepted=True, reason="better")
    log.emit(ev.VERSION_REGISTERED, round=2, model_name="wbc-classifier", version=7, path="/models/wbc-classifier/7")

    nothing = script.outcome(rejected)
    assert nothing["rejected"] == 2 and nothing["registered"] == []
    assert script.exit_code("finished:completed", nothing) == script.EXIT_NOTHING_REGISTERED
    some = script.outcome(accepted)
    assert some["registered"] == [{"round": 2, "version": 7}]
    assert script.exit_code("finished:completed", some) == script.EXIT_REGISTERED
    assert script.exit_code("finished:failed", some) == script.EXIT_FAILED
    assert script.exit_code("timeout", some) == script.EXIT_FAILED
    assert script.outcome(tmp_path / "never-started")["decisions"] == []
