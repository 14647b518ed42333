"""Test-time views: exact symmetries of the input, averaged inside the exported graph, served as is."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from federation.sites import DataRoot
from models.contract import SHARED_CLASSES
from models.export import INPUT_NAME, OUTPUT_NAME, check_parity, export_onnx, read_contract
from models.preprocess import preprocess, softmax
from models.test_views import VIEW_SETS, AveragedViews, View, apply_view, with_test_views
from models.zoo import contract_for, create_model

SIZE = 64  # the views are pixel permutations: any square size shows the same thing


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    net = create_model("tf_efficientnet_lite0", len(SHARED_CLASSES), pretrained=False)
    with torch.no_grad():
        net.classifier.weight.mul_(20.0)  # spread the logits, so a view that changes them shows
    return net.eval()


@pytest.fixture(scope="module")
def cells(data_root: DataRoot) -> list[Image.Image]:
    return [Image.open(s.path) for site in data_root.sites for s in data_root.select([site], ["test"])[:1]]


@pytest.mark.parametrize("name", sorted(VIEW_SETS))
def test_view_sets_are_distinct_symmetries_starting_with_the_input(name: str) -> None:
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).reshape(2, 3, 32, 32)  # no symmetry of its own
    views = [apply_view(x, v) for v in VIEW_SETS[name]]
    assert torch.equal(views[0], x)
    flat = {tuple(v.flatten().tolist()) for v in views}
    assert len(flat) == len(views), "two views of the set are the same transform"
    for view, v in zip(VIEW_SETS[name], views):
        assert v.shape == x.shape
        if view.zoom == 1.0:  # a permutation of each image's pixels within each channel, nothing interpolated
            assert torch.equal(v.flatten(2).sort(dim=-1).values, x.flatten(2).sort(dim=-1).values)


def test_zoom_and_shift_reframe_the_cell() -> None:
    x = torch.zeros(1, 1, 64, 64)
    x[..., 24:40, 24:40] = 1.0  # a 16-px "cell" in the centre

    def area(v: torch.Tensor) -> float:
        return float((v > 0.5).sum())

    def centre(v: torch.Tensor) -> tuple[float, float]:
        ys, xs = torch.nonzero(v[0, 0] > 0.5, as_tuple=True)
        return float(ys.float().mean()), float(xs.float().mean())

    bigger, smaller = apply_view(x, View(zoom=1.25)), apply_view(x, View(zoom=0.8))
    assert area(bigger) == pytest.approx(area(x) * 1.25**2, rel=0.15)
    assert area(smaller) == pytest.approx(area(x) * 0.8**2, rel=0.15)
    assert centre(bigger) == pytest.approx((31.5, 31.5), abs=0.6)
    # the window moved down-right by its spare margin: the cell appears up-left of the centre
    moved = apply_view(x, View(zoom=1.25, shift=(1.0, 1.0)))
    assert area(moved) == pytest.approx(area(bigger), rel=0.15)
    cy, cx = centre(moved)
    assert cy < 31.5 - 3 and cx < 31.5 - 3


def test_dihedral_average_does_not_depend_on_the_orientation(model: torch.nn.Module) -> None:
    net = AveragedViews(model, "dihedral").eval()
    x = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = net(x)
        for v in VIEW_SETS["dihedral"][1:]:
            torch.testing.assert_close(net(apply_view(x, v)), base, atol=1e-5, rtol=1e-5)
        bare = model(x)
        turned = model(apply_view(x, View(1)))
    assert (bare - turned).abs().max() > 1e-2, "the bare model is orientation-dependent, the average is not"
    assert torch.allclose(base.exp().sum(-1), torch.ones(3), atol=1e-5)  # log of a probability


def test_with_test_views_follows_the_contract(model: torch.nn.Module) -> None:
    contract = contract_for("tf_efficientnet_lite0", SHARED_CLASSES, input_size=SIZE)
    assert with_test_views(model, contract) is model
    wrapped = with_test_views(model, contract.with_updates(test_views="flips"))
    assert isinstance(wrapped, AveragedViews) and len(wrapped.views) == 4
    assert with_test_views(wrapped, contract.with_updates(test_views="flips")) is wrapped  # never twice
    with pytest.raises(ValueError, match="test_views"):
        contract.with_updates(test_views="sideways")


def test_exported_graph_averages_the_views_and_keeps_parity(
    model: torch.nn.Module, cells: list[Image.Image], tmp_path: Path
) -> None:
    contract = contract_for("tf_efficientnet_lite0", SHARED_CLASSES, input_size=SIZE).with_updates(
        test_views="dihedral", temperature=1.5
    )
    path = export_onnx(model, contract, tmp_path / "views.onnx")  # the bare model: export wraps it
    assert read_contract(path).test_views == "dihedral"
    report = check_parity(model, path, cells, contract)
    assert report.ok, report.as_dict()

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    batch = np.stack([preprocess(c, contract) for c in cells])
    served = session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]
    with torch.no_grad():
        per_view = [torch.softmax(model(apply_view(torch.from_numpy(batch), v)), -1).numpy() for v in VIEW_SETS["dihedral"]]
    np.testing.assert_allclose(np.exp(served), np.mean(per_view, axis=0), atol=1e-5)
    # a mirrored cell gets the same answer from the file, where the bare model's answer changes
    mirrored = session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(batch[..., ::-1])})[0]
    np.testing.assert_allclose(softmax(mirrored, 1.5), softmax(served, 1.5), atol=1e-5)


def test_wrapping_keeps_the_models_mode(model: torch.nn.Module) -> None:
    # export and parity put the network back in the mode they found it in: the wrapper's mode must be
    # the model's, or an eval-mode model comes back in training mode (BatchNorm on batch statistics)
    assert not AveragedViews(model, "flips").training and not model.training


def test_the_contract_names_exactly_the_defined_view_sets() -> None:
    from typing import get_args

    from models.contract import TestViews

    assert set(get_args(TestViews)) == set(VIEW_SETS)
