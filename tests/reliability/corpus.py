"""The bad-input corpus, generated in memory from one real cell crop (nothing binary is committed).

Each `Case` is one uploaded file and the answers it may get: "ok" (classified) or one of the service's
per-file error codes (service.routes.classify.FileErrorInfo). Where the honest answer depends on the
decoder (a JPEG missing only its end marker still decodes), more than one outcome is allowed; what is
never allowed is a 5xx, a crash or an answer without a named reason.
"""

from __future__ import annotations

import gzip
import io
import random
import struct
import zipfile
import zlib
from dataclasses import dataclass

import numpy as np
import pydicom
from dicom_helpers import make_dicom
from PIL import Image
from pydicom.encaps import encapsulate
from pydicom.uid import CTImageStorage, JPEG2000Lossless, JPEGBaseline8Bit

OK = "ok"
HUGE_SIDE = 50_000  # 50k x 50k = 2.5e9 pixels: 7.5 GB as RGB if anyone decoded it


@dataclass(frozen=True)
class Case:
    name: str  # also the uploaded file name
    group: str  # truncated | bomb | mode | animated | non-image | dicom | ...
    data: bytes
    expect: frozenset[str]  # "ok" and/or per-file error codes

    def allows(self, outcome: str) -> bool:
        return outcome in self.expect


def _case(name: str, group: str, data: bytes, *expect: str) -> Case:
    return Case(name, group, data, frozenset(expect))


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


# ---- hand-built containers (what no encoder writes: headers that lie) --------------------------------------
def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_raw(
    width: int,
    height: int,
    bit_depth: int,
    colour_type: int,
    rows: bytes | None,
    extra_chunks: list[tuple[bytes, bytes]] = (),
) -> bytes:
    """A PNG from raw scanlines (filter byte 0 prepended per row by the caller's `rows`), or with an IDAT
    that holds almost nothing when `rows` is None (a header that claims more than the file carries)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    idat = zlib.compress(rows if rows is not None else b"\x00" * 16, 9)
    chunks = [
        _png_chunk(b"IHDR", ihdr),
        *(_png_chunk(k, p) for k, p in extra_chunks),
        _png_chunk(b"IDAT", idat),
        _png_chunk(b"IEND", b""),
    ]
    return b"\x89PNG\r\n\x1a\n" + b"".join(chunks)


def png_zero_bomb(side: int) -> bytes:
    """A real, valid grayscale PNG of side x side zeros: ~side²/1000 bytes on disk, side² bytes decoded."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (side + 1)
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def jpeg_with_size(jpeg: bytes, width: int, height: int) -> bytes:
    """A real JPEG whose frame header (SOF0/SOF2) is rewritten to claim width x height."""
    data = bytearray(jpeg)
    for marker in (b"\xff\xc0", b"\xff\xc2"):
        at = data.find(marker)
        if at >= 0:
            data[at + 5 : at + 9] = struct.pack(">HH", height, width)
            return bytes(data)
    raise ValueError("no SOF0/SOF2 marker in the JPEG")


def tiff_header_only(width: int, height: int) -> bytes:
    """A little-endian baseline TIFF whose one IFD claims width x height 8-bit grey pixels in one strip
    of 16 bytes (the rest of the image is simply not there)."""
    entries = [
        (256, 4, 1, width),  # ImageWidth (LONG)
        (257, 4, 1, height),  # ImageLength
        (258, 3, 1, 8),  # BitsPerSample
        (259, 3, 1, 1),  # Compression: none
        (262, 3, 1, 1),  # Photometric: black is zero
        (273, 4, 1, 0),  # StripOffsets (patched below)
        (277, 3, 1, 1),  # SamplesPerPixel
        (278, 4, 1, height),  # RowsPerStrip
        (279, 4, 1, 16),  # StripByteCounts
    ]
    ifd_offset = 8
    data_offset = ifd_offset + 2 + 12 * len(entries) + 4
    ifd = struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        value = data_offset if tag == 273 else value
        packed = struct.pack("<I", value) if kind == 4 else struct.pack("<HH", value, 0)
        ifd += struct.pack("<HHI", tag, kind, count) + packed
    return b"II*\x00" + struct.pack("<I", ifd_offset) + ifd + struct.pack("<I", 0) + bytes(16)


