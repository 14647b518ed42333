"""`wbc evaluate`: balanced accuracy, per-class recall and confusion matrix of a registered version."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from cli.common import DataRootOption, ModelNameOption, RegistryOption, console, fail
from federation.sites import SPLITS, DataError, DataRoot, resolve_data_root
from models.evaluate import Metrics
from models.registry import DEFAULT_MODEL_NAME, Registry, RegistryError, default_registry_root


def _fmt(value: float | None) -> str:
    return "—" if value is None or value != value else f"{value:.3f}"


def metrics_tables(metrics: Metrics, title: str) -> tuple[Table, Table]:
    summary = Table(title=title)
    for col in ("n", "balanced acc.", "accuracy", "macro-F1", "ECE"):
        summary.add_column(col, justify="right")
    summary.add_row(
        str(metrics.n), f"{metrics.balanced_accuracy:.3f}", f"{metrics.accuracy:.3f}",
        f"{metrics.macro_f1:.3f}", _fmt(metrics.extra.get("ece")),
    )
    confusion = Table(title="confusion (rows: true, columns: predicted) and recall")
    confusion.add_column("true \\ pred")
    names = metrics.class_names
    for name in names:
        confusion.add_column(name[:5], justify="right")
    confusion.add_column("recall", justify="right")
    for i, name in enumerate(names):
        recall = metrics.recall[i]
        confusion.add_row(name, *(str(v) for v in metrics.confusion[i]),
                          "—" if recall != recall else f"{recall:.3f}")
    return summary, confusion


def open_classifier(info):
    """The version's ONNX Runtime session for offline work: every core (the service keeps one, its cores
    also decode requests); a model with test-time views runs 12 passes per cell, so this is where
    evaluation spends its time."""
    from service.config import usable_cores
    from service.inference import Classifier, SessionConfig, providers_for

    return Classifier(info.onnx_path, SessionConfig(providers=providers_for("auto"), device="auto",
                                                    intra_op_threads=usable_cores()))


def evaluate_version(version_ref: str, registry, model_name: str, data_root, site: str, splits: list[str],
                     site_references=None):
    """Resolve, verify and evaluate; returns (VersionInfo, Metrics, how many samples were skipped).

    `site_references` (`cli.data_cmd.SiteReferences`): the site's reference cell and granule density when
    the caller has measured them already (else they are measured here over the site's images, as
    `wbc data site-scale` would for the site's service)."""
    from service.evaluation import evaluate_classifier

    info = Registry(registry, model_name).resolve(version_ref)
    info.verify()
    data = DataRoot(resolve_data_root(data_root))
    samples = data.select([site], splits)
    if not samples:
        raise DataError(f"{data.root}: site {site!r} has no samples in split(s) {splits}")
    classifier = open_classifier(info)
    known = [s for s in samples if s.label in classifier.contract.class_names]
    if site_references is None and classifier.contract.size_prior is not None and len(known) < len(samples):
        # As the site's service would be set up: from all its images, the classes the model does not know
        # too (when every image is evaluated, evaluate_classifier measures the same from its own answers).
        from cli.data_cmd import measure_site_references

        site_references = measure_site_references([s.path for s in samples], classifier=classifier)
    diameters = granules = None
    if site_references is not None and site_references.images:
        diameters = {site: site_references.diameter}
        granules = None if site_references.granules is None else {site: site_references.granules}
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task(f"evaluating v{info.version} on {site}", total=len(known))
        metrics, _, _ = evaluate_classifier(
            classifier, known, progress=lambda done, total: progress.update(task, completed=done),
            site_cell_diameters=diameters, site_granule_references=granules,
        )
    return info, metrics, len(samples) - len(known)


def evaluate(
    version: Annotated[str, typer.Option("--version", help="Version number, 'latest', 'production' or 'candidate'.")],
    site: Annotated[str, typer.Option("--site", help="Site to evaluate on, e.g. barcelona-pbc.")],
    split: Annotated[str, typer.Option("--split", help="train, val, test or all.")] = "test",
    registry: RegistryOption = default_registry_root(),
    model_name: ModelNameOption = DEFAULT_MODEL_NAME,
    data_root: DataRootOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Evaluate a registered version (ONNX Runtime, as served) on one site's split."""
    splits = list(SPLITS) if split == "all" else [split]
    if split != "all" and split not in SPLITS:
        fail(f"--split {split!r}: one of {', '.join(SPLITS)} or all")
    try:
        info, metrics, skipped = evaluate_version(version, registry, model_name, data_root, site, splits)
    except (RegistryError, DataError) as exc:
        fail(str(exc))
    if as_json:
        print(json.dumps({"model": info.model_name, "version": info.version, "site": site, "split": split,
                          "skipped_unknown_classes": skipped, **metrics.as_dict()}, indent=2))
        return
    summary, confusion = metrics_tables(metrics, f"{info.model_name} v{info.version} on {site} / {split}")
    console.print(summary)
    console.print(confusion)
    if skipped:
        console.print(f"[dim]{skipped} image(s) of classes the model does not know were left out[/]")
