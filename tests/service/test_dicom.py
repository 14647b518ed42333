"""DICOM in: real cell images wrapped in DICOM files built here, through decoding and /v1/classify."""

import io
import re
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from dicom_helpers import PATIENT, make_dicom
from fastapi.testclient import TestClient
from PIL import Image
from pydicom.encaps import encapsulate
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    SecondaryCaptureImageStorage,
    VLMicroscopicImageStorage,
    VLSlideCoordinatesMicroscopicImageStorage,
)
from server_helpers import running_server
from upload_helpers import files_field

from service.decoding import DecodeError, decode_upload

CASES = [
    (VLMicroscopicImageStorage, ExplicitVRLittleEndian, "RGB"),
    (VLSlideCoordinatesMicroscopicImageStorage, ImplicitVRLittleEndian, "RGB"),
    (SecondaryCaptureImageStorage, JPEGBaseline8Bit, "YBR_FULL_422"),
    (VLMicroscopicImageStorage, JPEGLosslessSV1, "RGB"),
    (SecondaryCaptureImageStorage, JPEGLosslessSV1, "MONOCHROME2"),
    (SecondaryCaptureImageStorage, ExplicitVRLittleEndian, "MONOCHROME1"),
]


@pytest.fixture(scope="module")
def cell(jpeg_bytes: bytes) -> Image.Image:
    return Image.open(io.BytesIO(jpeg_bytes)).convert("RGB")


@pytest.mark.parametrize("sop_class, syntax, photometric", CASES, ids=lambda v: getattr(v, "name", v))
def test_dicom_pixels_match_the_image(
    cell: Image.Image, sop_class: str, syntax: str, photometric: str
) -> None:
    data, uid = make_dicom(cell, sop_class=sop_class, syntax=syntax, photometric=photometric)
    decoded = decode_upload(data, max_pixels=25_000_000)
    assert decoded.format == "DICOM" and decoded.sop_instance_uid == uid
    colour = photometric in ("RGB", "YBR_FULL_422")
    expected = np.asarray(cell if colour else cell.convert("L"), dtype=np.int16)
    error = np.abs(np.asarray(decoded.image, dtype=np.int16) - expected).mean()
    assert error < (2.0 if syntax == JPEGBaseline8Bit else 1e-9)  # lossy only for baseline


def test_twelve_bit_monochrome_is_scaled_by_its_depth(cell: Image.Image) -> None:
    data, _ = make_dicom(cell, photometric="MONOCHROME2", bits=12)
    image = decode_upload(data, max_pixels=25_000_000).image
    assert (
        np.abs(np.asarray(image, dtype=np.int16) - np.asarray(cell.convert("L"), dtype=np.int16)).max() <= 1
    )


def test_classify_answers_with_the_sop_instance_uid(client: TestClient, cell: Image.Image) -> None:
    lossless, uid = make_dicom(cell, sop_class=VLMicroscopicImageStorage, syntax=JPEGLosslessSV1)
    png = io.BytesIO()
    cell.save(png, "PNG")
    response = client.post(
        "/v1/classify", files=files_field(("cell.dcm", lossless), ("cell.png", png.getvalue()))
    )
    assert response.status_code == 200
    from_dicom, from_png = response.json()["results"]
    assert from_dicom["sop_instance_uid"] == uid and "sop_instance_uid" not in from_png
    # The same pixels give the same answer whichever container they came in.
    assert from_dicom["label"] == from_png["label"]
    for name, p in from_png["probabilities"].items():
        assert from_dicom["probabilities"][name] == pytest.approx(p, abs=1e-6)


def _error(data: bytes) -> DecodeError:
    with pytest.raises(DecodeError) as info:
        decode_upload(data, max_pixels=25_000_000)
    return info.value


def _jpeg2000(cell: Image.Image) -> bytes:
    """A well-formed file in a syntax the service does not take (the codestream itself is a stub)."""
    ds = pydicom.dcmread(io.BytesIO(make_dicom(cell)[0]))
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(64)])
    ds["PixelData"].VR, ds["PixelData"].is_undefined_length = "OB", True
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


@pytest.mark.parametrize(
    "make, code, words",
    [
        (lambda c: make_dicom(c, pixels=False)[0], "no_pixel_data", "no Pixel Data"),
        (lambda c: make_dicom(c, sop_class=CTImageStorage)[0], "unsupported_dicom", "CT Image Storage"),
        (_jpeg2000, "unsupported_dicom", "JPEG 2000"),
        (lambda c: make_dicom(c)[0][:-5000], "truncated", "cut off"),
    ],
    ids=["no-pixels", "ct-sop-class", "jpeg2000", "cut-short"],
)
def test_unusable_dicom_is_a_clear_4xx(
    client: TestClient, cell: Image.Image, make, code: str, words: str
) -> None:
    data = make(cell)
    err = _error(data)
    assert err.code == code and words in err.message
    response = client.post("/v1/classify", files=files_field(("bad.dcm", data)))
    assert response.status_code == 422
    assert response.json()["errors"][0]["error"]["code"] == code


def test_no_patient_attribute_reaches_logs_or_metrics(registry_root: Path, cell: Image.Image) -> None:
    """Debug logging on, good and bad DICOM files sent: the patient's name, ID and birth date appear
    nowhere in what the process printed, nor in /metrics."""
    uploads = [
        make_dicom(cell, syntax=JPEGBaseline8Bit, photometric="YBR_FULL_422")[0],
        make_dicom(cell, pixels=False)[0],
        make_dicom(cell, sop_class=CTImageStorage)[0],
        _jpeg2000(cell),
        make_dicom(cell)[0][:-5000],
    ]
    with running_server(registry_root, "wbc-test", log_level="debug") as server:
        response = httpx.post(
            f"{server.url}/v1/classify",
            files=files_field(*((f"f{i}.dcm", d) for i, d in enumerate(uploads))),
            timeout=30,
        )
        assert response.status_code == 207
        answered = response.text
        metrics = httpx.get(f"{server.url}/metrics").text
        log = server.log()
    assert "POST /v1/classify" in log  # the log was captured
    for value in PATIENT.values():
        for part in re.split(r"\^", value):
            for where, text in (("log", log), ("metrics", metrics), ("answer", answered)):
                assert part not in text, f"{part!r} appeared in the {where}"