def bmp_header_only(width: int, height: int) -> bytes:
    """A 24-bit BMP whose header claims width x height and carries 16 bytes of pixels."""
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + 40 + 16, 0, 0, 14 + 40) + info + bytes(16)


def dicom_claiming(cell: Image.Image, rows: int, columns: int) -> bytes:
    """A DICOM Secondary Capture with the cell's pixels but Rows/Columns rewritten to a huge image."""
    ds = pydicom.dcmread(io.BytesIO(make_dicom(cell)[0]))
    ds.Rows, ds.Columns = rows, columns
    return _save(ds)


def dicom_jpeg2000(cell: Image.Image) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(make_dicom(cell)[0]))
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(64)])
    ds["PixelData"].VR, ds["PixelData"].is_undefined_length = "OB", True
    return _save(ds)


def dicom_photometric(cell: Image.Image, photometric: str) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(make_dicom(cell)[0]))
    ds.PhotometricInterpretation = photometric
    return _save(ds)


def dicom_damaged_jpeg(cell: Image.Image) -> bytes:
    """JPEG baseline transfer syntax whose frame is cut to a third: the decoder itself has to fail."""
    ds = pydicom.dcmread(io.BytesIO(make_dicom(cell, syntax=JPEGBaseline8Bit, photometric="YBR_FULL_422")[0]))
    frame = encode(cell, "JPEG", quality=90)
    ds.PixelData = encapsulate([frame[: len(frame) // 3]])
    ds["PixelData"].VR, ds["PixelData"].is_undefined_length = "OB", True
    return _save(ds)


def _save(ds: pydicom.Dataset) -> bytes:
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def animated_gif(cell: Image.Image) -> bytes:
    frames = [cell.rotate(angle) for angle in (0, 90, 180)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def animated_png(cell: Image.Image) -> bytes:
    frames = [cell.rotate(angle) for angle in (0, 90, 180)]
    return encode(frames[0], "PNG", save_all=True, append_images=frames[1:], duration=100, loop=0)


def multipage_tiff(cell: Image.Image) -> bytes:
    return encode(cell, "TIFF", save_all=True, append_images=[cell.rotate(90), cell.convert("L")])


def sixteen_bit_rgb_png(cell: Image.Image) -> bytes:
    """48-bit RGB PNG (Pillow reads it, but cannot write it)."""
    arr = np.asarray(cell, dtype=np.uint16) * 257
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in arr)
    return png_raw(cell.width, cell.height, 16, 2, rows)


def zip_of(data: bytes) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr("cell.jpg", data)
    return out.getvalue()


# ---- the corpus ---------------------------------------------------------------------------------------------
def build_corpus(jpeg: bytes, png: bytes, seed: int = 0) -> list[Case]:
    """Every bad (and every odd but valid) input the service must answer without a 5xx."""
    cell = Image.open(io.BytesIO(jpeg)).convert("RGB")
    rng = random.Random(seed)
    bad_image = ("truncated", "corrupt")
    cases: list[Case] = [
        _case("zero-bytes.jpg", "empty", b"", "empty"),
        _case("one-byte.jpg", "truncated", b"\xff", "unsupported_type", "corrupt"),
    ]
    # Truncated: every supported container cut at several points (decoders differ on where they notice).
    containers = {
        "jpg": jpeg,
        "png": png,
        "bmp": encode(cell, "BMP"),
        "tif": encode(cell, "TIFF"),
        "lzw.tif": encode(cell, "TIFF", compression="tiff_lzw"),
    }
    for ext, data in containers.items():
        for fraction in (0.02, 0.3, 0.7, 0.98):
            cut = data[: max(8, int(len(data) * fraction))]
            # A JPEG or LZW TIFF missing only its last bytes may still decode (libjpeg pads the tail).
            allowed = (*bad_image, OK) if fraction > 0.9 else bad_image
            cases.append(_case(f"cut-{int(fraction * 100)}pct.{ext}", "truncated", cut, *allowed))
    # Random bytes flipped inside real images: anything may happen except a 5xx.
    for i in range(6):
        data = bytearray(rng.choice(list(containers.values())))
        for _ in range(rng.randint(4, 40)):
            data[rng.randrange(16, len(data))] = rng.randrange(256)
        cases.append(_case(f"flipped-{i}.bin", "corrupt", bytes(data), OK, *bad_image, "unprocessable"))

    # Decompression bombs and lying headers: refused from the header, before any pixel is decoded.
    bombs = [
        ("bomb-header-50k.png", png_raw(HUGE_SIDE, HUGE_SIDE, 8, 2, None)),
        ("bomb-header-50k.jpg", jpeg_with_size(jpeg, HUGE_SIDE, HUGE_SIDE)),
        ("bomb-header-65k.jpg", jpeg_with_size(jpeg, 65_500, 65_500)),
        ("bomb-header-50k.tif", tiff_header_only(HUGE_SIDE, HUGE_SIDE)),
        ("bomb-header-50k.bmp", bmp_header_only(HUGE_SIDE, HUGE_SIDE)),
        ("bomb-zlib-8k.png", png_zero_bomb(8_000)),  # valid: 64 MB of zeros in ~70 kB
        ("bomb-wide-1px.png", png_raw(30_000_000, 1, 8, 0, None)),
    ]
    cases += [_case(name, "bomb", data, "too_many_pixels") for name, data in bombs]
    cases.append(
        _case("bomb-header-50k.dcm", "bomb", dicom_claiming(cell, HUGE_SIDE, HUGE_SIDE), "too_many_pixels")
    )
    # Text chunks that inflate to 100 MB (Pillow caps text chunks; the image itself is fine).
    text_bomb = zlib.compress(b"\x00" * 100_000_000, 9)
    cases.append(
        _case(
            "bomb-ztxt.png",
            "bomb",
            png_raw(
                8,
                8,
                8,
                0,
                b"".join(b"\x00" + bytes(8) for _ in range(8)),
                [(b"zTXt", b"comment\x00\x00" + text_bomb)],
            ),
            OK,
            "corrupt",
        )
    )
    cases.append(
        _case(
            "bomb-iccp.png",
            "bomb",
            png_raw(
                8,
                8,
                8,
                0,
                b"".join(b"\x00" + bytes(8) for _ in range(8)),
                [(b"iCCP", b"profile\x00\x00" + text_bomb)],
            ),
            OK,
            "corrupt",
        )
    )

    # Valid images in every mode a lab system might send: classified, never a 5xx.
    modes: list[tuple[str, bytes]] = [
        ("gray.jpg", encode(cell.convert("L"), "JPEG")),
        ("gray.png", encode(cell.convert("L"), "PNG")),
        ("bilevel.png", encode(cell.convert("1"), "PNG")),
        ("bilevel.tif", encode(cell.convert("1"), "TIFF")),
        ("palette.png", encode(cell.convert("P"), "PNG")),
        ("palette.bmp", encode(cell.convert("P"), "BMP")),
        ("palette-transparent.png", encode(cell.convert("P"), "PNG", transparency=0)),
        ("alpha.png", encode(cell.convert("RGBA"), "PNG")),
        ("gray-alpha.png", encode(cell.convert("LA"), "PNG")),
        ("alpha.tif", encode(cell.convert("RGBA"), "TIFF")),
        ("cmyk.jpg", encode(cell.convert("CMYK"), "JPEG")),
        ("cmyk.tif", encode(cell.convert("CMYK"), "TIFF")),
        ("ycbcr.tif", encode(cell.convert("YCbCr"), "TIFF")),
        ("lab.tif", encode(cell.convert("LAB"), "TIFF")),
        ("gray16.png", encode(cell.convert("L").convert("I;16"), "PNG")),
        ("gray16.tif", encode(cell.convert("L").convert("I;16"), "TIFF")),
        ("rgb48.png", sixteen_bit_rgb_png(cell)),
        ("int32.tif", encode(cell.convert("I"), "TIFF")),
        ("float32.tif", encode(cell.convert("F"), "TIFF")),
        ("progressive.jpg", encode(cell, "JPEG", progressive=True)),
        ("animated.png", animated_png(cell)),
        ("multipage.tif", multipage_tiff(cell)),
        ("one-pixel.png", encode(cell.resize((1, 1)), "PNG")),
        ("one-row.png", encode(cell.resize((2000, 1)), "PNG")),
    ]
    cases += [_case(name, "mode", data, OK) for name, data in modes]
    # A mode Pillow opens but the contract's preprocessing may not handle: a named error at worst.
    cases.append(_case("palette-alpha.tif", "mode", encode(cell.convert("PA"), "TIFF"), OK, "unprocessable"))

    # Not images, or images of a kind the service does not take.
    webp = encode(cell, "WEBP") if _can_write("WEBP") else b"RIFF\x00\x00\x00\x00WEBPVP8 "
    foreign = [
        ("animated.gif", animated_gif(cell)),
        ("still.gif", encode(cell, "GIF")),
        ("cell.webp", webp),
        ("cell.heic", b"\x00\x00\x00\x18ftypheic" + bytes(64)),
        ("cell.jp2", b"\x00\x00\x00\x0cjP  \r\n\x87\n" + bytes(64)),
        ("report.pdf", b"%PDF-1.7\n1 0 obj\n<< /Type /Catalog >>\nendobj\n%%EOF\n"),
        ("images.zip", zip_of(jpeg)),
        ("image.jpg.gz", gzip.compress(jpeg)),
        ("program.elf", b"\x7fELF\x02\x01\x01" + bytes(57)),
        ("page.html", b"<html><script>alert(1)</script><img src=x onerror=alert(2)></html>"),
        ("result.json", b'{"label": "neutrophil", "confidence": 1.0}'),
        ("drawing.svg", b'<svg xmlns="http://www.w3.org/2000/svg"><circle r="4"/></svg>'),
        ("printout.eps", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"),
        ("layers.psd", b"8BPS\x00\x01" + bytes(64)),
        ("random.bin", rng.randbytes(4096)),
        ("utf16.txt", "white cell".encode("utf-16")),
    ]
    cases += [_case(name, "non-image", data, "unsupported_type") for name, data in foreign]

    # DICOM the service does not take, and DICOM that is damaged.
    dicom_cases = [
        ("no-pixels.dcm", make_dicom(cell, pixels=False)[0], ("no_pixel_data",)),
        ("jpeg2000.dcm", dicom_jpeg2000(cell), ("unsupported_dicom",)),
        ("ct.dcm", make_dicom(cell, sop_class=CTImageStorage)[0], ("unsupported_dicom",)),
        ("palette.dcm", dicom_photometric(cell, "PALETTE COLOR"), ("unsupported_dicom",)),
        ("cut-short.dcm", make_dicom(cell)[0][:-5000], ("truncated",)),
        ("cut-in-header.dcm", make_dicom(cell)[0][:200], ("corrupt", "no_pixel_data")),
        ("magic-only.dcm", bytes(128) + b"DICM", ("corrupt", "unsupported_dicom")),
        ("damaged-jpeg.dcm", dicom_damaged_jpeg(cell), ("corrupt", OK)),
        ("zero-rows.dcm", dicom_claiming(cell, 0, 0), ("corrupt",)),
    ]
    cases += [_case(name, "dicom", data, *expect) for name, data, expect in dicom_cases]
    return cases


def _can_write(fmt: str) -> bool:
    from PIL import features

    return features.check(fmt.lower())
