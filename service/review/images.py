"""Classified images kept at the site, content-addressed: `<root>/<sha256[:2]>/<sha256><ext>`.

The bytes are kept exactly as the laboratory system sent them; the same image sent twice is stored once.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from models.registry import write_atomic

# Leading bytes → (extension, media type). Formats a browser cannot show are converted when served.
_SIGNATURES: tuple[tuple[int, bytes, str, str], ...] = (
    (0, b"\xff\xd8\xff", ".jpg", "image/jpeg"),
    (0, b"\x89PNG\r\n\x1a\n", ".png", "image/png"),
    (0, b"BM", ".bmp", "image/bmp"),
    (0, b"II*\x00", ".tif", "image/tiff"),
    (0, b"MM\x00*", ".tif", "image/tiff"),
    (128, b"DICM", ".dcm", "application/dicom"),
)
BROWSER_TYPES = ("image/jpeg", "image/png")
TRAINING_TYPES = ("image/jpeg", "image/png", "image/bmp", "image/tiff")  # what Pillow opens for training


def sniff(data: bytes) -> tuple[str, str]:
    """(extension, media type) from the leading bytes."""
    for offset, signature, ext, media_type in _SIGNATURES:
        if data[offset : offset + len(signature)] == signature:
            return ext, media_type
    return ".bin", "application/octet-stream"


class ImageStore:
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()

    def put(self, data: bytes) -> tuple[str, str, str]:
        """Store `data`; returns (path relative to the root, sha256, media type)."""
        digest = hashlib.sha256(data).hexdigest()
        ext, media_type = sniff(data)
        relative = f"{digest[:2]}/{digest}{ext}"
        path = self.root / relative
        if not path.is_file() or path.stat().st_size != len(data):
            write_atomic(path, data)
        return relative, digest, media_type

    def path(self, relative: str) -> Path:
        path = (self.root / relative).resolve()
        if not path.is_relative_to(self.root):
            raise ValueError(f"{relative!r} is outside the image store")
        return path

    def read(self, relative: str) -> bytes:
        return self.path(relative).read_bytes()
