import io
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx_builders import build_tiny_classifier
from PIL import Image

from models.contract import ONNX_METADATA_KEY, UNIDENTIFIED, ModelContract
from models.preprocess import preprocess, softmax
from models.registry import Registry
from service.config import Settings
from service.inference import (
    Classifier,
    ContractMismatchError,
    ModelLoadError,
    ModelSlot,
    SessionConfig,
    load_from_registry,
)


def test_contract_comes_from_the_file(exported_onnx: Path, model_contract: ModelContract) -> None:
    classifier = Classifier(exported_onnx)
    assert classifier.contract == model_contract
    assert classifier.static_batch is None  # dynamic batch axis


def test_batch_probabilities_use_contract_temperature(exported_onnx: Path, cell_images: dict[str, bytes]) -> None:
    classifier = Classifier(exported_onnx, SessionConfig(intra_op_threads=1))
    contract = classifier.contract
    arrays = [preprocess(Image.open(io.BytesIO(data)), contract) for data in cell_images.values()]
    batch = np.stack(arrays)
    logits = classifier.logits(batch)
    assert logits.shape == (len(arrays), contract.num_classes)
    np.testing.assert_allclose(classifier.probabilities(batch), softmax(logits, contract.temperature), atol=1e-6)
    # One at a time gives the same answer as the batch.
    single = np.concatenate([classifier.logits(a[None]) for a in arrays])
    np.testing.assert_allclose(single, logits, atol=1e-4)

    predictions = classifier.predict(arrays)
    for p in predictions:
        assert list(p.probabilities) == list(contract.class_names)
        assert sum(p.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
        assert p.confidence == max(p.probabilities.values())
        assert p.label == max(p.probabilities, key=p.probabilities.get)


def test_abstain_threshold_answers_unidentified(tmp_path: Path, exported_onnx: Path,
                                                model_contract: ModelContract) -> None:
    strict = model_contract.with_updates(abstain_threshold=0.99)
    info = Registry(tmp_path, "strict").register(exported_onnx, strict, {})
    classifier = Classifier(info.onnx_path)
    blank = np.zeros((3, strict.input_size, strict.input_size), dtype=np.float32)
    [prediction] = classifier.predict([blank])
    assert prediction.confidence < 0.99 and prediction.label == UNIDENTIFIED


def _rewrite_contract(src: Path, dest: Path, contract: ModelContract | None) -> Path:
    model = onnx.load(str(src))
    kept = [(p.key, p.value) for p in model.metadata_props if p.key != ONNX_METADATA_KEY]
    del model.metadata_props[:]
    for key, value in kept:
        model.metadata_props.add(key=key, value=value)
    if contract is not None:
        model.metadata_props.add(key=ONNX_METADATA_KEY, value=contract.to_json())
    onnx.save(model, str(dest))
    return dest


def test_refuses_contract_with_other_input_size(tmp_path: Path, exported_onnx: Path,
                                                model_contract: ModelContract) -> None:
    wrong = _rewrite_contract(exported_onnx, tmp_path / "m.onnx", model_contract.with_updates(input_size=96))
    with pytest.raises(ContractMismatchError, match="96×96"):
        Classifier(wrong)


def test_refuses_contract_with_other_class_count(tmp_path: Path, exported_onnx: Path,
                                                 model_contract: ModelContract) -> None:
    wrong = _rewrite_contract(exported_onnx, tmp_path / "m.onnx",
                              model_contract.with_updates(class_names=("a", "b", "c")))
    with pytest.raises(ContractMismatchError, match="3"):
        Classifier(wrong)


def test_refuses_other_input_name(tmp_path: Path, exported_onnx: Path) -> None:
    model = onnx.load(str(exported_onnx))
    old = model.graph.input[0].name
    model.graph.input[0].name = "pixels"
    for node in model.graph.node:
        node.input[:] = ["pixels" if name == old else name for name in node.input]
    onnx.save(model, str(tmp_path / "m.onnx"))
    with pytest.raises(ContractMismatchError, match="'pixels'"):
        Classifier(tmp_path / "m.onnx")


def test_refuses_file_without_contract(tmp_path: Path, exported_onnx: Path) -> None:
    bare = _rewrite_contract(exported_onnx, tmp_path / "m.onnx", None)
    with pytest.raises(ModelLoadError, match=ONNX_METADATA_KEY):
        Classifier(bare)


def test_refuses_tampered_registry_file(tmp_path: Path, exported_onnx: Path, model_contract: ModelContract) -> None:
    info = Registry(tmp_path, "m").register(exported_onnx, model_contract, {})
    with info.onnx_path.open("r+b") as fh:
        fh.seek(-1, 2)
        last = fh.read(1)
        fh.seek(-1, 2)
        fh.write(bytes([last[0] ^ 0xFF]))
    settings = Settings(registry=tmp_path, model_name="m")
    with pytest.raises(ModelLoadError, match="sha256"):
        load_from_registry(settings)


def test_slot_reports_empty_registry_then_loads_when_a_version_appears(
    tmp_path: Path, exported_onnx: Path, model_contract: ModelContract
) -> None:
    settings = Settings(registry=tmp_path, model_name="late", model_retry_seconds=0)
    slot = ModelSlot(settings)
    assert slot.load() is None and "no versions" in (slot.last_error or "")
    Registry(tmp_path, "late").register(exported_onnx, model_contract, {})
    loaded = slot.ensure_loaded()
    assert loaded is not None and loaded.version == 1 and slot.last_error is None


def test_session_options_are_recorded(settings: Settings) -> None:
    loaded = load_from_registry(settings)
    described = loaded.describe()["session"]
    assert described == {"providers": ["CPUExecutionProvider"], "intra_op_threads": 1, "inter_op_threads": 1,
                         "execution_mode": "sequential", "graph_optimization": "all", "allow_spinning": False}


def test_fixed_batch_of_one_graph_is_fed_one_image_at_a_time(tmp_path: Path, tiny_contract: ModelContract) -> None:
    path = build_tiny_classifier(tiny_contract, tmp_path / "tiny.onnx")
    model = onnx.load(str(path))
    for value in (model.graph.input[0], model.graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_value = 1
    onnx.save(model, str(path))
    classifier = Classifier(path)
    assert classifier.static_batch == 1
    s = tiny_contract.input_size
    batch = np.random.default_rng(0).normal(size=(3, 3, s, s)).astype(np.float32)
    together = classifier.logits(batch)
    assert together.shape == (3, tiny_contract.num_classes)
    np.testing.assert_allclose(together[2], classifier.logits(batch[2:3])[0], atol=1e-6)
