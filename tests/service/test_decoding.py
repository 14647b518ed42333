import io

import pytest
from PIL import Image
from upload_helpers import png_header_only, reencode

from service.decoding import DecodeError, decode_image, decode_upload

LIMIT = 25_000_000


def error_of(data: bytes, max_pixels: int = LIMIT) -> DecodeError:
    with pytest.raises(DecodeError) as info:
        decode_upload(data, max_pixels=max_pixels)
    return info.value


@pytest.mark.parametrize("fmt, options", [("JPEG", {}), ("PNG", {}), ("BMP", {}), ("TIFF", {}),
                                          ("TIFF", {"compression": "tiff_lzw"})])
def test_supported_formats_decode_to_the_same_size(jpeg_bytes: bytes, fmt: str, options: dict) -> None:
    original = Image.open(io.BytesIO(jpeg_bytes))
    image = decode_image(reencode(jpeg_bytes, fmt, **options), max_pixels=LIMIT)
    assert image.format == fmt and image.size == original.size


def test_real_png_crop_decodes(png_bytes: bytes) -> None:
    assert decode_image(png_bytes, max_pixels=LIMIT).format == "PNG"


def test_empty_file() -> None:
    assert error_of(b"").code == "empty"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "BMP", "TIFF"])
def test_truncated_image_says_so(jpeg_bytes: bytes, fmt: str) -> None:
    data = reencode(jpeg_bytes, fmt)
    err = error_of(data[: len(data) // 2])
    assert err.code == "truncated" and fmt in err.message


def test_header_cut_short_is_corrupt_not_foreign(jpeg_bytes: bytes) -> None:
    err = error_of(jpeg_bytes[:20])
    assert err.code == "corrupt" and "JPEG" in err.message


@pytest.mark.parametrize(
    "data, words",
    [
        (b"patient,label\n1,neutrophil\n", "text"),
        (b"GIF89a" + bytes(64), "GIF"),
        (b"RIFF\x00\x00\x00\x00WEBPVP8 " + bytes(32), "WebP"),
        (bytes(range(256)) * 4, "JPEG, PNG, BMP, TIFF or DICOM"),
    ],
)
def test_unsupported_types_are_named(data: bytes, words: str) -> None:
    err = error_of(data)
    assert err.code == "unsupported_type" and words in err.message


def test_real_image_over_pixel_limit(jpeg_bytes: bytes) -> None:
    err = error_of(jpeg_bytes, max_pixels=100)
    assert err.code == "too_many_pixels" and "limit is 100" in err.message


@pytest.mark.parametrize("side", [6_000, 100_000])  # over our limit; over Pillow's own bomb limit
def test_huge_header_is_refused_before_decoding(side: int) -> None:
    data = png_header_only(side, side)
    assert len(data) < 100
    assert error_of(data).code == "too_many_pixels"
