"""`wbc demo`: the main job end to end — federated training across the three hospital sites,
registration of accepted rounds, then the service answering real images from the external hospital."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import httpx
import typer

from cli.common import DataRootOption, RegistryOption, console, fail
from cli.data_cmd import measure_site_references
from cli.evaluate_cmd import evaluate_version, metrics_tables, open_classifier
from cli.federate_cmd import WorkdirOption, parse_overrides, rounds_table
from federation.sites import DEFAULT_TRAINING_SITES, EXTERNAL_SITE, SPLITS, DataError, DataRoot, resolve_data_root
from models.registry import Registry, default_registry_root


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex((host, port)) != 0


def _pick_port(host: str, wanted: int) -> int:
    if _port_free(host, wanted):
        return wanted
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float = 120.0) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the service exited with code {proc.returncode} before it was ready")
        try:
            response = httpx.get(f"{url}/v2/health/ready", timeout=2.0)
            if response.status_code == 200:
                return response.json()
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the service was not ready within {timeout:.0f} s")


def demo_images(data_root: Path, per_class: int = 1) -> list[Path]:
    """A few real cells from the external hospital: the first test images of each shared class."""
    from models.contract import SHARED_CLASSES

    data = DataRoot(data_root)
    picked: list[Path] = []
    for label in SHARED_CLASSES:
        picked += [s.path for s in data.select([EXTERNAL_SITE], ["test"], [label])[:per_class]]
    return picked


def demo(
    data_root: DataRootOption = None,
    registry: RegistryOption = default_registry_root(),
    workdir: WorkdirOption = Path("var/federation"),
    port: Annotated[int, typer.Option(help="Port of the service (another free one if taken).")] = 8000,
    host: Annotated[str, typer.Option(help="Bind address of the service.")] = "127.0.0.1",
    set_: Annotated[list[str], typer.Option("--set", help="Run-config key=value overrides.")] = [],
    exit_after_demo: Annotated[bool, typer.Option("--exit-after-demo", help="Stop the service after the "
                                                  "demo instead of serving in the foreground (for scripts).")] = False,
    external_eval: Annotated[bool, typer.Option(help="Measure the served version on all external-site "
                                                "images of the shared classes.")] = True,
) -> None:
    """Federate → register → serve → classify real Barcelona cells; then keep serving."""
    from federation.deploy import FederationError, run_federation
    from service.client import ClientError, classify_files, results_table

    t0 = time.time()
    timings: dict[str, float] = {}
    try:
        root = resolve_data_root(data_root)
    except DataError as exc:
        fail(str(exc))

    console.rule("[bold]1/3 federated training[/] (Flower SuperLink + one SuperNode per hospital)")
    try:
        result = run_federation(root, DEFAULT_TRAINING_SITES, registry, parse_overrides(set_), workdir)
    except (DataError, ValueError, FederationError) as exc:
        fail(str(exc))
    timings["federation_s"] = round(result.wall_seconds, 1)
    console.print(rounds_table(result))
    if not result.ok:
        fail(f"federation failed: {result.error}", code=1)
    if not result.registered:
        fail("no round was accepted, so nothing was registered; see the gate reasons above", code=1)
    # Serve what the service serves by default: the `production` alias, which the registry lifecycle moves
    # only to a version that beats the current one on the sites' validation (models/lifecycle.py).
    latest = result.registered[-1]["version"]
    production = Registry(registry, "wbc-classifier").aliases().get("production")
    version = int(production) if production is not None else latest
    if version != latest:
        why = next((r["lifecycle"].get("reason") for r in reversed(result.rounds)
                    if (r.get("lifecycle") or {}).get("candidate") == latest), None)
        console.print(f"production stays v{version}: this run's latest version v{latest} is the candidate"
                      + (f" ({why})" if why else "") + f"; `wbc registry promote {latest}` serves it instead")

    summary: dict = {"run_id": result.run_id, "decisions": result.decisions, "registered": result.registered,
                     "latest_version": latest, "served_version": version}
    console.rule(f"[bold]2/3 the production model[/] v{version}")
    # The size opinion sizes each cell against its site's reference cell (models.size_prior): measured once
    # on the external hospital's images, labels unused, as `wbc data site-scale` does for a lab; the
    # evaluation below and the service both use it.
    served = open_classifier(Registry(registry, "wbc-classifier").resolve(str(version)))
    refs = measure_site_references([s.path for s in DataRoot(root).select([EXTERNAL_SITE], list(SPLITS))],
                                   classifier=served)
    if refs.images:
        anchor = served.contract.size_prior.anchor if served.contract.size_prior else None
        console.print(f"{EXTERNAL_SITE}: {f'median {anchor}' if anchor else 'median white cell'} diameter "
                      f"{refs.diameter:.1f} px over {refs.images} images (WBC_SITE_CELL_DIAMETER)"
                      + ("" if refs.granules is None else
                         f", granule density {refs.granules:.3f} (WBC_SITE_GRANULE_REFERENCE)"))
    try:
        t = time.time()
        for label, site, splits in (("internal test (3 training sites)", None, ["test"]),
                                    (f"external hospital {EXTERNAL_SITE} (never trained on)", EXTERNAL_SITE,
                                     list(SPLITS))):
            if site is None:
                parts = [evaluate_version(str(version), registry, "wbc-classifier", root, s, splits)[1]
                         for s in DEFAULT_TRAINING_SITES]
                metrics = sum(parts[1:], parts[0])
            elif external_eval:
                metrics = evaluate_version(str(version), registry, "wbc-classifier", root, site, splits,
                                           site_references=refs)[1]
            else:
                continue
            table, confusion = metrics_tables(metrics, f"v{version}: {label}")
            console.print(table)
            console.print(confusion)
            summary[("external" if site else "internal")] = {
                "balanced_accuracy": metrics.balanced_accuracy, "macro_f1": metrics.macro_f1, "n": metrics.n}
        timings["evaluation_s"] = round(time.time() - t, 1)
    except (DataError, ValueError) as exc:
        fail(str(exc))

    console.rule("[bold]3/3 the service[/] (FastAPI + ONNX Runtime)")
    port = _pick_port(host, port)
    url = f"http://{host}:{port}"
    env = {**os.environ, "WBC_REGISTRY": str(Path(registry).resolve()), "WBC_VERSION": str(version)}
    env.update(refs.environment())
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "serve", "--host", host, "--port", str(port)],
                            env=env, start_new_session=True)
    try:
        ready = _wait_ready(url, proc)
        console.print(f"ready: {ready.get('model')} v{ready.get('version')} at {url}")
        images = demo_images(root)
        body = classify_files(images, url)
        console.print(results_table(body, width=console.width))
        summary["classified"] = [{k: r.get(k) for k in ("filename", "label", "confidence")} for r in body["results"]]
        timings["total_s"] = round(time.time() - t0, 1)
        summary["timings"] = timings
        out = Path(workdir) / "demo-summary.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summary, indent=2) + "\n")
        console.print(f"[bold green]demo done[/] in {timings['total_s']:.0f} s; summary: {out}")
        console.print(
            f"Query it:\n  .venv/bin/wbc classify --url {url} {images[0]}\n"
            f"  curl -F files=@{images[0]} {url}/v1/classify\n"
            f"  curl {url}/v2/health/ready    curl {url}/metrics\n"
            "  .venv/bin/wbc registry list --json",
            soft_wrap=True,
        )
        if exit_after_demo:
            return
        console.print(f"serving at {url} — Ctrl-C to stop")
        proc.wait()
    except (ClientError, RuntimeError) as exc:
        fail(str(exc), code=1)
    except KeyboardInterrupt:
        pass
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
