"""`wbc registry ...`: list versions with their lineage; promote, roll back, collect garbage (models/lifecycle.py)."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from cli.common import ModelNameOption, RegistryOption, console, fail
from models.registry import DEFAULT_MODEL_NAME, Registry, RegistryError, default_registry_root

app = typer.Typer(help="The versioned model registry.", no_args_is_help=True)


def _strategy_name(strategy) -> str:
    return strategy.get("name", "") if isinstance(strategy, dict) else str(strategy or "")


def _summary(info, aliases: dict) -> dict:
    """One version's lineage (where its weights came from) and metrics, flattened for listing."""
    meta = info.metadata
    tags = [name for name in ("production", "candidate") if aliases.get(name) == info.version]
    sites = meta.get("sites") or {}
    return {
        "version": info.version,
        "aliases": tags,
        "created": meta.get("created"),
        "architecture": meta["contract"]["architecture"],
        "lineage": {
            "source": meta.get("source"),
            "run_id": meta.get("run_id"),
            "round": meta.get("round"),
            "strategy": meta.get("strategy"),
            "start_weights": meta.get("start_weights"),
            "averaged_rounds": meta.get("averaged_rounds"),  # the rounds whose global models it is the mean of
            "weight_source": meta.get("weight_source"),
            "sites": {site: {"train_examples": v.get("train_examples")} for site, v in sites.items()},
        },
        "gate": meta.get("gate"),
        "metrics": {"pooled_val": {k: v for k, v in (meta.get("metrics", {}).get("pooled_val") or {}).items()
                                   if k in ("n", "balanced_accuracy", "macro_f1", "recall")}},
        "sha256": meta["sha256"],
        "path": str(info.onnx_path),
    }


@app.command("list")
def list_versions(
    registry: RegistryOption = default_registry_root(),
    model_name: ModelNameOption = DEFAULT_MODEL_NAME,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Every whole version, oldest first, with lineage (run, round, strategy, sites) and metrics."""
    reg = Registry(registry, model_name)
    aliases = reg.aliases()
    rows = [_summary(v, aliases) for v in reg.versions()]
    if as_json:
        print(json.dumps({"model": model_name, "registry": str(reg.root), "versions": rows}, indent=2))
        return
    if not rows:
        console.print(f"no versions of {model_name} in {reg.root}")
        return
    table = Table(title=f"{model_name} @ {reg.root}")
    for col in ("ver", "aliases", "created", "arch", "run / round", "strategy", "sites", "val bal.acc"):
        table.add_column(col)
    for row in rows:
        lineage = row["lineage"]
        pooled = row["metrics"].get("pooled_val", {})
        table.add_row(
            str(row["version"]),
            ",".join(row["aliases"]),
            row["created"] or "",
            row["architecture"],
            f"{lineage.get('run_id', '')} / {lineage.get('round', '')}{_mean_of(lineage.get('averaged_rounds'))}",
            _strategy_name(lineage.get("strategy")),
            ", ".join(f"{site}({v['train_examples']})" for site, v in lineage["sites"].items()),
            f"{pooled['balanced_accuracy']:.3f}" if pooled.get("balanced_accuracy") is not None else "",
        )
    console.print(table)


def _mean_of(rounds: list[int] | None) -> str:
    return f" (mean of {', '.join(str(r) for r in rounds)})" if rounds and len(rounds) > 1 else ""


@app.command("show")
def show(
    version: Annotated[str, typer.Argument(help="Version number, 'latest', 'production' or 'candidate'.")],
    registry: RegistryOption = default_registry_root(),
    model_name: ModelNameOption = DEFAULT_MODEL_NAME,
) -> None:
    """The full metadata.json of one version."""
    try:
        info = Registry(registry, model_name).resolve(version)
    except RegistryError as exc:
        fail(str(exc))
    print(json.dumps(info.metadata, indent=2))


def _actor() -> str:
    import getpass

    return f"cli:{getpass.getuser()}"


@app.command("promote")
def promote(
    version: Annotated[int, typer.Argument(help="Version number to make production.")],
    reason: Annotated[str, typer.Option("--reason", help="Why (kept in the alias history).")] = "manual promotion",
    registry: RegistryOption = default_registry_root(),
    model_name: ModelNameOption = DEFAULT_MODEL_NAME,
) -> None:
    """Point `production` at VERSION (its sha256 is checked first); the service follows it."""
    from models import lifecycle

    reg = Registry(registry, model_name)
    try:
        before = reg.aliases().get("production")
        lifecycle.promote(reg, version, actor=_actor(), reason=reason)
    except RegistryError as exc:
        fail(str(exc))
    console.print(f"{model_name}: production {before} → {version}")


@app.command("rollback")
def rollback(
    reason: Annotated[str, typer.Option("--reason", help="Why (kept in the alias history).")] = "manual rollback",
    registry: RegistryOption = default_registry_root(),
    model_name: ModelNameOption = DEFAULT_MODEL_NAME,
) -> None:
    """Put back the production version that preceded the current one (repeat to go further back)."""
    from models import lifecycle

    reg = Registry(registry, model_name)
    try:
        before = reg.aliases().get("production")
        lifecycle.rollback(reg, actor=_actor(), reason=reason)
    except RegistryError as exc:
        fail(str(exc))
    console.print(f"{model_name}: production {before} → {reg.aliases().get('production')}")


@app.command("gc")
def gc(
    keep: Annotated[int, typer.Option("--keep", help="Keep the newest K versions.")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only say what would be deleted.")] = False,
    registry: RegistryOption = default_registry_root(),
    model_name: ModelNameOption = DEFAULT_MODEL_NAME,
) -> None:
    """Delete old versions; never candidate, production, the rollback target or their INT8 variants."""
    from models import lifecycle

    try:
        out = lifecycle.gc(Registry(registry, model_name), keep, dry_run=dry_run)
    except RegistryError as exc:
        fail(str(exc))
    verb = "would delete" if dry_run else "deleted"
    console.print(f"{model_name}: {verb} {out['deleted'] or 'nothing'}; kept {out['kept']} (protected {out['protected']})")

