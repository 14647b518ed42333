"""`wbc data ...`: inspect and validate site data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import Progress
from rich.table import Table

from cli.common import ModelNameOption, RegistryOption, console, fail
from federation.datacheck import check_data_root
from federation.sites import SPLITS
from models.registry import DEFAULT_MODEL_NAME, default_registry_root

app = typer.Typer(help="Site data: validate a data root.", no_args_is_help=True)


@app.command("check")
def check(
    directory: Annotated[Path, typer.Argument(help="Data root: manifest.csv + sites/<site>/<label>/...")],
    max_problems: Annotated[int, typer.Option(help="How many errors/warnings to print.")] = 20,
) -> None:
    """Validate layout and manifest, and decode every image; exit 1 when anything is wrong."""
    if not directory.is_dir():
        fail(f"{directory}: not a folder")
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("decoding images", total=None)
        report = check_data_root(directory, lambda done, total: progress.update(task, completed=done, total=total))

    if report.counts:
        table = Table(title=f"{report.root}")
        table.add_column("site")
        table.add_column("class")
        for split in SPLITS:
            table.add_column(split, justify="right")
        for site, splits in sorted(report.counts.items()):
            for label in sorted(set().union(*splits.values())):
                table.add_row(site, label, *(str(splits[s][label]) for s in SPLITS))
        console.print(table)
    for warning in report.warnings[:max_problems]:
        console.print(f"[yellow]warning:[/] {warning}")
    for error in report.errors[:max_problems]:
        console.print(f"[red]error:[/] {error}")
    hidden = max(0, len(report.errors) - max_problems) + max(0, len(report.warnings) - max_problems)
    if hidden:
        console.print(f"… and {hidden} more")
    if not report.ok:
        console.print(f"[bold red]FAILED[/]: {len(report.errors)} error(s)")
        raise typer.Exit(1)
    console.print(f"[bold green]OK[/]: {sum(sum(c.values()) for s in report.counts.values() for c in s.values())} "
                  f"images, {len(report.counts)} site(s), {len(report.warnings)} warning(s)")


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


@app.command("site-scale")
def site_scale(
    directory: Annotated[Path, typer.Argument(help="A data root (with --site) or any folder of this site's cell images")],
    site: Annotated[str | None, typer.Option(help="The site inside a data root (manifest.csv).")] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many images, evenly spread.")] = 500,
    version: Annotated[str, typer.Option("--version", help="The registered version the service will serve "
                                         "(number, 'latest', 'production' or 'candidate').")] = "production",
    registry: RegistryOption = default_registry_root(),
    model_name: ModelNameOption = DEFAULT_MODEL_NAME,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Measure this site's reference cell diameter (pixels; no labels read): the service's
    WBC_SITE_CELL_DIAMETER, which lets a model's size prior size each cell against its own site.

    The model says what the reference is: for the shipped models the median cell that the model (without
    size) calls a neutrophil; for a model without an anchor, the median of all located cells."""
    import json

    from cli.evaluate_cmd import open_classifier
    from models.registry import Registry, RegistryError

    if not directory.is_dir():
        fail(f"{directory}: not a folder")
    try:
        info = Registry(registry, model_name).resolve(version)
        info.verify()
    except RegistryError as exc:
        fail(f"{exc} (site-scale measures what the served version sizes against: register or pick one with --version)")
    classifier = open_classifier(info)
    if site is not None:
        from federation.sites import DataError, DataRoot

        try:
            paths = [s.path for s in DataRoot(directory).select([site], list(SPLITS))]
        except DataError as exc:
            fail(str(exc))
    else:
        paths = sorted(p for p in directory.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        fail(f"{directory}: no cell images found" + (f" for site {site!r}" if site else ""))
    if classifier.contract.size_prior is None:
        console.print(f"[yellow]note:[/] {info.model_name} v{info.version} carries no size prior: the service "
                      "will not use this setting")
    value, used = measure_site_diameter(paths, limit, classifier)
    if used == 0:
        fail("no image could be read, or no cell located in any")
    anchor = classifier.contract.size_prior.anchor if classifier.contract.size_prior else None
    what = f"median {anchor} (as v{info.version} calls them)" if anchor else "median white-cell"
    if as_json:
        print(json.dumps({"site_cell_diameter": round(value, 2), "images": used, "reference": what,
                          "model": info.model_name, "version": info.version}))
        return
    console.print(f"{what} diameter over {used} images: [bold]{value:.1f} px[/]")
    console.print(f"serve with: WBC_SITE_CELL_DIAMETER={value:.1f}")


def measure_site_diameter(paths: list[Path], limit: int = 500, classifier=None) -> tuple[float, int]:
    """(the site's reference diameter, images with a located cell) over at most `limit` evenly spread
    images. With a `classifier` whose size prior has an anchor, the reference is the median of the cells
    it calls that class (`models.size_prior.anchored_reference`), else the median of all located cells."""
    import numpy as np
    from PIL import Image

    from models.cellcrop import cell_diameter
    from models.preprocess import preprocess_sized, to_rgb
    from models.size_prior import anchored_reference, site_reference

    step = max(1, len(paths) // limit)
    paths = paths[::step][:limit]
    prior = classifier.contract.size_prior if classifier is not None else None
    anchor = prior.anchor if prior is not None else None
    diameters, probabilities, batch = [], [], []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("locating cells" + (f" and finding {anchor}s" if anchor else ""), total=len(paths))
        for k, path in enumerate(paths):
            try:
                with Image.open(path) as img:
                    if anchor is None:  # the locator alone
                        diameters.append(cell_diameter(to_rgb(img)))
                    else:  # the network's answer too, exactly as the service prepares the image
                        array, diameter = preprocess_sized(img, classifier.contract)
                        diameters.append(diameter)
                        batch.append(array)
            except OSError as exc:
                console.print(f"[yellow]skipped[/] {path.name}: {exc}")
            if batch and (len(batch) == 16 or k == len(paths) - 1):
                probabilities.append(classifier.probabilities(np.stack(batch)))
                batch = []
            progress.advance(task)
    d = np.asarray(diameters, dtype=np.float64)
    found = np.isfinite(d)  # images without a located nucleus say nothing
    if not found.any():
        return float("nan"), 0
    if anchor is None:
        return site_reference(d[found]), int(found.sum())
    p = np.concatenate(probabilities)
    return anchored_reference(d[found], p[found], classifier.contract.class_names, anchor), int(found.sum())
