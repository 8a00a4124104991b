"""Procedural synthetic colour fundus photographs with planted lesions.

OphGLM's segmenter and classifier were trained on real photographs (IDRiD / ODIR style),
which cannot ship with the package. This module draws a plausible fundus from a seed so
that a new user can try the whole pipeline (`ophglm demo-image OUT.png`) and tests can
exercise real behaviour on data whose ground truth (lesion masks, disc, fovea) is known.
Only numpy, Pillow and scipy are used; everything is relative to `size`.
"""

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

LESION_CLASSES = ("MA", "HE", "EX", "SE")  # microaneurysms, haemorrhages, hard exudates, soft exudates


@dataclass
class SyntheticFundus:
    image: Image.Image                 # RGB, size x size
    masks: dict[str, np.ndarray]       # "MA","HE","EX","SE","OD" -> bool (size, size)
    fov: np.ndarray                    # bool (size, size): inside the circular camera aperture
    disc_center: tuple[float, float]   # (x, y) pixels
    disc_radius: float                 # pixels
    fovea_center: tuple[float, float]  # (x, y) pixels
    lesions: list[dict]                # {"kind", "x", "y", "radius"} per planted lesion


def _smooth_noise(rng, size, cells):
    # Upsampling a coarse grid is far cheaper than a wide gaussian blur at full resolution.
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    up = np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC))
    return (up - up.mean()) / (up.std() + 1e-6)


