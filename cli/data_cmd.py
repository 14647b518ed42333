"""`wbc data ...`: inspect and validate site data."""

from __future__ import annotations

from dataclasses import dataclass
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
    WBC_SITE_CELL_DIAMETER, which lets a model's size prior size each cell against its own site; and,
    for a model with a granule prior, its reference granule density (WBC_SITE_GRANULE_REFERENCE).

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
    refs = measure_site_references(paths, limit, classifier)
    if refs.images == 0:
        fail("no image could be read, or no cell located in any")
    anchor = classifier.contract.size_prior.anchor if classifier.contract.size_prior else None
    what = f"median {anchor} (as v{info.version} calls them)" if anchor else "median white-cell"
    if as_json:
        print(json.dumps({"site_cell_diameter": round(refs.diameter, 2), "images": refs.images, "reference": what,
                          "site_granule_reference": None if refs.granules is None else round(refs.granules, 4),
                          "model": info.model_name, "version": info.version}))
        return
    console.print(f"{what} diameter over {refs.images} images: [bold]{refs.diameter:.1f} px[/]")
    if refs.granules is not None:
        console.print(f"{what} granule density: [bold]{refs.granules:.3f}[/]")
    console.print("serve with: " + " ".join(f"{k}={v}" for k, v in refs.environment().items()))


@dataclass(frozen=True)
class SiteReferences:
    """What a site's service sizes and weighs its cells against (no labels read): the reference cell
    diameter (pixels), the reference granule density (None: the model carries no granule prior), and over
    how many images with a located cell they were measured."""

    diameter: float
    granules: float | None
    images: int

    def environment(self) -> dict[str, str]:
        """The service's settings for them (none when no cell was located)."""
        if not self.images:
            return {}
        env = {"WBC_SITE_CELL_DIAMETER": f"{self.diameter:.1f}"}
        if self.granules is not None:
            env["WBC_SITE_GRANULE_REFERENCE"] = f"{self.granules:.4f}"
        return env


def measure_site_references(paths: list[Path], limit: int = 500, classifier=None) -> SiteReferences:
    """The site's references over at most `limit` evenly spread images. With a `classifier` whose size
    prior has an anchor, the diameter is the median of the cells it calls that class
    (`models.size_prior.anchored_reference`), else the median of all located cells; with a granule prior,
    the granule density's median over the same cells (`models.granule_prior.anchored_granule_reference`)."""
    import numpy as np
    from PIL import Image

    from models.cellcrop import cell_measures
    from models.granule_prior import anchored_granule_reference
    from models.preprocess import preprocess_sized, to_rgb
    from models.size_prior import anchored_reference, site_reference

    step = max(1, len(paths) // limit)
    paths = paths[::step][:limit]
    prior = classifier.contract.size_prior if classifier is not None else None
    granule_prior = classifier.contract.granule_prior if classifier is not None else None
    anchor = prior.anchor if prior is not None else None
    measures, probabilities, batch = [], [], []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("locating cells" + (f" and finding {anchor}s" if anchor else ""), total=len(paths))
        for k, path in enumerate(paths):
            try:
                with Image.open(path) as img:
                    if anchor is None:  # the locator alone
                        measures.append(cell_measures(to_rgb(img)))
                    else:  # the network's answer too, exactly as the service prepares the image
                        array, measured = preprocess_sized(img, classifier.contract)
                        measures.append(measured)
                        batch.append(array)
            except OSError as exc:
                console.print(f"[yellow]skipped[/] {path.name}: {exc}")
            if batch and (len(batch) == 16 or k == len(paths) - 1):
                probabilities.append(classifier.probabilities(np.stack(batch)))
                batch = []
            progress.advance(task)
    d = np.asarray([m.diameter for m in measures], dtype=np.float64)
    g = np.asarray([m.granules for m in measures], dtype=np.float64)
    found = np.isfinite(d)  # images without a located nucleus say nothing
    if not found.any():
        return SiteReferences(float("nan"), None, 0)
    if anchor is None:
        return SiteReferences(site_reference(d[found]), None, int(found.sum()))
    p = np.concatenate(probabilities)
    names = classifier.contract.class_names
    granules = None
    if granule_prior is not None and np.isfinite(g).any():
        granules = anchored_granule_reference(g, p, names, granule_prior.anchor)
    return SiteReferences(anchored_reference(d[found], p[found], names, anchor), granules, int(found.sum()))
