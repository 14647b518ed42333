"""The Open Inference Protocol (KServe v2) endpoints, driven by the real, unchanged `tritonclient.http`."""

import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from server_helpers import RunningServer, running_server
from upload_helpers import files_field

from models.preprocess import preprocess
from models.registry import Registry
from service.inference import Classifier

httpclient = pytest.importorskip(
    "tritonclient.http", reason="the dev extra's tritonclient[http] is not installed"
)
from tritonclient.utils import InferenceServerException  # noqa: E402

MODEL = "wbc-test"


@pytest.fixture(scope="module")
def server(registry_root: Path) -> Iterator[RunningServer]:
    with running_server(registry_root, MODEL) as running:
        yield running


@pytest.fixture(scope="module")
def triton(server: RunningServer) -> Iterator["httpclient.InferenceServerClient"]:
    client = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    yield client
    client.close()


@pytest.fixture(scope="module")
def classifier(registry_root: Path) -> Classifier:
    return Classifier(Registry(registry_root, MODEL).latest().onnx_path)


def test_health_and_metadata(triton, classifier: Classifier) -> None:
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.get_server_metadata()["extensions"] == ["binary_tensor_data"]
    assert triton.is_model_ready(MODEL) and triton.is_model_ready(MODEL, "1")
    assert not triton.is_model_ready(MODEL, "7") and not triton.is_model_ready("other-model")
    meta = triton.get_model_metadata(MODEL, "1")
    s = classifier.contract.input_size
    assert meta["versions"] == ["1"]
    assert {i["name"]: (i["datatype"], i["shape"]) for i in meta["inputs"]} == {
        "input": ("FP32", [-1, 3, s, s]),
        "image": ("BYTES", [-1]),
    }
    assert meta["parameters"]["classes"] == list(classifier.contract.class_names)
    assert meta["parameters"]["provider"] == "CPUExecutionProvider"


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_fp32_tensors_in_probabilities_out(
    triton, classifier: Classifier, cell_images: dict[str, bytes], binary: bool
) -> None:
    batch = np.stack(
        [preprocess(Image.open(io.BytesIO(d)), classifier.contract) for d in cell_images.values()]
    )
    tensor = httpclient.InferInput("input", list(batch.shape), "FP32")
    tensor.set_data_from_numpy(batch, binary_data=binary)
    outputs = [
        httpclient.InferRequestedOutput(name, binary_data=binary) for name in ("probabilities", "label")
    ]
    result = triton.infer(MODEL, [tensor], outputs=outputs, request_id="r-1")
    probs = result.as_numpy("probabilities")
    np.testing.assert_allclose(probs, classifier.probabilities(batch), atol=1e-5)
    labels = [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy("label")]
    assert labels == [p.label for p in classifier.predict(batch)]
    assert result.get_response()["id"] == "r-1" and result.get_response()["model_version"] == "1"


def test_encoded_images_as_bytes_match_v1(
    server: RunningServer, triton, cell_images: dict[str, bytes]
) -> None:
    data = list(cell_images.values())
    images = httpclient.InferInput("image", [len(data)], "BYTES")
    images.set_data_from_numpy(np.array(data, dtype=np.object_))
    result = triton.infer(MODEL, [images], model_version="1")  # no outputs named: all of them, binary
    v1 = httpx.post(f"{server.url}/v1/classify", files=files_field(*cell_images.items()), timeout=30).json()
    assert [label.decode() for label in result.as_numpy("label")] == [r["label"] for r in v1["results"]]
    for row, answer in zip(result.as_numpy("probabilities"), v1["results"]):
        np.testing.assert_allclose(row, list(answer["probabilities"].values()), atol=1e-6)


@pytest.mark.parametrize(
    "name, version, make, words",
    [
        ("other-model", "", lambda: ("input", np.zeros((1, 3, 64, 64), np.float32), "FP32"), "unknown model"),
        (
            MODEL,
            "9",
            lambda: ("input", np.zeros((1, 3, 64, 64), np.float32), "FP32"),
            "version '9' is not served",
        ),
        (MODEL, "", lambda: ("input", np.zeros((1, 3, 32, 32), np.float32), "FP32"), "[N, 3, 64, 64]"),
        (
            MODEL,
            "",
            lambda: ("pixels", np.zeros((1, 3, 64, 64), np.float32), "FP32"),
            "unknown input 'pixels'",
        ),
        (MODEL, "", lambda: ("image", np.array([b"not an image"], np.object_), "BYTES"), "unsupported_type"),
    ],
    ids=["model", "version", "shape", "input-name", "bad-image"],
)
def test_errors_reach_the_client(triton, name: str, version: str, make, words: str) -> None:
    input_name, array, datatype = make()
    tensor = httpclient.InferInput(input_name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    with pytest.raises(InferenceServerException, match=words.replace("[", r"\[").replace("]", r"\]")):
        triton.infer(name, [tensor], model_version=version)
