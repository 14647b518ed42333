"""ONNX export: contract in the metadata, parity with PyTorch on real images, dynamic batch, mismatches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from federation.sites import DataRoot
from models.contract import ONNX_METADATA_KEY, SHARED_CLASSES, ModelContract
from models.export import (
    INPUT_NAME,
    OUTPUT_NAME,
    PRODUCER_KEY,
    ContractMismatch,
    check_parity,
    contract_from_session,
    export_onnx,
    graph_problems,
    read_contract,
    validate_graph_against_contract,
)
from models.preprocess import preprocess
from models.zoo import contract_for, create_model

SIZE = 128  # small input keeps export and inference fast


@pytest.fixture(scope="module")
def real_images(data_root: DataRoot) -> list[Image.Image]:
    """Two test crops from every site, loaded as the service would (any mode, any size)."""
    chosen = []
    for site in data_root.sites:
        chosen += data_root.select([site], ["test"])[:2]
    return [Image.open(s.path) for s in chosen]


@pytest.fixture(scope="module")
def contract() -> ModelContract:
    return contract_for("tf_efficientnet_lite0", SHARED_CLASSES, input_size=SIZE, temperature=1.3)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    # pretrained=False: export does not depend on the weight wheels; a larger head spreads the logits so
    # that parity is checked away from a flat softmax.
    torch.manual_seed(0)
    net = create_model("tf_efficientnet_lite0", len(SHARED_CLASSES), pretrained=False)
    with torch.no_grad():
        net.classifier.weight.mul_(20.0)
    return net.eval()


@pytest.fixture(scope="module")
def exported(
    model: torch.nn.Module, contract: ModelContract, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    return export_onnx(model, contract, tmp_path_factory.mktemp("onnx") / "sub" / "model.onnx")


def test_contract_round_trips_through_metadata(exported: Path, contract: ModelContract) -> None:
    assert read_contract(exported) == contract
    assert read_contract(exported.read_bytes()) == contract
    session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    assert contract_from_session(session) == contract
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta[ONNX_METADATA_KEY])["class_names"] == list(SHARED_CLASSES)
    assert "torch" in json.loads(meta[PRODUCER_KEY])
    onnx.checker.check_model(str(exported))


def test_graph_signature(exported: Path, contract: ModelContract) -> None:
    session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.type, inp.shape[1:]) == (INPUT_NAME, "tensor(float)", [3, SIZE, SIZE])
    assert isinstance(inp.shape[0], str)  # symbolic: dynamic batch
    assert out.name == OUTPUT_NAME and out.shape[1] == contract.num_classes
    validate_graph_against_contract(session, contract)
    validate_graph_against_contract(exported, contract)
    validate_graph_against_contract(onnx.load(str(exported)), contract)


def test_parity_on_real_images(
    model: torch.nn.Module, exported: Path, real_images: list[Image.Image], contract: ModelContract
) -> None:
    report = check_parity(model, exported, real_images, contract)
    assert report.ok, report.as_dict()
    assert report.n_images == len(real_images) and report.top1_agreement == 1.0
    assert report.max_abs_diff < 1e-4


def test_dynamic_batch(exported: Path, real_images: list[Image.Image], contract: ModelContract) -> None:
    session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    batch = np.stack([preprocess(im, contract) for im in real_images[:3]])
    three = session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]
    one = session.run([OUTPUT_NAME], {INPUT_NAME: batch[:1]})[0]
    assert three.shape == (3, contract.num_classes) and one.shape == (1, contract.num_classes)
    np.testing.assert_allclose(one[0], three[0], atol=1e-4)


def test_parity_detects_a_different_model(
    exported: Path, real_images: list[Image.Image], contract: ModelContract
) -> None:
    torch.manual_seed(1)
    other = create_model("tf_efficientnet_lite0", len(SHARED_CLASSES), pretrained=False)
    with torch.no_grad():
        other.classifier.weight.mul_(20.0)
    report = check_parity(other, exported, real_images, contract)
    assert not report.ok and report.max_abs_diff > 1e-2


def test_parity_reports_instead_of_raising(
    model: torch.nn.Module, tmp_path: Path, real_images: list[Image.Image], contract: ModelContract
) -> None:
    missing = check_parity(model, tmp_path / "absent.onnx", real_images, contract)
    assert not missing.ok and missing.problems
    assert not check_parity(model, tmp_path / "absent.onnx", [], contract).ok


def test_input_size_disagreeing_with_contract_is_detected(exported: Path, contract: ModelContract) -> None:
    # A file whose metadata claims 160 px while its graph takes 128 px: what the service must refuse.
    forged = onnx.load(str(exported))
    claimed = contract.with_updates(input_size=160)
    for prop in forged.metadata_props:
        if prop.key == ONNX_METADATA_KEY:
            prop.value = claimed.to_json()
    session = ort.InferenceSession(forged.SerializeToString(), providers=["CPUExecutionProvider"])
    with pytest.raises(ContractMismatch, match=r"128×128, the contract says 160×160"):
        validate_graph_against_contract(session, contract_from_session(session))
    wrong_classes = contract.with_updates(class_names=("lymphocyte", "neutrophil"))
    assert any("expected [N, 2]" in p for p in graph_problems(session, wrong_classes))


def test_export_refuses_a_contract_the_model_cannot_honour(
    model: torch.nn.Module, contract: ModelContract, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="contract has 2 classes"):
        export_onnx(model, contract.with_updates(class_names=("a", "b")), tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="contract says"):
        export_onnx(model, contract.with_updates(architecture="resnet34"), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_vit_export_parity(real_images: list[Image.Image], tmp_path: Path) -> None:
    torch.manual_seed(0)
    vit = create_model("vit_small_patch14_dinov2", len(SHARED_CLASSES), pretrained=False, img_size=112).eval()
    vit_contract = contract_for("vit_small_patch14_dinov2", SHARED_CLASSES, input_size=112)
    path = export_onnx(vit, vit_contract, tmp_path / "vit.onnx")
    assert read_contract(path) == vit_contract
    report = check_parity(vit, path, real_images[:4], vit_contract)
    assert report.ok, report.as_dict()
