"""Procedural picture/caption data set for sdgen's ``toy`` model.

Every picture is one big, roughly centred flat-coloured shape (circle, square, triangle or star) on a
flat background of another colour, captioned ``"a <colour> <shape> on a <colour> background"`` ("an" before
"orange").
Everything is deterministic from a seed.

Some (shape colour, background colour) pairs never appear in training, with any shape: prompts made from
them are the held-out test prompts (``HELD_OUT_PROMPTS``), so a model that gets them right has learnt to
compose a colour word with its role in the sentence rather than memorised captions.

    python scripts/toy_data.py --out /tmp/toy_preview --n 32 --seed 0   # writes PNGs + captions.txt
"""

from __future__ import annotations

import argparse
import itertools
import math
from pathlib import Path

import numpy as np

# Flat colours, far apart in RGB so that "nearest palette colour" is a fair measurement.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (245, 220, 30),
    "purple": (140, 40, 180),
    "orange": (245, 135, 20),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLOURS: list[str] = list(PALETTE)
SHAPES: list[str] = ["circle", "square", "triangle", "star"]

# (shape colour, background colour) pairs that are never shown in training, with any shape.  Every colour
# still appears both as a shape colour and as a background colour in training.  Twelve pairs, one test
# prompt each (the shape cycles through SHAPES).
HELD_OUT_PAIRS: list[tuple[str, str]] = [
    ("red", "blue"),
    ("green", "yellow"),
    ("blue", "white"),
    ("yellow", "purple"),
    ("purple", "orange"),
    ("orange", "black"),
    ("white", "red"),
    ("black", "green"),
    ("red", "white"),
    ("blue", "orange"),
    ("yellow", "black"),
    ("green", "purple"),
]

RESOLUTION = 64


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def caption(shape: str, fg: str, bg: str) -> str:
    """E.g. ``"a red circle on a blue background"``, ``"an orange star on a white background"``."""
    return f"{_a(fg)} {shape} on {_a(bg)} background"


HELD_OUT_TRIPLES: list[tuple[str, str, str]] = [
    (SHAPES[i % len(SHAPES)], fg, bg) for i, (fg, bg) in enumerate(HELD_OUT_PAIRS)
]
HELD_OUT_PROMPTS: list[str] = [caption(*t) for t in HELD_OUT_TRIPLES]


def train_triples() -> list[tuple[str, str, str]]:
    """All (shape, shape colour, background colour) combinations shown in training."""
    held = set(HELD_OUT_PAIRS)
    return [
        (s, fg, bg)
        for s, fg, bg in itertools.product(SHAPES, COLOURS, COLOURS)
        if fg != bg and (fg, bg) not in held
    ]


