"""Images that are not colour fundus photographs, for measuring the quality gate.

The gate must refuse what people actually upload by mistake: ordinary photographs (the
colour photographs bundled with scikit-image, cropped and rescaled), scanned documents and
screenshots, OCT-like greyscale B-scans, red-free (greyscale) fundus pictures, noise,
flat colours and test patterns. Everything is generated or read from an installed package,
so the measurement runs offline and anyone can rerun it.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ophglm.tools.synthetic_fundus import make_synthetic_fundus

SKIMAGE_PHOTOGRAPHS = ("astronaut", "cat", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
                       "colorwheel", "stereo_motorcycle", "camera", "moon", "coins", "page", "text", "clock", "brick", "grass", "gravel")


def _skimage_photographs() -> list[Image.Image]:
    import skimage.data

    images = []
    for name in SKIMAGE_PHOTOGRAPHS:
        array = getattr(skimage.data, name)()
        array = array[0] if isinstance(array, tuple) else array
        images.append(Image.fromarray(np.asarray(array, dtype=np.uint8)).convert("RGB"))
    return images


def _document(rng: np.random.Generator, size: int) -> Image.Image:
    page = Image.new("RGB", (size, int(size * 1.3)), tuple(int(v) for v in rng.integers(225, 256, 3)))
    draw = ImageDraw.Draw(page)
    y = 20
    while y < page.height - 20:
        words = " ".join("".join(chr(c) for c in rng.integers(97, 123, rng.integers(2, 9))) for _ in range(rng.integers(4, 12)))
        draw.text((20, y), words, fill=(20, 20, 20))
        y += int(rng.integers(12, 22))
    return page


def _screenshot(rng: np.random.Generator, size: int) -> Image.Image:
    shot = Image.new("RGB", (size, size * 3 // 4), tuple(int(v) for v in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(shot)
    for _ in range(rng.integers(5, 15)):
        x0, y0 = rng.integers(0, shot.width - 20), rng.integers(0, shot.height - 20)
        x1, y1 = x0 + rng.integers(10, shot.width // 2), y0 + rng.integers(10, shot.height // 3)
        draw.rectangle((int(x0), int(y0), int(x1), int(y1)), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        draw.text((int(x0) + 3, int(y0) + 3), "Button", fill=(0, 0, 0))
    return shot


def _oct_scan(rng: np.random.Generator, size: int) -> Image.Image:
    """A B-scan look-alike: bright wavy retinal layers over speckle on black, greyscale."""
    h, w = size // 2, size
    xx = np.arange(w)
    scan = rng.gamma(1.0, 8.0, (h, w))
    base = h * 0.4 + 15 * np.sin(xx / w * np.pi * rng.uniform(1, 3)) - 25 * np.exp(-(((xx - w / 2) / (w / 12)) ** 2))
    for depth, brightness in ((0, 160), (25, 90), (45, 120), (70, 200)):
        rows = (base + depth).astype(int)
        for t in range(6):
            scan[np.clip(rows + t, 0, h - 1), xx] += brightness * rng.uniform(0.6, 1.0, w)
    return Image.fromarray(np.clip(scan, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1)).convert("RGB")


def _noise(rng: np.random.Generator, size: int, kind: int) -> Image.Image:
    if kind == 0:
        array = rng.integers(0, 256, (size, size, 3))
    elif kind == 1:
        array = np.repeat(rng.normal(128, 50, (size, size, 1)), 3, axis=2)
    else:  # noise inside a black-framed disc: the aperture alone must not pass for a retina
        array = rng.integers(0, 256, (size, size, 3))
        yy, xx = np.ogrid[:size, :size]
        array[(yy - size / 2) ** 2 + (xx - size / 2) ** 2 > (0.45 * size) ** 2] = 0
    return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))


def _flat(rng: np.random.Generator, size: int, kind: int) -> Image.Image:
    if kind == 0:
        return Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 256, 3)))
    ramp = np.linspace(0, 255, size)[None, :, None] * rng.uniform(0.2, 1.0, 3)
    return Image.fromarray(np.broadcast_to(ramp, (size, size, 3)).astype(np.uint8))


def _red_free_fundus(seed: int, size: int) -> Image.Image:
    return make_synthetic_fundus(seed=seed, size=size).image.convert("L").convert("RGB")


def _crop(rng: np.random.Generator, image: Image.Image) -> Image.Image:
    w, h = image.size
    cw, ch = int(w * rng.uniform(0.5, 1.0)), int(h * rng.uniform(0.5, 1.0))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    out = image.crop((x, y, x + cw, y + ch))
    scale = rng.uniform(0.6, 1.6)
    return out.resize((max(64, int(cw * scale)), max(64, int(ch * scale))))


def non_fundus_images(count: int = 200, seed: int = 0) -> Iterator[tuple[str, Image.Image]]:
    """(kind, image) pairs cycling through every kind, deterministic for a seed."""
    rng = np.random.default_rng(seed)
    photographs = _skimage_photographs()
    makers = [
        ("photograph", lambda i: _crop(rng, photographs[i % len(photographs)]) if i >= len(photographs) else photographs[i]),
        ("document", lambda i: _document(rng, int(rng.integers(256, 640)))),
        ("screenshot", lambda i: _screenshot(rng, int(rng.integers(256, 800)))),
        ("oct_scan", lambda i: _oct_scan(rng, int(rng.integers(256, 640)))),
        ("noise", lambda i: _noise(rng, int(rng.integers(96, 512)), i % 3)),
        ("flat_or_gradient", lambda i: _flat(rng, int(rng.integers(64, 512)), i % 2)),
        ("red_free_fundus", lambda i: _red_free_fundus(seed * 1000 + i, 384)),
    ]
    # Ordinary photographs are the commonest mistake: a third of the set.
    schedule = [0, 1, 0, 2, 3, 0, 4, 5, 6]
    made = [0] * len(makers)
    for n in range(count):
        k = schedule[n % len(schedule)]
        yield makers[k][0], makers[k][1](made[k])
        made[k] += 1
