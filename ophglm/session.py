"""Where a conversation's photographs and tool outputs live.

Images enter a session once and are referred to by `image_id` (a content hash): tools
receive that id, never a path or pixels from the LLM, so a model cannot make a tool read
an arbitrary file. Artifacts (overlays) and findings stay here, out of the prompt.
"""

from __future__ import annotations

import hashlib
import io
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, UnidentifiedImageError

MIN_SIDE = 64
MAX_PIXELS = 40_000_000  # above a 4288x2848 IDRiD photograph with margin; stops decompression bombs


class ImageError(ValueError):
    """A photograph that cannot be used, with a message naming the problem.

    `kind` says which problem, so the HTTP API can answer 415 / 413 / 400 without
    decoding the upload a second time: "not_image", "too_large" or "unusable".
    """

    def __init__(self, message: str, kind: str = "unusable"):
        super().__init__(message)
        self.kind = kind


def decode_image(data: bytes, name: str = "image", max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode bytes to an 8-bit RGB image, or raise ImageError saying what is wrong."""
    if not data:
        raise ImageError(f"{name} is empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as probe:
            width, height = probe.size
            kind = probe.format
    except UnidentifiedImageError:
        raise ImageError(f"{name} is not an image file Pillow can read (JPEG, PNG, TIFF, ...)", "not_image") from None
    except Image.DecompressionBombError:  # Pillow's own guard, far above ours: still a size problem
        raise ImageError(f"{name} has more pixels than the limit of {max_pixels:,}", "too_large") from None
    if width * height > max_pixels:
        raise ImageError(f"{name} is {width}x{height} pixels, above the limit of {max_pixels:,}", "too_large")
    if min(width, height) < MIN_SIDE:
        raise ImageError(f"{name} is {width}x{height} pixels; a fundus photograph needs at least {MIN_SIDE} px a side")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (OSError, SyntaxError) as err:
        raise ImageError(f"{name} is a damaged or truncated {kind} file ({err})") from None
    return _to_rgb8(image)


def _to_rgb8(image: Image.Image) -> Image.Image:
    # 16-bit and float modes would be clipped by a plain convert("RGB"): rescale them first.
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        span = float(array.max() - array.min()) or 1.0
        image = Image.fromarray(((array - array.min()) / span * 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def read_image_file(path: str | Path) -> tuple[Image.Image, bytes]:
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: no such file")
    if path.is_dir():
        raise ImageError(f"{path} is a folder, not an image file")
    data = path.read_bytes()
    return decode_image(data, name=str(path)), data


class Artifact:
    """A picture rendered the first time someone reads it (`bytes(artifact)`), once.

    The lesion overlay takes about 30 ms to draw and encode at 512 px (10-20% of the network's time), and most
    are never opened: the LLM never sees them, the person opens one on request.
    """

    def __init__(self, render: Callable[[], bytes]):
        self._render, self._data, self._lock = render, None, threading.Lock()

    def __bytes__(self) -> bytes:
        with self._lock:
            if self._data is None:
                self._data, self._render = self._render(), None  # the inputs it held (masks) can go
            return self._data


@dataclass
class Session:
    """One conversation: its images (by id), tool artifacts and findings."""

    images: dict[str, Image.Image] = field(default_factory=dict)
    artifacts: dict[str, bytes | Artifact] = field(default_factory=dict)  # read with bytes()
    findings: dict[str, dict] = field(default_factory=dict)
    # What tools computed from a photograph and other tools reuse, by (kind, image_id): the
    # quality gate's verdict, the lesion masks the disc measurement starts from.
    derived: dict[tuple[str, str], object] = field(default_factory=dict)
    # The gates run segment_lesions and measure_optic_disc at the same time: the second waits
    # for the first's masks instead of computing them again.
    _derive_locks: dict[tuple[str, str], threading.Lock] = field(default_factory=dict, repr=False)
    _guard: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def derive(self, kind: str, image_id: str, compute):
        """`compute()` once per photograph and kind, even across threads; later calls get the stored result."""
        key = (kind, image_id)
        with self._guard:
            lock = self._derive_locks.setdefault(key, threading.Lock())
        with lock:
            if key not in self.derived:
                self.derived[key] = compute()
        return self.derived[key]

    def add_image(self, image: Image.Image, data: bytes | None = None) -> str:
        """Store a decoded image and return its id (a hash of the file bytes, else of the pixels)."""
        # EXIF and other metadata (camera, date, sometimes location or patient fields) go no further.
        image.info.clear()
        digest = hashlib.sha256(data if data is not None else image.tobytes()).hexdigest()
        image_id = f"img-{digest[:12]}"
        self.images[image_id] = image
        return image_id

    def add_image_file(self, path: str | Path) -> str:
        image, data = read_image_file(path)
        return self.add_image(image, data)

    def image(self, image_id: str) -> Image.Image:
        if image_id not in self.images:
            known = ", ".join(self.images) or "none"
            raise KeyError(f"unknown image_id {image_id!r} (images in this session: {known})")
        return self.images[image_id]