def _polygon_mask(px: np.ndarray, py: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test for every (px, py) sample point; xs/ys are the vertices in order."""
    inside = np.zeros(px.shape, dtype=bool)
    n = len(xs)
    for i in range(n):
        x0, y0, x1, y1 = xs[i], ys[i], xs[(i + 1) % n], ys[(i + 1) % n]
        crosses = (y0 > py) != (y1 > py)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = x0 + (py - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (px < x_at)
    return inside


def shape_coverage(shape: str, size: int, cx: float, cy: float, r: float, angle: float, ss: int = 4) -> np.ndarray:
    """Fraction (0..1) of each pixel of a size x size picture covered by the shape (ss x ss supersampling).

    ``r`` is the circumradius in pixels, ``angle`` a rotation in radians, ``(cx, cy)`` the centre.
    """
    offs = (np.arange(ss) + 0.5) / ss
    coords = (np.arange(size)[:, None] + offs[None, :]).reshape(-1)  # size*ss sample coordinates
    py, px = np.meshgrid(coords, coords, indexing="ij")
    if shape == "circle":
        inside = (px - cx) ** 2 + (py - cy) ** 2 <= r * r
    else:
        if shape == "square":
            k, radii, start = 4, [r], math.pi / 4
        elif shape == "triangle":
            k, radii, start = 3, [r], -math.pi / 2
        elif shape == "star":
            k, radii, start = 10, [r, 0.5 * r], -math.pi / 2
        else:
            raise ValueError(f"unknown shape {shape!r}")
        th = start + angle + 2 * math.pi * np.arange(k) / k
        rad = np.array([radii[i % len(radii)] for i in range(k)])
        xs, ys = cx + rad * np.cos(th), cy + rad * np.sin(th)
        inside = _polygon_mask(px, py, xs, ys)
    return inside.reshape(size, ss, size, ss).mean(axis=(1, 3))


def render(shape: str, fg: str, bg: str, rng: np.random.Generator, size: int = RESOLUTION) -> np.ndarray:
    """One (size, size, 3) uint8 picture: a big shape near the centre, flat colours, antialiased edges."""
    s = size / 64.0
    r = rng.uniform(19.0, 25.0) * s
    if shape == "square":
        r *= 1.15  # about the same visual weight as the others
    elif shape == "triangle":
        r *= 1.1
    cx = size / 2 + rng.uniform(-2.5, 2.5) * s
    cy = size / 2 + rng.uniform(-2.5, 2.5) * s
    if shape == "triangle":
        cy += 0.15 * r  # centre the bounding box rather than the centroid
    angle = math.radians(rng.uniform(-12.0, 12.0))
    cov = shape_coverage(shape, size, cx, cy, r, angle)[..., None]
    fgc = np.array(PALETTE[fg], dtype=np.float64)
    bgc = np.array(PALETTE[bg], dtype=np.float64)
    img = cov * fgc + (1.0 - cov) * bgc
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def make_dataset(
    n: int, seed: int = 0, size: int = RESOLUTION, triples: list[tuple[str, str, str]] | None = None
) -> tuple[np.ndarray, list[str]]:
    """``n`` pictures (n, size, size, 3) uint8 and their captions, cycling through ``triples`` (default: the
    training combinations) in a seeded random order."""
    rng = np.random.default_rng(seed)
    triples = train_triples() if triples is None else triples
    order = np.concatenate([rng.permutation(len(triples)) for _ in range(-(-n // len(triples)))])[:n]
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    captions = []
    for i, t in enumerate(order):
        shape, fg, bg = triples[t]
        images[i] = render(shape, fg, bg, rng, size)
        captions.append(caption(shape, fg, bg))
    return images, captions


def nearest_colour(rgb: np.ndarray) -> str:
    """The palette colour nearest (Euclidean, RGB) to ``rgb``."""
    rgb = np.asarray(rgb, dtype=np.float64)
    return min(COLOURS, key=lambda c: float(np.sum((np.array(PALETTE[c], dtype=np.float64) - rgb) ** 2)))


CENTRE = 12  # side of the central square that the semantic test averages (the shapes always cover it)
BORDER = 3  # width of the frame along the edges that it averages (the shapes never reach it)


def measure_colours(img: np.ndarray) -> tuple[str, str]:
    """(shape colour, background colour) of an (H, W, 3) uint8 picture, as nearest palette colours of the mean
    colour of the central region and of the border frame (sizes scale with the picture)."""
    h, w = img.shape[:2]
    c = max(2, round(CENTRE * h / RESOLUTION))
    b = max(1, round(BORDER * h / RESOLUTION))
    x = np.asarray(img, dtype=np.float64)
    centre = x[(h - c) // 2 : (h + c) // 2, (w - c) // 2 : (w + c) // 2].reshape(-1, 3).mean(axis=0)
    frame = np.ones((h, w), dtype=bool)
    frame[b:-b, b:-b] = False
    return nearest_colour(centre), nearest_colour(x[frame].mean(axis=0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=RESOLUTION)
    ap.add_argument("--held-out", action="store_true", help="render the held-out test combinations instead")
    args = ap.parse_args()
    from PIL import Image

    args.out.mkdir(parents=True, exist_ok=True)
    triples = HELD_OUT_TRIPLES if args.held_out else None
    images, captions = make_dataset(args.n, args.seed, args.size, triples)
    for i, img in enumerate(images):
        Image.fromarray(img).save(args.out / f"{i:05d}.png")
    (args.out / "captions.txt").write_text("".join(f"{i:05d}.png\t{c}\n" for i, c in enumerate(captions)))
    print(f"wrote {len(images)} pictures to {args.out}")


if __name__ == "__main__":
    main()
