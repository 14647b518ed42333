"""The size opinion in the service: with WBC_SITE_CELL_DIAMETER set and a contract that carries a size
prior, /v1/classify combines the network's probabilities with the cell's size relative to the site's
median cell (models.size_prior), exactly; without the setting the answer is the network's alone."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from upload_helpers import files_field

from federation.sites import DataRoot
from models.cellcrop import locate_cell
from models.contract import ModelContract, SizePrior
from models.registry import Registry
from models.size_prior import apply_size_prior, relative_log_size
from service.config import Settings
from service.main import create_app

# Lymphocytes small, basophils large relative to the site's median cell (the shape of the fitted priors).
PRIOR = SizePrior(mean=(0.08, 0.09, -0.25, 0.10, -0.03), sd=(0.12, 0.2, 0.13, 0.14, 0.14), weight=2.0, cells=1379)


@pytest.fixture(scope="module")
def sized_registry(tmp_path_factory: pytest.TempPathFactory, exported_onnx: Path, model_contract: ModelContract) -> Path:
    root = tmp_path_factory.mktemp("sized-registry")
    contract = model_contract.with_updates(cell_crop={"scale": 1.3}, size_prior=PRIOR.model_dump())
    Registry(root, "wbc-sized").register(exported_onnx, contract, {"lineage": {"run_id": "size-opinion"}})
    return root


def _classify(settings: Settings, name: str, data: bytes) -> np.ndarray:
    with TestClient(create_app(settings)) as client:
        response = client.post("/v1/classify", files=files_field((name, data)))
    assert response.status_code == 200, response.text
    probs = response.json()["results"][0]["probabilities"]
    return np.array([probs[c] for c in PRIOR_CLASSES])


PRIOR_CLASSES = ("basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil")


def test_site_diameter_turns_the_size_opinion_on(sized_registry: Path, data_root: DataRoot) -> None:
    sample = data_root.select(["barcelona-pbc"], ["test"], ["lymphocyte"])[0]
    data = sample.path.read_bytes()
    diameter = locate_cell(Image.open(io.BytesIO(data)).convert("RGB"))[2]
    base = Settings(registry=sized_registry, model_name="wbc-sized", intra_op_threads=1)

    network = _classify(base, sample.path.name, data)
    site = 1.25 * diameter  # this cell is small for its site: the opinion favours lymphocyte
    combined = _classify(base.model_copy(update={"site_cell_diameter": site}), sample.path.name, data)

    expected = apply_size_prior(network[None], relative_log_size([diameter], site), PRIOR)[0]
    np.testing.assert_allclose(combined, expected, rtol=1e-4, atol=1e-6)
    lymphocyte = PRIOR_CLASSES.index("lymphocyte")
    assert combined[lymphocyte] / combined.sum() > network[lymphocyte]
    assert abs(combined.sum() - 1.0) < 1e-4


def test_the_setting_must_be_a_positive_diameter() -> None:
    with pytest.raises(ValueError):
        Settings(site_cell_diameter=0)


def test_evaluation_sizes_each_site_against_its_own_median_or_the_given_one(sized_registry: Path,
                                                                            data_root: DataRoot) -> None:
    from service.evaluation import _load, evaluate_classifier
    from service.inference import Classifier

    classifier = Classifier(Registry(sized_registry, "wbc-sized").resolve("latest").onnx_path)
    samples = [s for site in ("tehran-lisc", "bccd") for s in data_root.select([site], ["test"])[:5]]
    loaded = [_load(s, classifier.contract) for s in samples]
    network = classifier.probabilities(np.stack([a for a, _ in loaded]))
    d = np.array([m.diameter for _, m in loaded])

    _, probs, _ = evaluate_classifier(classifier, samples, batch_size=4)
    expected = network.copy()
    for site in ("tehran-lisc", "bccd"):
        here = np.array([s.site == site for s in samples])
        expected[here] = apply_size_prior(network[here], relative_log_size(d[here], np.median(d[here])), PRIOR)
    np.testing.assert_allclose(probs, expected, rtol=1e-4, atol=1e-6)

    _, given, _ = evaluate_classifier(classifier, samples, batch_size=4, site_cell_diameters={"bccd": 150.0})
    here = np.array([s.site == "bccd" for s in samples])
    np.testing.assert_allclose(given[~here], expected[~here], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(given[here], apply_size_prior(network[here], relative_log_size(d[here], 150.0), PRIOR),
                               rtol=1e-4, atol=1e-6)


def test_site_scale_and_evaluation_size_against_the_cells_the_model_calls_the_anchor(
        tmp_path: Path, exported_onnx: Path, model_contract: ModelContract, data_root: DataRoot) -> None:
    """`wbc data site-scale` and an evaluation without a given diameter both take the median of the cells
    that the served model (before size) calls the contract's anchor class, over the site's images."""
    import json

    from typer.testing import CliRunner

    from cli.main import app
    from models.size_prior import anchored_reference, site_reference
    from service.evaluation import _load, evaluate_classifier
    from service.inference import Classifier

    samples = data_root.select(["bccd"], ["test"])[:40]
    plain = model_contract.with_updates(cell_crop={"scale": 1.3})
    loaded = [_load(s, plain) for s in samples]
    Registry(tmp_path / "plain", "wbc-plain").register(exported_onnx, plain, {"lineage": {"run_id": "plain"}})
    unsized = Classifier(Registry(tmp_path / "plain", "wbc-plain").resolve("latest").onnx_path)
    network = unsized.probabilities(np.stack([a for a, _ in loaded]))
    d = np.array([m.diameter for _, m in loaded])
    # The anchor: the class this (untrained) test network calls most often, so that the anchor path is
    # the one taken; its median differs from the all-cells median.
    anchor = PRIOR_CLASSES[int(np.bincount(network.argmax(axis=1), minlength=5).argmax())]
    expected = anchored_reference(d, network, PRIOR_CLASSES, anchor)
    assert (network.argmax(axis=1) == PRIOR_CLASSES.index(anchor)).sum() >= 10
    assert expected != site_reference(d)
    contract = plain.with_updates(size_prior=PRIOR.model_copy(update={"anchor": anchor}).model_dump())
    Registry(tmp_path / "anchored", "wbc-anchored").register(exported_onnx, contract, {"lineage": {"run_id": "anchor"}})

    listing = tmp_path / "cells"
    listing.mkdir()
    for s in samples:
        (listing / s.path.name).write_bytes(s.path.read_bytes())
    result = CliRunner().invoke(app, ["data", "site-scale", str(listing), "--version", "latest", "--registry",
                                      str(tmp_path / "anchored"), "--model-name", "wbc-anchored", "--json"])
    assert result.exit_code == 0, result.output
    answer = json.loads(result.output)
    assert answer["images"] == len(samples) and answer["site_cell_diameter"] == pytest.approx(expected, abs=0.01)

    classifier = Classifier(Registry(tmp_path / "anchored", "wbc-anchored").resolve("latest").onnx_path)
    _, probs, _ = evaluate_classifier(classifier, samples, batch_size=8)
    want = apply_size_prior(network, relative_log_size(d, expected), contract.size_prior)
    np.testing.assert_allclose(probs, want, rtol=1e-4, atol=1e-6)


def test_opinions_on_other_probabilities_keep_the_networks_own_reference(
        tmp_path: Path, exported_onnx: Path, model_contract: ModelContract, data_root: DataRoot) -> None:
    """`with_opinions(probabilities=...)` (a benchmark's network at its own fitted temperature): the opinion
    combines the probabilities given, while the site's reference stays the one the network's own answers
    pick, as a deployed site measures it."""
    from models.size_prior import anchored_reference
    from service.evaluation import network_answers, with_opinions
    from service.inference import Classifier

    samples = data_root.select(["bccd"], ["test"])[:40]
    plain = model_contract.with_updates(cell_crop={"scale": 1.3})
    Registry(tmp_path, "wbc-plain").register(exported_onnx, plain, {"lineage": {"run_id": "plain"}})
    answered = network_answers(Classifier(Registry(tmp_path, "wbc-plain").resolve("latest").onnx_path), samples,
                               batch_size=8)
    network = answered.probabilities
    anchor = PRIOR_CLASSES[int(np.bincount(network.argmax(axis=1), minlength=5).argmax())]
    contract = plain.with_updates(size_prior=PRIOR.model_copy(update={"anchor": anchor}).model_dump())
    d = np.array([m.diameter for m in answered.measures])
    # Another answer, which calls the anchor exactly the 15 largest cells: its own reference would differ.
    other = np.full_like(network, 0.1)
    a = PRIOR_CLASSES.index(anchor)
    largest = np.argsort(np.nan_to_num(d, nan=-1.0))[-15:]
    other[:, (a + 1) % 5] = 0.6
    other[largest, (a + 1) % 5], other[largest, a] = 0.1, 0.6

    got = with_opinions(answered, contract, probabilities=other)
    reference = anchored_reference(d, network, PRIOR_CLASSES, anchor)
    assert reference != anchored_reference(d, other, PRIOR_CLASSES, anchor)
    np.testing.assert_allclose(got, apply_size_prior(other, relative_log_size(d, reference), contract.size_prior),
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(with_opinions(answered, contract),
                               apply_size_prior(network, relative_log_size(d, reference), contract.size_prior),
                               rtol=1e-4, atol=1e-6)


def test_site_scale_says_which_version_is_missing(tmp_path: Path, data_root: DataRoot) -> None:
    from typer.testing import CliRunner

    from cli.main import app

    result = CliRunner().invoke(app, ["data", "site-scale", str(data_root.root), "--site", "bccd", "--registry",
                                      str(tmp_path), "--model-name", "nothing-here"])
    assert result.exit_code == 2 and "--version" in result.output
