"""Evaluate a registered ONNX version exactly as it is served: the same ONNX Runtime session, the same
contract preprocessing (`models.preprocess`), on labelled site data."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from federation.sites import Sample
from models.cellcrop import CellMeasures
from models.contract import ModelContract
from models.evaluate import Metrics, compute_metrics
from models.granule_prior import anchored_granule_reference
from models.preprocess import preprocess_sized
from models.size_prior import anchored_reference, apply_size_prior, relative_log_size
from service.inference import Classifier


def _load(sample: Sample, contract) -> tuple[np.ndarray, CellMeasures]:
    with Image.open(sample.path) as img:
        img.load()
        return preprocess_sized(img, contract)


def evaluate_classifier(
    classifier: Classifier,
    samples: Sequence[Sample],
    *,
    batch_size: int = 16,
    progress: Callable[[int, int], None] | None = None,
    site_cell_diameters: dict[str, float] | None = None,
    site_granule_references: dict[str, float] | None = None,
) -> tuple[Metrics, np.ndarray, np.ndarray]:
    """Metrics over samples whose label the model knows; returns (metrics, probabilities, targets).

    With a size prior in the contract, each site's cells are sized against `site_cell_diameters[site]`
    (what the site's service is configured with, `wbc data site-scale`), else against that site's
    reference among the evaluated ones, measured as a deployed site would (`anchored_reference`: labels
    unused either way). A granule prior likewise, against `site_granule_references[site]` or the median
    granule density of the cells the network calls the prior's anchor (`anchored_granule_reference`)."""
    answered = network_answers(classifier, samples, batch_size=batch_size, progress=progress)
    p = with_opinions(answered, classifier.contract, site_cell_diameters=site_cell_diameters,
                      site_granule_references=site_granule_references)
    return compute_metrics(classifier.contract.class_names, answered.targets, p), p, answered.targets


@dataclass(frozen=True)
class NetworkAnswers:
    """The graph's answers (view average at the contract's temperature) for the cells whose label the model
    knows, with what the opinions need: each cell's measures and site."""

    probabilities: np.ndarray  # (N, C)
    targets: np.ndarray  # (N,)
    measures: list[CellMeasures]
    sites: np.ndarray  # (N,)


def network_answers(
    classifier: Classifier,
    samples: Sequence[Sample],
    *,
    batch_size: int = 16,
    progress: Callable[[int, int], None] | None = None,
) -> NetworkAnswers:
    """The network alone on the samples, decoded and prepared as the service does (the next chunk decodes
    while this one runs)."""
    contract = classifier.contract
    index = {name: i for i, name in enumerate(contract.class_names)}
    known = [s for s in samples if s.label in index]
    probs, targets, measures = [], [], []
    chunks = [known[i : i + batch_size] for i in range(0, len(known), batch_size)]
    done = 0
    with ThreadPoolExecutor(max_workers=2) as pool:
        pending = [pool.submit(_load, s, contract) for s in chunks[0]] if chunks else []
        for k, chunk in enumerate(chunks):
            loaded = [f.result() for f in pending]
            pending = [pool.submit(_load, s, contract) for s in chunks[k + 1]] if k + 1 < len(chunks) else []
            probs.append(classifier.probabilities(np.stack([a for a, _ in loaded])))
            measures.extend(m for _, m in loaded)
            targets.extend(index[s.label] for s in chunk)
            done += len(chunk)
            if progress:
                progress(done, len(known))
    p = np.concatenate(probs) if probs else np.zeros((0, contract.num_classes), np.float32)
    return NetworkAnswers(p, np.asarray(targets, dtype=np.int64), measures, np.asarray([s.site for s in known]))


def with_opinions(
    answered: NetworkAnswers,
    contract: ModelContract,
    *,
    probabilities: np.ndarray | None = None,
    site_cell_diameters: dict[str, float] | None = None,
    site_granule_references: dict[str, float] | None = None,
) -> np.ndarray:
    """The network's probabilities (`probabilities`, default the answered ones: e.g. the same answers at
    another temperature) combined with the contract's size and granule opinions, each site's cells against
    its given reference or the one its cells give (`evaluate_classifier`)."""
    p = answered.probabilities if probabilities is None else probabilities
    # the anchors are the cells the network alone calls so, as a deployed site measures them
    network = answered.probabilities
    sites, measures = answered.sites, answered.measures
    if contract.size_prior is not None and contract.size_prior.weight > 0 and len(p):
        d = np.asarray([m.diameter for m in measures], dtype=np.float64)
        r = _relative_per_site(d, sites, site_cell_diameters, relative_log_size, lambda here: anchored_reference(
            d[here], network[here], contract.class_names, contract.size_prior.anchor))
        p = apply_size_prior(p, r, contract.size_prior)
    if contract.granule_prior is not None and contract.granule_prior.weight > 0 and len(p):
        g = np.asarray([m.granules for m in measures], dtype=np.float64)
        relative = _relative_per_site(g, sites, site_granule_references, np.subtract,
                                      lambda here: anchored_granule_reference(
                                          g[here], network[here], contract.class_names, contract.granule_prior.anchor))
        p = apply_size_prior(p, relative, contract.granule_prior)
    return p


def _relative_per_site(values: np.ndarray, sites: np.ndarray, given: dict[str, float] | None,
                       relate: Callable[[np.ndarray, float], np.ndarray],
                       measure: Callable[[np.ndarray], float]) -> np.ndarray:
    """Each site's measured values against its reference: the one given for it, else `measure(cells)`
    (the cells a boolean mask over `values`); NaN where a cell was not measured."""
    out = np.full(len(values), np.nan)
    for site in np.unique(sites):
        here = (sites == site) & np.isfinite(values)
        if here.any():
            reference = (given or {}).get(str(site))
            out[here] = relate(values[here], measure(here) if reference is None else reference)
    return out
