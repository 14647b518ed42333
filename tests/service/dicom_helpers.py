"""Build DICOM Part-10 files from real cell images in memory (never stored in the repository).

JPEG baseline frames come from Pillow; JPEG lossless (process 14, selection value 1) frames from the
small encoder below, since neither Pillow nor pydicom writes that syntax.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    SecondaryCaptureImageStorage,
    generate_uid,
)

PATIENT = {
    "PatientName": "Zyxwood^Janelle^Quintessa",
    "PatientID": "MRN-7781234",
    "PatientBirthDate": "19610214",
}


def make_dicom(
    image: Image.Image,
    *,
    sop_class: str = SecondaryCaptureImageStorage,
    syntax: str = ExplicitVRLittleEndian,
    photometric: str = "RGB",
    pixels: bool = True,
    bits: int = 8,
) -> tuple[bytes, str]:
    """A DICOM file of `image` (RGB, or MONOCHROME1/2 from its luminance) and its SOP Instance UID."""
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
    ds.Modality = "SM" if sop_class != SecondaryCaptureImageStorage else "OT"
    for key, value in PATIENT.items():
        setattr(ds, key, value)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()

    colour = photometric in ("RGB", "YBR_FULL_422")
    arr = np.asarray(image.convert("RGB" if colour else "L"))
    if photometric == "MONOCHROME1":
        arr = 255 - arr
    ds.Rows, ds.Columns = arr.shape[:2]
    ds.SamplesPerPixel = 3 if colour else 1
    ds.PhotometricInterpretation = photometric
    if colour:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = 16 if bits > 8 else 8
    ds.BitsStored = ds.HighBit = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    if pixels:
        if syntax == JPEGBaseline8Bit:
            out = io.BytesIO()
            Image.fromarray(arr).save(out, "JPEG", quality=95)  # Pillow writes YCbCr 4:2:0 for RGB
            ds.PixelData = encapsulate([out.getvalue()])
        elif syntax == JPEGLosslessSV1:
            ds.PixelData = encapsulate([lossless_jpeg(arr)])
        else:
            data = arr.astype(np.uint16) << (bits - 8) if bits > 8 else arr
            ds.PixelData = np.ascontiguousarray(data).tobytes()
        if syntax in (JPEGBaseline8Bit, JPEGLosslessSV1):
            ds["PixelData"].is_undefined_length = True
            ds["PixelData"].VR = "OB"
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue(), sop_uid


# ---- a minimal lossless JPEG (ITU T.81 process 14, predictor 1) encoder ------------------------------------
# The standard luminance DC Huffman table covers categories 0..11; 8-bit differences need at most 9.
_DC_BITS = [0, 1, 5, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0]
_DC_VALUES = list(range(12))


def _huffman_codes() -> dict[int, tuple[int, int]]:
    codes, code, k = {}, 0, 0
    for length, count in enumerate(_DC_BITS, start=1):
        for _ in range(count):
            codes[_DC_VALUES[k]] = (code, length)
            code += 1
            k += 1
        code <<= 1
    return codes


def lossless_jpeg(arr: np.ndarray) -> bytes:
    """(H, W) or (H, W, 3) uint8 → a lossless JPEG bitstream (SOF3, selection value 1, Pt 0)."""
    planes = arr[..., None] if arr.ndim == 2 else arr
    h, w, nc = planes.shape
    x = planes.astype(np.int32)
    pred = np.empty_like(x)
    pred[0, 0] = 128
    pred[0, 1:] = x[0, :-1]
    pred[1:, 0] = x[:-1, 0]
    pred[1:, 1:] = x[1:, :-1]  # predictor 1: the left neighbour
    diff = (x - pred).reshape(-1)  # interleaved: for each pixel, each component

    codes = _huffman_codes()
    bits: list[str] = []
    for d in diff.tolist():
        size = abs(d).bit_length()
        code, length = codes[size]
        bits.append(format(code, f"0{length}b"))
        if size:
            bits.append(format(d if d > 0 else d + (1 << size) - 1, f"0{size}b"))
    stream = "".join(bits)
    stream += "1" * (-len(stream) % 8)
    payload = bytearray()
    for i in range(0, len(stream), 8):
        byte = int(stream[i : i + 8], 2)
        payload.append(byte)
        if byte == 0xFF:
            payload.append(0x00)  # byte stuffing

    def segment(marker: int, body: bytes) -> bytes:
        return bytes([0xFF, marker]) + (len(body) + 2).to_bytes(2, "big") + body

    sof = bytes([8]) + h.to_bytes(2, "big") + w.to_bytes(2, "big") + bytes([nc])
    sof += b"".join(bytes([c + 1, 0x11, 0]) for c in range(nc))
    dht = bytes([0x00]) + bytes(_DC_BITS) + bytes(_DC_VALUES)
    sos = bytes([nc]) + b"".join(bytes([c + 1, 0x00]) for c in range(nc)) + bytes([1, 0, 0])
    return (
        b"\xff\xd8"
        + segment(0xC3, sof)
        + segment(0xC4, dht)
        + segment(0xDA, sos)
        + bytes(payload)
        + b"\xff\xd9"
    )