def _retina(rng, size, rho):
    base = np.array([212.0, 102.0, 30.0]) * rng.uniform(0.92, 1.06, 3)  # pigmentation varies per person
    # Green and blue fall off faster than red, so the periphery looks deeper red, as in real photos.
    vignette = 1 - np.array([0.3, 0.5, 0.55]) * np.clip(rho, 0, 1)[..., None] ** 2.2
    light = 1 + 0.06 * _smooth_noise(rng, size, 5)[..., None]  # uneven flash illumination
    # Fine choroidal grain (a few px) over a faint patchy pattern, matched to real green-channel texture.
    mottle = 0.5 * _smooth_noise(rng, size, max(size // 24, 8)) + 0.8 * _smooth_noise(rng, size, size // 5)
    choroid = 1 + np.array([0.012, 0.03, 0.03]) * mottle[..., None]
    return base * vignette * light * choroid


def _disc_and_macula(img, yy, xx, disc, r_disc, fovea, dd, cup):
    d = np.hypot(xx - disc[0], (yy - disc[1]) / 1.08) / r_disc  # discs are slightly taller than wide
    glow = np.exp(-((d / 1.35) ** 2))[..., None]  # light scattered around the bright disc
    img *= 1 + 0.15 * glow * np.array([0.3, 1.0, 1.0])
    rim = np.clip((1 - d) * 6 + 0.5, 0, 1)[..., None]
    shade = np.clip(1 - d, 0, 1)[..., None]  # the neuroretinal rim is more orange, the centre paler
    img[:] = img * (1 - 0.92 * rim) + 0.92 * rim * (np.array([248, 172, 70]) + shade * np.array([7, 40, 50]))
    # The cup sits slightly temporal (towards the fovea) inside the disc.
    dc = np.hypot(xx - (disc[0] - 0.15 * r_disc), yy - disc[1]) / (cup * r_disc)
    cup_a = (np.clip((1 - dc) * 2.5 + 0.5, 0, 1) * 0.8)[..., None]
    img[:] = img * (1 - cup_a) + cup_a * np.array([255, 228, 160])
    f = np.hypot(xx - fovea[0], yy - fovea[1])
    macula = np.exp(-0.5 * (f / (0.7 * dd)) ** 2)[..., None]
    img *= 1 - macula * np.array([0.2, 0.4, 0.45])  # macular pigment: darker and browner
    img += np.exp(-0.5 * (f / (0.025 * dd)) ** 2)[..., None] * np.array([25, 25, 15])  # foveal reflex
    return d <= 1


def _walk(rng, start, heading, length, step, bend, wiggle):
    n = max(int(length / step), 2)
    # Turning concentrated in the first third makes arcades rise from the disc, swing around the
    # macula and run on to the periphery; smoothed noise makes vessels meander instead of jitter.
    bump = np.exp(-(((np.arange(n) / n) - 0.3) / 0.25) ** 2)
    curl = bend * bump / bump.sum()
    turn = curl + ndimage.gaussian_filter1d(rng.normal(0, wiggle, n), 6)
    theta = heading + np.cumsum(turn)
    pts = start + step * np.cumsum(np.stack([np.cos(theta), np.sin(theta)], 1), 0)
    return np.vstack([start, pts]), np.append(heading, theta)


def _grow(rng, out, start, heading, width, length, bend, s, keep_out):
    # Thick trunks run smoothly; small branches meander more.
    pts, theta = _walk(rng, np.asarray(start, float), heading, length, 2 * s, bend, 0.15 * s / width)
    stop = np.flatnonzero(~keep_out(pts))
    if len(stop):
        pts, theta = pts[: max(stop[0], 2)], theta[: max(stop[0], 2)]
    widths = width * np.linspace(1, 0.3, len(pts))
    out.append((pts, widths))
    if len(pts) < 8:
        return
    n_branch = int(len(pts) / 22 * rng.uniform(0.6, 1.2))  # about one branch every 45 px at 512
    for i in np.sort(rng.integers(len(pts) // 6, len(pts), n_branch)):
        w = widths[i] * rng.uniform(0.4, 0.7)
        if w >= 0.9 * s:  # thinner vessels are invisible at this resolution
            side = rng.choice([-1, 1])
            h = theta[i] + side * rng.uniform(0.4, 1.0)
            _grow(rng, out, pts[i], h, w, w * 50, rng.normal(0, 0.5), s, keep_out)


def _vessels(rng, size, disc, r_disc, fovea, dd, in_fov):
    s = size / 512
    fx, fy = fovea
    # Vessels stop at the aperture edge and at the foveal avascular zone.
    keep_out = lambda p: in_fov(p) & (np.hypot(p[:, 0] - fx, p[:, 1] - fy) > 0.35 * dd)
    veins, arteries = [], []
    # (heading, total bend, length, width) for a right eye: temporal is -x, so arcades turn towards pi.
    trunks = [(-1.95, -1.15, 0.8, 5.5), (1.95, 1.15, 0.8, 5.5), (-0.9, 0.2, 0.4, 3.8),
              (0.9, -0.2, 0.4, 3.8), (-0.15, 0.1, 0.3, 2.6), (3.0, 0.0, 0.22, 2.0), (-3.0, 0.0, 0.22, 2.0)]
    for heading, total, length, width in trunks:
        for out, wscale, off in ((veins, 1.0, 0.0), (arteries, 0.72, 0.18)):
            start = (disc[0] + rng.uniform(-0.2, 0.2) * r_disc, disc[1] + rng.uniform(-0.2, 0.2) * r_disc)
            h = heading + off * rng.uniform(-1, 1)
            _grow(rng, out, start, h, width * wscale * s, length * size, total, s, keep_out)
    return veins, arteries


def _render(paths, size, ss=3):
    canvas = Image.new("L", (size * ss, size * ss))
    draw = ImageDraw.Draw(canvas)
    for pts, widths in paths:
        q = pts * ss + (ss - 1) / 2
        for i in range(0, len(q) - 1, 6):  # short chunks let the width taper along one vessel
            chunk = [tuple(p) for p in q[i : i + 7]]
            draw.line(chunk, fill=255, width=max(int(round(widths[i] * ss)), 1), joint="curve")
    return np.asarray(canvas.reduce(ss), np.float32) / 255


def _blob(xx, yy, x, y, r, rng, wobble, edge=1.0, aspect=1.0, angle=0.0):
    """Coverage in [0, 1] of a wobbly ellipse; >= 0.5 exactly where the lesion is."""
    u, v = xx - x, yy - y
    u, v = (u * np.cos(angle) + v * np.sin(angle)) / aspect, -u * np.sin(angle) + v * np.cos(angle)
    th = np.arctan2(v, u)
    k = np.arange(2, 6)[:, None, None]
    amp, phase = rng.uniform(-wobble, wobble, (4, 1, 1)), rng.uniform(0, 2 * np.pi, (4, 1, 1))
    rr = r * (1 + (amp / k * np.cos(k * th + phase)).sum(0))
    return np.clip((rr - np.hypot(u, v)) / edge + 0.5, 0, 1)


# kind: (count range, radius range in px at 512, colour, opacity); colours < 1 darken the retina.
_LESIONS = {
    "MA": ((8, 16), (1.0, 2.0), (0.65, 0.35, 0.4), 0.95),
    "HE": ((4, 9), (4.0, 10.0), (0.7, 0.35, 0.35), 0.9),
    "EX": ((6, 13), (3.0, 8.0), (245, 200, 85), 0.9),
    "SE": ((1, 4), (6.0, 12.0), (232, 208, 165), 0.55),
}


def _shape(kind, rng, xx, yy, x, y, r, s, disc):
    if kind == "MA":
        return _blob(xx, yy, x, y, r, rng, 0.0)
    if kind == "HE" and rng.random() < 0.4:  # flame: stretched along the nerve fibres, radial to the disc
        angle = np.arctan2(y - disc[1], x - disc[0])
        return _blob(xx, yy, x, y, r / 2.5, rng, 0.2, edge=1.5 * s, aspect=2.5, angle=angle)
    if kind == "HE":  # blot: the soft edge leaves it darkest in the middle, as real blood pools
        return _blob(xx, yy, x, y, r, rng, 0.35, edge=0.4 * r)
    if kind == "SE":  # fluffy: a few overlapping soft puffs around a central one
        cover = _blob(xx, yy, x, y, 0.7 * r, rng, 0.2, edge=0.5 * r)
        for a in rng.uniform(0, 2 * np.pi, 3):
            px, py = x + 0.4 * r * np.cos(a), y + 0.4 * r * np.sin(a)
            cover = np.maximum(cover, _blob(xx, yy, px, py, 0.55 * r, rng, 0.3, edge=0.5 * r))
        return cover
    # Hard exudates: a sharp-edged cluster of small dots, one of them at the centre.
    cover = _blob(xx, yy, x, y, rng.uniform(1.2, 2.2) * s, rng, 0.3)
    for _ in range(rng.integers(2, 8)):
        a, d = rng.uniform(0, 2 * np.pi), rng.uniform(0.3, 1.0) * r
        dot = _blob(xx, yy, x + d * np.cos(a), y + d * np.sin(a), rng.uniform(0.8, 2.0) * s, rng, 0.3)
        cover = np.maximum(cover, dot)
    return cover


def _place(rng, kind, r, c, aperture, disc, r_disc, fovea, dd, taken):
    for _ in range(200):
        a = rng.uniform(0, 2 * np.pi)
        if kind == "EX" and rng.random() < 0.6:  # hard exudates gather around the macula
            p = np.array(fovea) + rng.uniform(0.7, 2.0) * dd * np.array([np.cos(a), np.sin(a)])
        else:
            p = np.array([c, c]) + 0.8 * aperture * np.sqrt(rng.random()) * np.array([np.cos(a), np.sin(a)])
        far = np.hypot(*(p - c)) < 0.85 * aperture - r and np.hypot(*(p - disc)) > 1.5 * r_disc + r
        if far and all(np.hypot(*(p - q)) > r + rq + 0.01 * aperture for q, rq in taken):
            return np.round(p)  # on a pixel centre, so even a sub-pixel lesion covers its own centre
    return None


def _plant(rng, img, masks, disc, r_disc, fovea, dd, aperture):
    size = len(img)
    s, c = size / 512, (size - 1) / 2
    lesions, taken = [], []
    for kind in LESION_CLASSES:
        (lo, hi), (rlo, rhi), colour, opacity = _LESIONS[kind]
        for _ in range(rng.integers(lo, hi)):
            r = rng.uniform(rlo, rhi) * s
            p = _place(rng, kind, r, c, aperture, np.array(disc), r_disc, fovea, dd, taken)
            if p is None:
                continue
            taken.append((p, r))
            x0, y0 = np.clip(np.floor(p - 1.6 * r - 3), 0, size).astype(int)
            x1, y1 = np.clip(np.ceil(p + 1.6 * r + 4), 0, size).astype(int)
            yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
            a = _shape(kind, rng, xx, yy, p[0], p[1], r, s, disc)
            patch = img[y0:y1, x0:x1]
            target = patch * np.array(colour) if max(colour) <= 1 else np.array(colour, float)
            alpha = (opacity * a)[..., None]
            img[y0:y1, x0:x1] = patch * (1 - alpha) + target * alpha
            masks[kind][y0:y1, x0:x1] |= a >= 0.5
            lesions.append({"kind": kind, "x": float(p[0]), "y": float(p[1]), "radius": float(r)})
    return lesions


def _finish(rng, img, size, fov_soft):
    """Camera realism: optics blur, sensor noise, JPEG compression, black outside the aperture."""
    img = ndimage.gaussian_filter(img, sigma=(0.6 * size / 512, 0.6 * size / 512, 0))
    img += rng.normal(0, 1.8, img.shape)
    img = np.clip(img * fov_soft[..., None], 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    out = np.asarray(Image.open(buf).convert("RGB")) * (fov_soft[..., None] > 0)
    return Image.fromarray(out.astype(np.uint8))


def make_synthetic_fundus(
    size: int = 512, seed: int = 0, lesions: bool = True, eye: str = "right"
) -> SyntheticFundus:
    """A fundus photograph drawn from `seed`, with its ground truth (masks, disc, fovea, lesions)."""
    if not isinstance(size, (int, np.integer)) or size < 64:
        raise ValueError(f"size must be an integer >= 64, got {size!r}")
    if eye not in ("left", "right"):
        raise ValueError(f"eye must be 'left' or 'right', got {eye!r}")
    rng = np.random.default_rng(seed)
    c, aperture = (size - 1) / 2, 0.47 * size
    yy, xx = np.arange(size, dtype=np.float32)[:, None], np.arange(size, dtype=np.float32)[None, :]
    r = np.hypot(xx - c, yy - c)
    fov_soft = np.clip(aperture - r, 0, 1)  # anti-aliased rim that stays inside the fov
    # Drawn as a right eye (disc nasal = right of centre as viewed); a left eye is its mirror image,
    # which needs no change to the fov since the aperture is centred.
    r_disc = aperture / 6.5  # disc diameter ~ 1/6.5 of the aperture diameter
    dd = 2 * r_disc
    disc = (c + 0.28 * size, c + rng.uniform(-0.02, 0.02) * size)
    fovea = (disc[0] - 2.5 * dd, disc[1] + rng.uniform(0.0, 0.25) * dd)  # usually a little below the disc
    img = _retina(rng, size, r / aperture)
    od = _disc_and_macula(img, yy, xx, disc, r_disc, fovea, dd, rng.uniform(0.3, 0.4))
    in_fov = lambda p: np.hypot(p[:, 0] - c, p[:, 1] - c) < 0.98 * aperture
    veins, arteries = _vessels(rng, size, disc, r_disc, fovea, dd, in_fov)
    # Real vessels barely change red; their contrast is in green and blue.
    for paths, tint in ((veins, (0.8, 0.5, 0.55)), (arteries, (0.92, 0.68, 0.72))):
        a = ndimage.gaussian_filter(_render(paths, size), 0.4 * size / 512)[..., None]
        img *= 1 - a * (1 - np.array(tint))
    masks = {k: np.zeros((size, size), bool) for k in LESION_CLASSES}
    planted = _plant(rng, img, masks, disc, r_disc, fovea, dd, aperture) if lesions else []
    image = _finish(rng, img, size, fov_soft)
    fov = r < aperture
    masks = {k: m & fov for k, m in masks.items()} | {"OD": od & fov}
    if eye == "left":
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        masks = {k: np.ascontiguousarray(m[:, ::-1]) for k, m in masks.items()}
        disc, fovea = (size - 1 - disc[0], disc[1]), (size - 1 - fovea[0], fovea[1])
        planted = [d | {"x": size - 1 - d["x"]} for d in planted]
    return SyntheticFundus(image, masks, fov, (float(disc[0]), float(disc[1])), float(r_disc),
                           (float(fovea[0]), float(fovea[1])), planted)
