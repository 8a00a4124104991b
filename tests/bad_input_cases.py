"""The bad-input cases, shared by tests/test_bad_inputs.py and benchmarks/reliability.py.

Each upload case is bytes a person might send as a photograph, with the HTTP status the API
should answer and words its message must contain; the malformed bodies are whole requests.
"""

import io
import struct
import zlib

import numpy as np
from PIL import Image, ImageFilter

from ophglm.tools.non_fundus import non_fundus_images
from ophglm.tools.synthetic_fundus import make_synthetic_fundus


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims a huge size: a decompression bomb is refused from its header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(bytes(64))) + chunk(b"IEND", b"")


FUNDUS = make_synthetic_fundus(512, seed=11).image
FUNDUS_JPEG = _encode(FUNDUS, "JPEG", quality=90)
NON_FUNDUS = {f"{kind}-{i}": image for i, (kind, image) in enumerate(non_fundus_images(21, seed=5))}

# name -> (bytes, HTTP status, words in the message). Status 200: decodable, refused by the quality gate.
UNUSABLE = {
    "zero-bytes.jpg": (b"", 400, "is empty"),
    "text-named.jpg": (b"Patient notes: left eye blurry since Monday.", 415, "not an image file"),
    "pdf-named.jpg": (b"%PDF-1.7\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF", 415, "not an image file"),
    "html-named.png": (b"<html><body>not a photo</body></html>", 415, "not an image file"),
    "truncated.jpg": (FUNDUS_JPEG[: len(FUNDUS_JPEG) // 3], 400, "damaged or truncated"),
    "corrupt-middle.jpg": (FUNDUS_JPEG[:600] + bytes(len(FUNDUS_JPEG) - 1200) + FUNDUS_JPEG[-600:], None, ""),
    "header-only.png": (_encode(FUNDUS, "PNG")[:40], None, ""),
    "eight-by-eight.png": (_encode(Image.new("RGB", (8, 8), (200, 80, 30)), "PNG"), 400, "at least 64 px"),
    "one-row.png": (_encode(Image.new("RGB", (900, 1), (200, 80, 30)), "PNG"), 400, "at least 64 px"),
    "bomb.png": (_png_header(60_000, 60_000), 413, "than the limit"),
    "random-bytes.jpg": (np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes(), 415, "not an image file"),
    "jpeg-magic-then-junk.jpg": (b"\xff\xd8\xff\xe0" + bytes(2000), None, ""),
}
DECODABLE_NON_FUNDUS = {
    **{f"{name}.png": (_encode(image, "PNG"), 200, "not a colour fundus photograph") for name, image in NON_FUNDUS.items()},
    "greyscale-fundus.png": (_encode(FUNDUS.convert("L"), "PNG"), 200, "not a colour fundus photograph"),
    "sixteen-bit-grey.png": (_encode(Image.fromarray((np.asarray(FUNDUS.convert("L"), np.uint16) * 257)), "PNG"), 200, "not a colour fundus photograph"),
    "dark-fundus.jpg": (_encode(Image.fromarray((np.asarray(FUNDUS) * 0.08).astype(np.uint8)), "JPEG"), 200, "almost black"),
    "blurred-fundus.png": (_encode(FUNDUS.filter(ImageFilter.GaussianBlur(8)), "PNG"), 200, "ungradable"),
}
# Unusual encodings of a real-looking fundus: accepted and examined.
USABLE = {
    "cmyk.jpg": _encode(FUNDUS.convert("CMYK"), "JPEG"),
    "alpha.png": _encode(FUNDUS.convert("RGBA"), "PNG"),
    "palette.png": _encode(FUNDUS.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"),
    "progressive.jpg": _encode(FUNDUS, "JPEG", progressive=True),
    "webp.webp": _encode(FUNDUS, "WEBP"),
}
CASES = {**UNUSABLE, **DECODABLE_NON_FUNDUS}

# (body, content type, status): message requests that are not a usable multipart form.
MALFORMED_BODIES = [
    (b'{"text": "hello"', "application/json", 415),
    (b"message=hello", "application/x-www-form-urlencoded", 400),
    (b"--x\r\nContent-Disposition: form-data; name=\"text\"\r\n\r\n", "multipart/form-data; boundary=x", 400),
]
