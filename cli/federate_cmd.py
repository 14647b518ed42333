"""`wbc federate`: one real Flower federation (SuperLink + a SuperNode per site) that registers every
accepted round into the registry."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from cli.common import DataRootOption, RegistryOption, console, fail
from federation.sites import DEFAULT_TRAINING_SITES, DataError
from models.registry import default_registry_root

WorkdirOption = Annotated[
    Path, typer.Option("--workdir", envvar="WBC_FEDERATION_WORKDIR",
                       help="Where SuperLink/SuperNode state, per-site data views and run records go.")
]


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`key=value` pairs, values in TOML syntax (strings may be left unquoted)."""
    config: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"{pair!r}: expected key=value")
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()
        config[key.strip()] = value
    return config


def rounds_table(result) -> Table:
    """Per round: each site's validation balanced accuracy, the pooled one, the gate, the version."""
    sites = sorted({site for r in result.rounds for site in r.get("sites", {})})
    table = Table(title=f"run {result.run_id}: {result.status} ({result.wall_seconds:.0f} s); "
                        "validation balanced accuracy", caption=_rejections(result) or None)
    table.add_column("round", justify="right")
    for site in sites:
        table.add_column(site, justify="right")
    table.add_column("pooled", justify="right")
    table.add_column("gate")
    table.add_column("version")
    for r in result.rounds:
        cells = []
        for site in sites:
            ev = r.get("sites", {}).get(site, {}).get("evaluate", {})
            cells.append(f"{ev['balanced_accuracy']:.3f}" if ev.get("ok") else "[red]—[/]")
        pooled = (r.get("pooled") or {}).get("balanced_accuracy")
        decision = "[green]accepted[/]" if (r.get("gate") or {}).get("accepted") else "[red]rejected[/]"
        publish = r.get("publish") or {}
        registered = f"v{publish['version']}" if publish.get("status") == "registered" else publish.get("status", "")
        if (r.get("lifecycle") or {}).get("promoted"):
            registered += " → production"
        table.add_row(str(r["round"]), *cells, f"{pooled:.3f}" if pooled is not None else "—", decision,
                      registered or "")
    return table


def _rejections(result) -> str:
    return "\n".join(f"round {r['round']} rejected: {(r.get('gate') or {}).get('reason', '')}"
                     for r in result.rounds if not (r.get("gate") or {}).get("accepted"))


def federate(
    data_root: DataRootOption = None,
    sites: Annotated[list[str], typer.Option("--site", help="A training site (repeat). "
                                             "Default: tehran-lisc, jiangxi-tecom, bccd.")] = list(DEFAULT_TRAINING_SITES),
    registry: RegistryOption = default_registry_root(),
    workdir: WorkdirOption = Path("var/federation"),
    rounds: Annotated[int | None, typer.Option("--rounds", help="Server rounds.")] = None,
    strategy: Annotated[str | None, typer.Option(
        help="fedavg | fedmedian | fedprox | fedadam | fedyogi | fedadagrad (and robust ones when available)")] = None,
    architecture: Annotated[str | None, typer.Option(help="timm backbone.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for the whole run.")] = None,
    set_: Annotated[list[str], typer.Option("--set", help="Any run-config key=value (see pyproject "
                                           "[tool.flwr.app.config]), e.g. --set proximal-mu=0.1")] = [],
    secure: Annotated[bool, typer.Option("--tls/--insecure", help="TLS between SuperLink and SuperNodes "
                                         "(a throwaway CA for local runs).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the run summary as JSON.")] = False,
) -> None:
    """Train the classifier across hospital sites with Flower and register every accepted round."""
    from federation.deploy import FederationError, run_federation

    config = parse_overrides(set_)
    for key, value in (("num-server-rounds", rounds), ("strategy", strategy),
                       ("architecture", architecture), ("seed", seed)):
        if value is not None:
            config[key] = value
    try:
        result = run_federation(data_root, sites, registry, config, workdir,
                                insecure=not secure, show_progress=not as_json)
    except (DataError, ValueError, FederationError) as exc:
        fail(str(exc))
    if as_json:
        print(json.dumps(result.summary(), indent=2))
    else:
        console.print(rounds_table(result))
        if result.registered:
            console.print(f"registered: {', '.join('v' + str(r['version']) for r in result.registered)} "
                          f"in {Path(registry).resolve()}")
        console.print(f"records: {result.run_dir}")
    if not result.ok:
        console.print(f"[bold red]federation failed:[/] {result.error}")
        raise typer.Exit(1)
