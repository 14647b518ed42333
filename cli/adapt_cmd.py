"""`wbc adapt`: fine-tune a registered federated version on one site's reviewed cells, as that site's model;
with `--unlabelled` (or `--images DIR`), only re-estimate its BatchNorm statistics on the site's cells."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from cli.common import ModelNameOption, RegistryOption, console, fail
from federation.sites import DataError
from models.registry import DEFAULT_MODEL_NAME, RegistryError, default_registry_root


def adapt(
    site: Annotated[str, typer.Argument(help="The site whose cells adapt the model, e.g. barcelona-pbc.")],
    data_root: Annotated[Path | None, typer.Option("--data-root", help="The site's data root (manifest.csv + "
                                                   "images): its train cells train, its val cells check and calibrate.")] = None,
    unlabelled: Annotated[bool, typer.Option("--unlabelled", help="No fine-tuning: re-estimate the model's "
                                             "BatchNorm statistics on the site's train cells, labels unused.")] = False,
    images: Annotated[Path | None, typer.Option("--images", help="A folder of the site's cell images (no "
                                                "manifest, no labels): implies --unlabelled; nothing can be checked.")] = None,
    extra_data_root: Annotated[list[Path] | None, typer.Option(
        "--extra-data-root", help="More roots of the same site, e.g. `wbc review export` output (repeatable).")] = None,
    version: Annotated[str, typer.Option("--version", help="Version to start from: number, 'production', "
                                         "'latest' or 'candidate'.")] = "production",
    target: Annotated[str | None, typer.Option("--as", help="Model name to register under "
                                               "(default: <model-name>-<site>).")] = None,
    epochs: Annotated[int | None, typer.Option(help="Default: the parent run's rounds x local epochs.")] = None,
    lr: Annotated[float | None, typer.Option(help="Default: the parent run's.")] = None,
    seed: Annotated[int, typer.Option(help="Seeds the fine-tuning.")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Register even if worse than the parent on the "
                                        "site's val cells.")] = False,
    registry: RegistryOption = default_registry_root(),
    model_name: ModelNameOption = DEFAULT_MODEL_NAME,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Adapt a federated version to one site (its train cells), check it on its val cells, register it."""
    from federation.adapt import AdaptSettings, adapt_version
    from federation.site_data import SiteData

    if images is not None or unlabelled:
        return _statistics(site, data_root, extra_data_root, images, version, target, seed, force, registry,
                           model_name, as_json)
    if data_root is None:
        fail("give the site's --data-root (or --images DIR for unlabelled cells)")
    roots = [data_root, *(extra_data_root or [])]
    site_data = SiteData(site, data_root.resolve(), tuple(p.resolve() for p in roots[1:]))
    settings = AdaptSettings(epochs=epochs, lr=lr, seed=seed, force=force)
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      TextColumn("loss {task.fields[loss]:.3f}"), console=console, transient=True,
                      disable=as_json) as progress:
            task = progress.add_task(f"adapting {model_name} {version} to {site}", total=None, loss=float("nan"))
            outcome = adapt_version(
                registry, model_name, version, site_data, target_model=target, settings=settings,
                progress=lambda step, total, loss: progress.update(task, completed=step, total=total, loss=loss),
            )  # fmt: skip
    except (RegistryError, DataError, ValueError) as exc:
        fail(str(exc))
    if as_json:
        _json(outcome, site, train_counts=outcome.train_counts, missing_classes=outcome.missing_classes,
              training=outcome.training)
    else:
        _print(outcome, site)
    _exit_unless_registered(outcome)


def _json(outcome, site: str, **fields) -> None:
    print(json.dumps({
        "site": site, "parent": {"model": outcome.parent.model_name, "version": outcome.parent.version},
        "target_model": outcome.target_model, **fields,
        "val_before": outcome.before.as_dict() if outcome.before else None,
        "val_after": outcome.after.as_dict() if outcome.after else None,
        "registered": outcome.registered, "refused": outcome.refused,
    }, indent=2, default=float))  # fmt: skip


