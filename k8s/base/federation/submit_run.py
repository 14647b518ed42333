"""Start one federated training run on the SuperLink and wait for its outcome (the training CronJob).

The ServerApp (in the SuperLink pod) trains, gates each round and registers every accepted round into
the registry volume; this script only submits the run, follows it and turns its outcome into the Job's
exit status, which is what the alert "rounds rejected repeatedly" watches (kube-state-metrics):

    0  the run completed and at least one round was accepted and registered
    2  the run completed but no round was registered (the gate rejected every round)
    1  anything else: not submitted, failed, stopped, timed out

Settings (environment; the CronJob sets them):
    WBC_SUPERLINK          host:port of the SuperLink's Control API        (wbc-superlink:9092)
    WBC_SUPERLINK_CA       CA certificate that signed the SuperLink's cert  (/etc/flwr/tls/ca.crt)
    WBC_APP_DIR            the Flower app (the project root in the image)   (/app)
    WBC_RUN_CONFIG         run-config overrides (TOML, pyproject's keys)     (/etc/wbc/training/run-config.toml)
    WBC_RUNS_DIR           where run folders go, as the SuperLink pod sees it (/var/lib/wbc/runs)
    WBC_RUN_TIMEOUT        seconds to wait for the run to finish             (43200)
    FLWR_HOME              a writable folder for the flwr CLI's config
Stdlib only, so that it runs in the training image as it is.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import tomllib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

CONNECTION = "wbc"
EXIT_REGISTERED, EXIT_FAILED, EXIT_NOTHING_REGISTERED = 0, 1, 2


def log(message: str, **fields: Any) -> None:
    """One JSON line per event on stdout (the Job's log)."""
    print(json.dumps({"ts": datetime.now(UTC).isoformat(timespec="seconds"), "msg": message, **fields}),
          flush=True)


def write_connection(flwr_home: Path, address: str, ca_file: str) -> None:
    """The flwr CLI reads its SuperLink connections from $FLWR_HOME/config.toml."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]", f'address = "{address}"']
    lines.append(f'root-certificates = "{ca_file}"' if ca_file else "insecure = true")
    (flwr_home / "config.toml").write_text("\n".join(lines) + "\n")


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def run_config_for(base_file: Path, run_dir: Path) -> str:
    """The CronJob's run config plus this run's own folder (the ServerApp needs an absolute run-dir)."""
    config = tomllib.loads(base_file.read_text())
    config["run-dir"] = str(run_dir)
    return "".join(f"{key} = {toml_value(value)}\n" for key, value in config.items())


def flwr(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["flwr", *args], capture_output=True, text=True, timeout=timeout, check=False)


def last_json_object(text: str) -> dict[str, Any]:
    """`flwr ... --format json` prints one JSON object (possibly after other lines)."""
    start = text.find("{")
    while start != -1:
        try:
            return json.loads(text[start:])
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
    return {}


def submit(app_dir: str, config_file: Path) -> int:
    out = flwr("run", app_dir, CONNECTION, "--run-config", str(config_file), "--format", "json")
    data = last_json_object(out.stdout)
    run_id = data.get("run-id")
    if run_id is None:
        match = re.search(r"Successfully started run (\d+)", out.stdout + out.stderr)
        run_id = match.group(1) if match else None
    if out.returncode != 0 or run_id is None:
        raise RuntimeError(f"flwr run failed (exit {out.returncode}): {(out.stdout + out.stderr).strip()[-2000:]}")
    return int(run_id)


def wait_finished(run_id: int, timeout: float, poll: float = 15.0) -> str:
    """Flower's final status, e.g. 'finished:completed'; 'timeout' when it did not finish in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        data = last_json_object(flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json").stdout)
        runs = data.get("runs") or []
        if runs and str(runs[0].get("status", "")).startswith("finished"):
            return str(runs[0]["status"])
        time.sleep(poll)
    return "timeout"


def outcome(run_dir: Path) -> dict[str, Any]:
    """Gate decisions and registrations, read from the ServerApp's event log in the run folder."""
    decisions, registered = [], []
    events = run_dir / "events.jsonl"
    if events.is_file():
        for line in events.read_text().splitlines():
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash; the others still count
            if event.get("kind") == "gate-decision":
                decisions.append({"round": event.get("round"), "accepted": bool(event.get("accepted")),
                                  "reason": event.get("reason")})
            elif event.get("kind") == "version-registered":
                registered.append({"round": event.get("round"), "version": event.get("version")})
    return {"decisions": decisions, "registered": registered,
            "rejected": sum(1 for d in decisions if not d["accepted"])}


def exit_code(status: str, result: dict[str, Any]) -> int:
    if status != "finished:completed":
        return EXIT_FAILED
    return EXIT_REGISTERED if result["registered"] else EXIT_NOTHING_REGISTERED


def main() -> int:
    env = os.environ
    runs_dir = Path(env.get("WBC_RUNS_DIR", "/var/lib/wbc/runs"))
    name = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    run_dir = runs_dir / name
    write_connection(Path(env["FLWR_HOME"]), env.get("WBC_SUPERLINK", "wbc-superlink:9092"),
                     env.get("WBC_SUPERLINK_CA", "/etc/flwr/tls/ca.crt"))
    config_file = Path(env["FLWR_HOME"]) / f"run-config-{name}.toml"
    config_file.write_text(run_config_for(Path(env.get("WBC_RUN_CONFIG", "/etc/wbc/training/run-config.toml")),
                                          run_dir))
    try:
        run_id = submit(env.get("WBC_APP_DIR", "/app"), config_file)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        log("run not submitted", error=str(exc))
        return EXIT_FAILED
    log("run submitted", run_id=run_id, run_dir=str(run_dir))
    status = wait_finished(run_id, float(env.get("WBC_RUN_TIMEOUT", "43200")))
    result = outcome(run_dir)
    code = exit_code(status, result)
    log("run finished", run_id=run_id, status=status, exit_code=code, **result)
    return code


if __name__ == "__main__":
    sys.exit(main())
