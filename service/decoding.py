"""Uploaded bytes → a fully decoded Pillow image, or a `DecodeError` that says what is wrong.

DICOM Part-10 files (recognised by their `DICM` magic) go to `service.dicom`; of everything else only
JPEG, PNG, BMP and TIFF are opened (Pillow is told so, so no other decoder ever sees the bytes).
The pixel count is checked from the header, before any pixel is decoded, so a small file that claims
a huge image (a decompression bomb) costs nothing. Every failure is a `DecodeError` with a stable
`code` for clients and metrics and a message a person can act on.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from service.dicom import DicomError, decode_dicom, is_dicom

SUPPORTED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "BMP", "TIFF")
SUPPORTED_TEXT = "JPEG, PNG, BMP, TIFF or DICOM"

# Leading bytes of formats people send by mistake, so the message can name what was sent.
_KNOWN_SIGNATURES: tuple[tuple[int, bytes, str], ...] = (
    (0, b"GIF87a", "a GIF image"),
    (0, b"GIF89a", "a GIF image"),
    (8, b"WEBP", "a WebP image"),
    (4, b"ftypheic", "a HEIC image"),
    (4, b"ftypavif", "an AVIF image"),
    (0, b"%PDF", "a PDF document"),
    (0, b"PK\x03\x04", "a ZIP archive"),
    (0, b"\x1f\x8b", "a gzip archive"),
    (0, b"\x00\x00\x00\x0cjP  ", "a JPEG 2000 image"),
)


# Leading bytes of the supported formats: such a file that Pillow cannot open is damaged, not foreign.
_SUPPORTED_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


class DecodeError(ValueError):
    """An upload that is not a usable image; `code` is stable, `message` explains."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def describe_unsupported(data: bytes) -> str:
    for offset, signature, name in _KNOWN_SIGNATURES:
        if data[offset : offset + len(signature)] == signature:
            return f"{name}, which is not supported; send {SUPPORTED_TEXT}"
    if _looks_like_text(data[:512]):
        return f"text, not an image; send {SUPPORTED_TEXT}"
    return f"not a {SUPPORTED_TEXT} image"


def _looks_like_text(head: bytes) -> bool:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(ch.isprintable() or ch in "\r\n\t" for ch in text)


@dataclass(frozen=True)
class DecodedUpload:
    image: Image.Image
    format: str  # JPEG | PNG | BMP | TIFF | DICOM
    sop_instance_uid: str | None = None  # DICOM only: answered beside the prediction


def decode_upload(data: bytes, *, max_pixels: int) -> DecodedUpload:
    """An image file or a DICOM file → the decoded image and what identifies it."""
    if is_dicom(data):
        try:
            dicom = decode_dicom(data, max_pixels=max_pixels)
        except DicomError as exc:
            raise DecodeError(exc.code, exc.message) from None
        return DecodedUpload(dicom.image, "DICOM", dicom.sop_instance_uid)
    image = decode_image(data, max_pixels=max_pixels)
    return DecodedUpload(image, str(image.format))


def decode_image(data: bytes, *, max_pixels: int) -> Image.Image:
    """Open and fully decode `data` (first frame of a multi-page TIFF); raise DecodeError if unusable.
    For DICOM as well, use `decode_upload`."""
    if not data:
        raise DecodeError("empty", "the file is empty (0 bytes)")
    try:
        # Pillow itself raises above 2 x Image.MAX_IMAGE_PIXELS; our own limit is checked below.
        image = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise DecodeError("too_many_pixels", f"image too large to decode: {exc}") from None
    except UnidentifiedImageError:
        claimed = next((name for sig, name in _SUPPORTED_SIGNATURES if data.startswith(sig)), None)
        if claimed and not _looks_like_text(data[:512]):
            raise DecodeError(
                "corrupt", f"starts like a {claimed} file but its header is cut off or damaged ({len(data)} bytes)"
            ) from None
        raise DecodeError("unsupported_type", describe_unsupported(data)) from None
    except Exception as exc:  # a header Pillow recognised but could not parse
        raise DecodeError("corrupt", f"{SUPPORTED_TEXT} header could not be read: {exc}") from None

    width, height = image.size
    if width < 1 or height < 1:
        raise DecodeError("corrupt", f"{image.format} image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise DecodeError(
            "too_many_pixels",
            f"{image.format} image is {width}x{height} = {width * height:,} pixels; "
            f"the limit is {max_pixels:,}",
        )
    try:
        image.load()
    except OSError as exc:
        # Pillow's wording for data that stops early: "image file is truncated", "broken data stream",
        # "Truncated File Read", "unrecognized data stream contents when reading image file".
        text = str(exc)
        if "truncat" in text.lower() or "broken data stream" in text or "unrecognized data stream" in text:
            raise DecodeError("truncated", f"{image.format} data ends early or is cut off ({text})") from None
        raise DecodeError("corrupt", f"{image.format} data could not be decoded ({text})") from None
    except Exception as exc:  # decoders raise ValueError, SyntaxError, struct.error … on malformed data
        raise DecodeError("corrupt", f"{image.format} data could not be decoded ({type(exc).__name__}: {exc})") from None
    return image