def _exit_unless_registered(outcome) -> None:
    registered = outcome.registered or {}
    if outcome.refused:
        fail(outcome.refused, code=1)
    if registered.get("status") != "registered":
        fail(f"not registered: {registered.get('reason')}", code=1)


def _print(outcome, site: str) -> None:
    _table(outcome, site)
    _trained(outcome)


def _table(outcome, site: str) -> None:
    names = outcome.before.class_names
    table = Table(title=f"{site} val cells: {outcome.parent.model_name} v{outcome.parent.version} → adapted")
    table.add_column("")
    for col in ("balanced acc.", "ECE", *(n[:5] for n in names)):
        table.add_column(col, justify="right")
    for label, m in (("before", outcome.before), ("after", outcome.after)):
        recall = ["—" if r != r else f"{r:.2f}" for r in m.recall]
        table.add_row(label, f"{m.balanced_accuracy:.3f}", f"{m.extra.get('ece', float('nan')):.3f}", *recall)
    console.print(table)


def _trained(outcome) -> None:
    names = outcome.before.class_names
    counts = ", ".join(f"{c} {outcome.train_counts.get(c, 0)}" for c in names)
    console.print(f"trained on {sum(outcome.train_counts.values())} cells ({counts}); {outcome.training}")
    if outcome.missing_classes:
        console.print(f"[yellow]no train cells of {', '.join(outcome.missing_classes)}: the adapted model "
                      "knows them only from the federation[/]")
    r = outcome.registered or {}
    if r.get("status") == "registered":
        console.print(f"[green]{r['reason']}[/]; served once production points at it: "
                      f"wbc registry promote {r['version']} --model-name {outcome.target_model}")


def _statistics(site, data_root, extra_roots, images, version, target, seed, force, registry, model_name,
                as_json) -> None:
    from federation.adapt_statistics import adapt_statistics, image_files
    from federation.site_data import SiteData

    try:
        val: list = []
        if images is not None:
            cells = image_files(images.resolve())
            parity_root = None  # the parity check uses cells that were read
        elif data_root is not None:
            roots = [data_root, *(extra_roots or [])]
            site_data = SiteData(site, data_root.resolve(), tuple(p.resolve() for p in roots[1:]))
            classes = registry_classes(registry, model_name, version)
            cells = [s.path for s in site_data.select("train", classes)[0]]
            val = site_data.select("val", classes)[0]
            parity_root = data_root.resolve()
        else:
            fail("--unlabelled needs the site's --data-root or an --images folder")
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      console=console, transient=True, disable=as_json) as progress:
            task = progress.add_task(f"reading {site}'s cells for {model_name} {version}'s statistics", total=None)
            outcome = adapt_statistics(
                registry, model_name, version, site, cells, val=val, target_model=target, seed=seed, force=force,
                parity_root=parity_root, progress=lambda done, total: progress.update(task, completed=done, total=total),
            )  # fmt: skip
    except (RegistryError, DataError, ValueError) as exc:
        fail(str(exc))
    registered = outcome.registered or {}
    if as_json:
        _json(outcome, site, cells=outcome.cells, unreadable=len(outcome.unreadable), layers=outcome.layers,
              checked=outcome.checked)
    else:
        console.print(f"{outcome.layers} BatchNorm layers re-estimated on {outcome.cells} {site} cells"
                      + (f" ({len(outcome.unreadable)} unreadable files skipped)" if outcome.unreadable else ""))
        if outcome.checked:
            _table(outcome, site)
        else:
            console.print(f"[yellow]no labelled val cells of {site}: the adapted model could not be compared "
                          "with its parent; review some of its predictions before promoting it[/]")
        if registered.get("status") == "registered":
            console.print(f"[green]{registered['reason']}[/]; served once production points at it: "
                          f"wbc registry promote {registered['version']} --model-name {outcome.target_model}")
    _exit_unless_registered(outcome)


def registry_classes(registry, model_name: str, version: str) -> tuple[str, ...]:
    from models.registry import Registry

    return Registry(registry, model_name).resolve(version).contract.class_names
