"""The granule opinion in the service: with WBC_SITE_GRANULE_REFERENCE set and a contract that carries a
granule prior, /v1/classify weighs the cell's granule density relative to the site's neutrophils
(models.granule_prior) on top of the size opinion, exactly; `wbc data site-scale` measures the reference
over the cells the served model calls neutrophils, and `wbc evaluate` applies both opinions."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner
from upload_helpers import files_field

from federation.sites import DataRoot
from models.cellcrop import cell_measures
from models.contract import ModelContract, SizePrior
from models.granule_prior import anchored_granule_reference
from models.registry import Registry
from models.size_prior import anchored_reference, apply_size_prior, relative_log_size
from service.config import Settings
from service.main import create_app

CLASSES = ("basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil")
SIZE = SizePrior(mean=(0.08, 0.09, -0.25, 0.10, -0.03), sd=(0.12, 0.2, 0.13, 0.14, 0.14), weight=2.0, cells=1379)
# The shape of the fitted prior: neutrophils at their site's reference, every other class denser.
GRANULES = SizePrior(mean=(0.07, 0.31, 0.28, 0.26, 0.01), sd=(0.16, 0.24, 0.18, 0.24, 0.14), weight=0.5,
                     cells=1379, anchor="neutrophil")


def _register(root: Path, onnx: Path, contract: ModelContract, name: str) -> None:
    Registry(root, name).register(onnx, contract, {"lineage": {"run_id": name}})


def _classify(settings: Settings, name: str, data: bytes) -> np.ndarray:
    with TestClient(create_app(settings)) as client:
        response = client.post("/v1/classify", files=files_field((name, data)))
    assert response.status_code == 200, response.text
    probs = response.json()["results"][0]["probabilities"]
    return np.array([probs[c] for c in CLASSES])


def test_site_granule_reference_turns_the_granule_opinion_on(tmp_path: Path, exported_onnx: Path,
                                                             model_contract: ModelContract,
                                                             data_root: DataRoot) -> None:
    contract = model_contract.with_updates(cell_crop={"scale": 1.3}, size_prior=SIZE.model_dump(),
                                           granule_prior=GRANULES.model_dump())
    _register(tmp_path, exported_onnx, contract, "wbc-granules")
    sample = data_root.select(["barcelona-pbc"], ["test"], ["eosinophil"])[0]
    data = sample.path.read_bytes()
    measures = cell_measures(Image.open(io.BytesIO(data)).convert("RGB"))
    assert np.isfinite(measures.granules) and np.isfinite(measures.diameter)
    base = Settings(registry=tmp_path, model_name="wbc-granules", intra_op_threads=1)

    network = _classify(base, sample.path.name, data)  # neither reference set: the network alone
    reference = measures.granules - 0.6  # this cell is far denser than its site's neutrophils
    granular = _classify(base.model_copy(update={"site_granule_reference": reference}), sample.path.name, data)
    expected = apply_size_prior(network[None], np.array([0.6]), GRANULES)[0]
    np.testing.assert_allclose(granular, expected, rtol=1e-4, atol=1e-6)
    neutrophil = CLASSES.index("neutrophil")
    assert granular[neutrophil] < network[neutrophil]

    both = _classify(base.model_copy(update={"site_granule_reference": reference,
                                             "site_cell_diameter": measures.diameter}), sample.path.name, data)
    sized = apply_size_prior(network[None], relative_log_size([measures.diameter], measures.diameter), SIZE)
    np.testing.assert_allclose(both, apply_size_prior(sized, np.array([0.6]), GRANULES)[0], rtol=1e-4, atol=1e-6)

    with pytest.raises(ValueError):
        Settings(site_granule_reference=float("nan"))


def test_site_scale_and_evaluation_take_the_granule_reference_from_the_called_neutrophils(
        tmp_path: Path, exported_onnx: Path, model_contract: ModelContract, data_root: DataRoot) -> None:
    from cli.main import app
    from service.evaluation import _load, evaluate_classifier
    from service.inference import Classifier

    samples = [s for site in ("bccd", "tehran-lisc") for s in data_root.select([site], ["test"])[:30]]
    plain = model_contract.with_updates(cell_crop={"scale": 1.3})
    _register(tmp_path / "plain", exported_onnx, plain, "wbc-plain")
    loaded = [_load(s, plain) for s in samples]
    network = Classifier(Registry(tmp_path / "plain", "wbc-plain").resolve("latest").onnx_path).probabilities(
        np.stack([a for a, _ in loaded]))
    d = np.array([m.diameter for _, m in loaded])
    g = np.array([m.granules for _, m in loaded])
    # The anchor: the class this (untrained) test network calls most often, so that the anchor path is taken.
    anchor = CLASSES[int(np.bincount(network.argmax(axis=1), minlength=5).argmax())]
    size = SIZE.model_copy(update={"anchor": anchor})
    granules = GRANULES.model_copy(update={"anchor": anchor})
    contract = plain.with_updates(size_prior=size.model_dump(), granule_prior=granules.model_dump())
    _register(tmp_path / "both", exported_onnx, contract, "wbc-both")
    want_d = anchored_reference(d, network, CLASSES, anchor)
    want_g = anchored_granule_reference(g, network, CLASSES, anchor)
    assert want_g != float(np.nanmedian(g))  # the anchored median, not all cells'  (59 of 60 called so)

    folder = tmp_path / "cells"
    folder.mkdir()
    for s in samples:
        (folder / s.path.name).write_bytes(s.path.read_bytes())
    result = CliRunner().invoke(app, ["data", "site-scale", str(folder), "--version", "latest", "--registry",
                                      str(tmp_path / "both"), "--model-name", "wbc-both", "--json"])
    assert result.exit_code == 0, result.output
    answer = json.loads(result.output)
    assert answer["site_cell_diameter"] == pytest.approx(want_d, abs=0.01)
    assert answer["site_granule_reference"] == pytest.approx(want_g, abs=1e-4)

    # The evaluation measures each site against its own references, as each site's service would be set up.
    classifier = Classifier(Registry(tmp_path / "both", "wbc-both").resolve("latest").onnx_path)
    _, probs, _ = evaluate_classifier(classifier, samples, batch_size=8)
    for site in ("bccd", "tehran-lisc"):
        here = np.array([s.site == site for s in samples])
        ref_d = anchored_reference(d[here], network[here], CLASSES, anchor)
        ref_g = anchored_granule_reference(g[here], network[here], CLASSES, anchor)
        sized = apply_size_prior(network[here], relative_log_size(d[here], ref_d), size)
        np.testing.assert_allclose(probs[here], apply_size_prior(sized, g[here] - ref_g, granules),
                                   rtol=1e-4, atol=1e-6)
