"""DICOM Part-10 files → a Pillow image and the SOP Instance UID, or a `DecodeError` that says why not.

Accepted: VL Microscopic Image, VL Slide-Coordinates Microscopic Image and Secondary Capture (single- and
multi-frame; the first frame is classified), photometric RGB, YBR_FULL(_422) (converted to RGB),
MONOCHROME1 (inverted) or MONOCHROME2, 8 to 16 bits, in the uncompressed transfer syntaxes and JPEG
baseline / extended / lossless (pydicom's decoders with pylibjpeg).

Privacy: nothing from the dataset except the SOP Instance UID, the SOP class, the transfer syntax and
the geometry ever leaves this module: error messages carry no element values (pydicom's own exception
texts can quote them, so only their type is kept), and pydicom's value warnings are silenced.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass

import numpy as np
import pydicom
from PIL import Image
from pydicom import config as pydicom_config
from pydicom import uid
from pydicom.errors import InvalidDicomError
from pydicom.pixels import pixel_array

# Reading a value that breaks its VR's rules must not print the value (it may be a patient's name).
pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
logging.getLogger("pydicom").setLevel(logging.ERROR)

DICOM_MAGIC_OFFSET = 128
DICOM_MAGIC = b"DICM"

SOP_CLASSES: dict[str, str] = {
    uid.VLMicroscopicImageStorage: "VL Microscopic Image",
    uid.VLSlideCoordinatesMicroscopicImageStorage: "VL Slide-Coordinates Microscopic Image",
    uid.SecondaryCaptureImageStorage: "Secondary Capture Image",
    uid.MultiFrameTrueColorSecondaryCaptureImageStorage: "Multi-frame True Color Secondary Capture Image",
    uid.MultiFrameGrayscaleByteSecondaryCaptureImageStorage: "Multi-frame Grayscale Byte Secondary Capture",
    uid.MultiFrameGrayscaleWordSecondaryCaptureImageStorage: "Multi-frame Grayscale Word Secondary Capture",
}
TRANSFER_SYNTAXES: tuple[str, ...] = (
    uid.ImplicitVRLittleEndian,
    uid.ExplicitVRLittleEndian,
    uid.DeflatedExplicitVRLittleEndian,
    uid.ExplicitVRBigEndian,
    uid.JPEGBaseline8Bit,
    uid.JPEGExtended12Bit,
    uid.JPEGLossless,
    uid.JPEGLosslessSV1,
)
UNCOMPRESSED = TRANSFER_SYNTAXES[:4]
PHOTOMETRICS = ("RGB", "YBR_FULL", "YBR_FULL_422", "MONOCHROME1", "MONOCHROME2")


class DicomError(ValueError):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class DicomImage:
    image: Image.Image
    sop_instance_uid: str | None
    sop_class: str
    transfer_syntax: str


def is_dicom(data: bytes) -> bool:
    return data[DICOM_MAGIC_OFFSET : DICOM_MAGIC_OFFSET + 4] == DICOM_MAGIC


def _name(value: str) -> str:
    named = uid.UID(value)
    return f"{named.name} ({value})" if named.is_valid and named.name != value else value


def decode_dicom(data: bytes, *, max_pixels: int) -> DicomImage:
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
        sop_class = str(ds.file_meta.get("MediaStorageSOPClassUID", "") or ds.get("SOPClassUID", ""))
        syntax = str(ds.file_meta.get("TransferSyntaxUID", ""))
    except InvalidDicomError:
        raise DicomError("corrupt", "starts like a DICOM file but its header could not be read") from None
    except Exception as exc:  # truncated meta group, bad lengths …: the type says enough, values never
        raise DicomError("corrupt", f"DICOM header could not be read ({type(exc).__name__})") from None

    if sop_class not in SOP_CLASSES:
        accepted = ", ".join(SOP_CLASSES.values())
        raise DicomError(
            "unsupported_dicom",
            f"DICOM SOP class {_name(sop_class) or 'missing'} is not accepted; send one of: {accepted}",
        )
    if "PixelData" not in ds:
        raise DicomError(
            "no_pixel_data",
            f"DICOM {SOP_CLASSES[sop_class]} has no Pixel Data element (or the file is cut off before it)",
        )
    if syntax not in TRANSFER_SYNTAXES:
        raise DicomError(
            "unsupported_dicom",
            f"DICOM transfer syntax {_name(syntax) or 'missing'} is not "
            "supported; send uncompressed, JPEG baseline or JPEG lossless",
        )
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if photometric not in PHOTOMETRICS:
        raise DicomError(
            "unsupported_dicom",
            f"DICOM photometric interpretation {photometric or 'missing'!r} "
            f"is not supported; one of {', '.join(PHOTOMETRICS)}",
        )
    rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows < 1 or columns < 1:
        raise DicomError("corrupt", f"DICOM image has no pixels ({columns}x{rows})")
    if rows * columns > max_pixels:
        raise DicomError(
            "too_many_pixels",
            f"DICOM image is {columns}x{rows} = {rows * columns:,} pixels; the limit is {max_pixels:,}",
        )
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if syntax in UNCOMPRESSED:
        per_sample = (int(ds.get("BitsAllocated", 8) or 8) + 7) // 8
        expected = rows * columns * int(ds.get("SamplesPerPixel", 1) or 1) * per_sample * frames
        if len(ds.PixelData) < expected:
            raise DicomError(
                "truncated",
                f"DICOM pixel data holds {len(ds.PixelData):,} bytes; a {columns}x{rows} "
                f"image needs {expected:,} (the file is cut off)",
            )
    try:
        arr = pixel_array(ds, index=0 if frames > 1 else None)  # YBR is converted to RGB by default
    except Exception as exc:  # a decoder that is missing or fails on damaged data
        raise DicomError(
            "corrupt", f"DICOM pixel data ({_name(syntax)}) could not be decoded ({type(exc).__name__})"
        ) from None
    image = _to_image(arr, photometric, int(ds.get("BitsStored", 8) or 8))
    sop_instance = ds.get("SOPInstanceUID")
    return DicomImage(image, str(sop_instance) if sop_instance else None, SOP_CLASSES[sop_class], syntax)


def _to_image(arr: np.ndarray, photometric: str, bits_stored: int) -> Image.Image:
    """8-bit RGB or L; deeper data scaled by its stored bit depth (not min-max: a flat image stays flat)."""
    if arr.dtype != np.uint8:
        top = float(2 ** min(max(bits_stored, 1), 16) - 1)
        arr = np.clip(arr.astype(np.float32) * (255.0 / top), 0, 255).round().astype(np.uint8)
    if photometric == "MONOCHROME1":  # 0 is white
        arr = 255 - arr
    if arr.ndim == 3 and arr.shape[-1] == 3:
        return Image.fromarray(np.ascontiguousarray(arr), "RGB")
    if arr.ndim == 2:
        return Image.fromarray(np.ascontiguousarray(arr), "L")
    raise DicomError("unsupported_dicom", f"DICOM pixel array of shape {arr.shape} is not one image")
