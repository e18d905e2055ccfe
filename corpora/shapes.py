"""The shapes world: a procedurally rendered corpus in which every caption can be checked.

A scene is one object (color, shape, size, position) on a textured background. Captions come from
several templates and synonyms; `parse_prompt` reads the attributes a caption names back out of it,
which is how the judge decides whether a picture matches a prompt.

A fixed set of color x shape x background triples (`HELDOUT`, 10%) never appears in the training
split, so compositional generalization can be measured on the validation split.

Everything is deterministic: image `i` of a split is drawn from `numpy.random.default_rng([seed,
split, i])`, so the same arguments give the same bytes whatever the number of worker processes.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm.auto import tqdm

from common.metadata import write_metadata

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 30),
    "orange": (245, 135, 20),
    "yellow": (245, 220, 35),
    "green": (35, 165, 50),
    "blue": (30, 75, 225),
    "purple": (130, 40, 185),
    "pink": (250, 135, 195),
    "white": (245, 245, 245),
    "black": (22, 22, 22),
    "brown": (120, 70, 30),
}
SHAPES = ("ball", "box", "triangle", "star", "heart")
BACKGROUNDS = ("grass", "sky", "sand", "snow", "water", "brick wall", "wooden floor", "night sky")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "color": tuple(COLORS),
    "shape": SHAPES,
    "background": BACKGROUNDS,
    "size": SIZES,
    "position": POSITIONS,
}
SPLITS = {"train": 0, "validation": 1}


def _heldout_triples() -> frozenset[tuple[str, str, str]]:
    """10% of color x shape x background triples, fixed forever; "a blue ball on grass" stays seen."""
    triples = [(c, s, b) for c in COLORS for s in SHAPES for b in BACKGROUNDS if (c, s, b) != ("blue", "ball", "grass")]
    return frozenset(random.Random(0).sample(triples, len(COLORS) * len(SHAPES) * len(BACKGROUNDS) // 10))


HELDOUT = _heldout_triples()
SEEN = tuple((c, s, b) for c in COLORS for s in SHAPES for b in BACKGROUNDS if (c, s, b) not in HELDOUT)


@dataclass(frozen=True)
class Scene:
    color: str
    shape: str
    background: str
    size: str
    position: str

    @property
    def heldout(self) -> bool:
        return (self.color, self.shape, self.background) in HELDOUT


# ---------------------------------------------------------------- captions and their parser

SHAPE_WORDS = {
    "ball": ("ball", "sphere", "orb"),
    "box": ("box", "cube", "block"),
    "triangle": ("triangle", "pyramid"),
    "star": ("star",),
    "heart": ("heart",),
}
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big", "huge")}
# Prepositional phrases per background; the first is the canonical one.
BACKGROUND_PHRASES = {
    "grass": ("on grass", "on the grass", "on green grass", "in a grassy field"),
    "sky": ("in the sky", "against a blue sky", "in a clear sky"),
    "sand": ("on sand", "on the sand", "on a sandy beach"),
    "snow": ("on snow", "in the snow", "on white snow"),
    "water": ("on water", "on the water", "floating on blue water"),
    "brick wall": ("in front of a brick wall", "against a brick wall", "by a red brick wall"),
    "wooden floor": ("on a wooden floor", "on wooden planks", "on the wood floor"),
    "night sky": ("in the night sky", "against a starry night sky", "at night"),
}
# Keywords the parser recognizes, checked in this order (night sky before sky).
BACKGROUND_WORDS = {
    "night sky": ("night sky", "starry", "at night", "night"),
    "brick wall": ("brick wall", "bricks", "brick"),
    "wooden floor": ("wooden floor", "wood floor", "wooden", "wood", "planks", "floor"),
    "grass": ("grass", "grassy", "meadow", "lawn"),
    "sky": ("sky",),
    "sand": ("sand", "sandy", "beach"),
    "snow": ("snow", "snowy"),
    "water": ("water", "sea", "lake"),
}
# Background phrases whose color word describes the background, not the object.
BACKGROUND_COLOR_PHRASES = ("green grass", "blue sky", "white snow", "blue water", "red brick")
POSITION_PHRASES = {
    "left": ("on the left", "to the left"),
    "right": ("on the right", "to the right"),
    "top": ("at the top", "near the top"),
    "bottom": ("at the bottom", "near the bottom"),
    "center": ("in the center", "in the middle"),
}
POSITION_WORDS = {
    "left": ("left",),
    "right": ("right",),
    "top": ("top", "upper"),
    "bottom": ("bottom", "lower"),
    "center": ("center", "centre", "middle", "centered"),
}

# (template, weight). Placeholders name the attributes the caption mentions.
TEMPLATES = (
    ("a {color} {shape} {background}", 4),
    ("a {size} {color} {shape} {background}, {position}", 4),
    ("{color} {shape} {background}", 2),
    ("{position}, a {size} {color} {shape} {background}", 2),
    ("a {size} {color} {shape} {position} {background}", 2),
    ("a {color} {shape} {position}", 1),
    ("a {size} {shape} {background}", 1),
)


def caption(scene: Scene, rng: random.Random) -> str:
    """A caption for `scene` from a random template with random synonyms."""
    template = rng.choices([t for t, _ in TEMPLATES], weights=[w for _, w in TEMPLATES])[0]
    canonical = rng.random() < 0.5
    words = {
        "color": scene.color,
        "shape": SHAPE_WORDS[scene.shape][0] if canonical else rng.choice(SHAPE_WORDS[scene.shape]),
        "background": BACKGROUND_PHRASES[scene.background][0]
        if canonical
        else rng.choice(BACKGROUND_PHRASES[scene.background]),
        "size": rng.choice(SIZE_WORDS[scene.size]),
        "position": rng.choice(POSITION_PHRASES[scene.position]),
    }
    return template.format(**words)


def triple_prompt(color: str, shape: str, background: str) -> str:
    """The plain prompt naming a color, a shape and a background: "a blue ball on grass"."""
    return f"a {color} {SHAPE_WORDS[shape][0]} {BACKGROUND_PHRASES[background][0]}"


def _find(text: str, table: dict[str, tuple[str, ...]]) -> tuple[str | None, str]:
    """First value whose keyword is a whole word of `text`; returns it and the text without that word."""
    for value, keywords in table.items():
        for word in keywords:
            pattern = rf"\b{re.escape(word)}\b"
            if re.search(pattern, text):
                return value, re.sub(pattern, " ", text)
    return None, text


def parse_prompt(text: str) -> dict[str, str]:
    """The attributes a prompt names, e.g. {"color": "blue", "shape": "ball", "background": "grass"}."""
    text = " " + re.sub(r"[^a-z]+", " ", text.lower()) + " "
    for phrase in BACKGROUND_COLOR_PHRASES:  # "green grass" names the grass, not the object
        text = text.replace(f" {phrase} ", f" {phrase.split()[1]} ")
    found: dict[str, str] = {}
    background, text = _find(text, BACKGROUND_WORDS)
    if background is not None:
        found["background"] = background
    tables = {
        "color": {c: (c,) for c in COLORS},
        "shape": SHAPE_WORDS,
        "size": SIZE_WORDS,
        "position": POSITION_WORDS,
    }
    for attribute, table in tables.items():
        value, text = _find(text, table)
        if value is not None:
            found[attribute] = value
    return found


# ---------------------------------------------------------------- rendering


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Value noise in [0, 1]: a cells x cells random grid upsampled bicubically to size x size."""
    grid = (rng.random((cells, cells)) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(grid).resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0


def _background(name: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A textured background, float32 (size, size, 3) in [0, 1]."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    fine = rng.normal(0.0, 1.0, (size, size)).astype(np.float32)
    tint = rng.uniform(-0.04, 0.04, 3).astype(np.float32)

    def base(rgb: tuple[float, float, float]) -> np.ndarray:
        return np.broadcast_to(np.asarray(rgb, np.float32) + tint, (size, size, 3)).copy()

    if name == "grass":
        img = base((0.28, 0.56, 0.2))
        blades = np.asarray(
            Image.fromarray((rng.random((size // 4 + 1, size)) * 255).astype(np.uint8)).resize(
                (size, size), Image.BILINEAR
            ),
            np.float32,
        )
        img *= (0.75 + 0.5 * blades / 255.0)[..., None]
    elif name == "sky":
        img = base((0.42, 0.63, 0.93)) * (1 - y[..., None]) + base((0.7, 0.84, 1.0)) * y[..., None]
        clouds = np.clip((_smooth_noise(rng, size, 5) - 0.55) * 3.0, 0, 1)[..., None]
        img = img * (1 - clouds) + 0.97 * clouds
    elif name == "sand":
        img = base((0.86, 0.75, 0.52))
        img *= (1 + 0.05 * np.sin(2 * math.pi * (6 * y + 0.3 * _smooth_noise(rng, size, 4))))[..., None]
        img += 0.035 * fine[..., None]
    elif name == "snow":
        img = base((0.93, 0.95, 0.98)) - 0.08 * _smooth_noise(rng, size, 6)[..., None] * np.float32([1.0, 0.7, 0.2])
        img += 0.015 * fine[..., None]
    elif name == "water":
        img = base((0.12, 0.38, 0.68))
        phase = rng.uniform(0, 2 * math.pi)
        waves = np.sin(2 * math.pi * (9 * y + 0.6 * _smooth_noise(rng, size, 4)) + phase)
        img += (0.09 * waves)[..., None] * np.float32([0.6, 0.8, 1.0])
    elif name == "brick wall":
        rows = 8
        row = np.floor(y * rows)
        offset = (row % 2) * 0.125
        col = np.floor((x + offset) * 4)
        shade = np.asarray(rng.uniform(0.8, 1.15, (rows + 1, 6)), np.float32)[row.astype(int), col.astype(int)]
        img = base((0.63, 0.26, 0.18)) * shade[..., None]
        mortar = ((y * rows) % 1 < 0.14) | (((x + offset) * 4) % 1 < 0.06)
        img[mortar] = np.float32([0.78, 0.75, 0.7]) + tint
    elif name == "wooden floor":
        planks = 5
        row = np.floor(y * planks).astype(int)
        shade = np.asarray(rng.uniform(0.82, 1.12, planks + 1), np.float32)[row]
        grain = np.sin(2 * math.pi * (3 * x + 8 * y + 0.8 * _smooth_noise(rng, size, 3)) * 3)
        img = base((0.6, 0.4, 0.22)) * (shade * (1 + 0.06 * grain))[..., None]
        img[(y * planks) % 1 < 0.05] *= 0.55
    elif name == "night sky":
        img = base((0.03, 0.04, 0.16)) * (1 - y[..., None]) + base((0.08, 0.1, 0.26)) * y[..., None]
        count = max(4, size * size // 120)
        ys, xs = rng.integers(0, size, count), rng.integers(0, size, count)
        img[ys, xs] = rng.uniform(0.6, 1.0, (count, 1)).astype(np.float32)
    else:
        raise ValueError(f"unknown background {name!r}; expected one of {BACKGROUNDS}")
    return np.clip(img, 0.0, 1.0)


def _outline_points(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Polygon of a shape of radius r centered at (cx, cy), rotated by `angle` radians."""
    if shape == "box":
        pts = [(-0.82, -0.82), (0.82, -0.82), (0.82, 0.82), (-0.82, 0.82)]
    elif shape == "triangle":
        pts = [(math.cos(a) * 1.1, math.sin(a) * 1.1 + 0.18) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    elif shape == "star":
        pts = [
            (
                math.cos(-math.pi / 2 + k * math.pi / 5) * rad,
                math.sin(-math.pi / 2 + k * math.pi / 5) * rad + 0.08,
            )
            for k in range(10)
            for rad in ((1.12 if k % 2 == 0 else 0.48),)
        ]
    elif shape == "heart":
        ts = np.linspace(0, 2 * math.pi, 48, endpoint=False)
        hx = 16 * np.sin(ts) ** 3
        hy = -(13 * np.cos(ts) - 5 * np.cos(2 * ts) - 2 * np.cos(3 * ts) - np.cos(4 * ts))
        pts = [(px / 16.5, py / 16.5 + 0.05) for px, py in zip(hx, hy, strict=True)]
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + r * (px * ca - py * sa), cy + r * (px * sa + py * ca)) for px, py in pts]


def _mask(shape: str, cx: float, cy: float, r: float, angle: float, size: int, ss: int) -> np.ndarray:
    """Anti-aliased coverage mask in [0, 1], drawn at `ss`x supersampling."""
    canvas = Image.new("L", (size * ss, size * ss), 0)
    draw = ImageDraw.Draw(canvas)
    if shape == "ball":
        draw.ellipse([(cx - r) * ss, (cy - r) * ss, (cx + r) * ss, (cy + r) * ss], fill=255)
    else:
        draw.polygon([(px * ss, py * ss) for px, py in _outline_points(shape, cx, cy, r, angle)], fill=255)
    return np.asarray(canvas.resize((size, size), Image.BOX), np.float32) / 255.0


POSITION_CENTERS = {
    "left": (0.27, 0.5),
    "right": (0.73, 0.5),
    "top": (0.5, 0.27),
    "bottom": (0.5, 0.73),
    "center": (0.5, 0.5),
}
SIZE_RADII = {"small": 0.12, "large": 0.21}


def render(scene: Scene, resolution: int = 64, rng: np.random.Generator | None = None) -> Image.Image:
    """Render `scene` as an RGB image of `resolution` x `resolution` pixels."""
    return render_with_box(scene, resolution, rng)[0]


def render_with_box(
    scene: Scene, resolution: int = 64, rng: np.random.Generator | None = None
) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """`render`'s picture (the same one for the same `rng`) and the object's box (left, top, right, bottom) in
    pixels: the smallest that holds every pixel the object, outline included, touches."""
    rng = rng if rng is not None else np.random.default_rng()
    size = resolution
    img = _background(scene.background, size, rng)
    fx, fy = POSITION_CENTERS[scene.position]
    cx = (fx + rng.uniform(-0.03, 0.03)) * size
    cy = (fy + rng.uniform(-0.03, 0.03)) * size
    r = SIZE_RADII[scene.size] * rng.uniform(0.92, 1.08) * size
    angle = 0.0 if scene.shape == "ball" else rng.uniform(-0.2, 0.2)
    ss = 4
    width = max(1.0, size / 48)
    outer = _mask(scene.shape, cx, cy, r + width, angle, size, ss)
    inner = _mask(scene.shape, cx, cy, r, angle, size, ss)

    color = np.asarray(COLORS[scene.color], np.float32) / 255.0
    color = np.clip(color * rng.uniform(0.93, 1.07) + rng.uniform(-0.03, 0.03, 3), 0, 1)
    luminance = float(color @ np.float32([0.299, 0.587, 0.114]))
    edge = color * 0.45 if luminance > 0.35 else color * 0.4 + 0.45
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy = (x - cx) / r, (y - cy) / r
    if scene.shape == "ball":
        dist = np.sqrt((dx + 0.35) ** 2 + (dy + 0.35) ** 2)
        light = np.clip(1.15 - 0.4 * dist, 0.65, 1.15)[..., None]
        glint = (0.35 * np.clip(1 - dist / 0.35, 0, 1))[..., None]
    else:
        light = (1.06 - 0.1 * (dx + dy))[..., None]
        glint = np.zeros_like(light)
    body = np.clip(color * light + glint, 0, 1)
    img = img * (1 - outer[..., None]) + edge * outer[..., None]
    img = img * (1 - inner[..., None]) + body * inner[..., None]
    rows, cols = np.nonzero(outer)
    box = (int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1)
    return Image.fromarray(np.round(np.clip(img, 0, 1) * 255).astype(np.uint8), "RGB"), box


def sample_scene(rng: np.random.Generator, heldout: bool | None = None) -> Scene:
    """A random scene: from the seen triples (heldout=False), the held-out ones (True), or any (None)."""
    if heldout is None:
        pool = [(c, s, b) for c in COLORS for s in SHAPES for b in BACKGROUNDS]
    else:
        pool = sorted(HELDOUT) if heldout else SEEN
    color, shape, background = pool[int(rng.integers(len(pool)))]
    return Scene(
        color,
        shape,
        background,
        SIZES[int(rng.integers(len(SIZES)))],
        POSITIONS[int(rng.integers(len(POSITIONS)))],
    )


def blur(image: Image.Image, sigma: float) -> Image.Image:
    """Gaussian blur with standard deviation `sigma` pixels."""
    return image.filter(ImageFilter.GaussianBlur(sigma)) if sigma > 0 else image


# ---------------------------------------------------------------- building a corpus


@dataclass(frozen=True)
class _Job:
    out: str
    split: str
    index: int
    seed: int
    resolution: int
    heldout_fraction: float


def _scene_for(job: _Job) -> tuple[Scene, np.random.Generator, random.Random]:
    rng = np.random.default_rng([job.seed, SPLITS[job.split], job.index])
    heldout = False if job.split == "train" else bool(rng.random() < job.heldout_fraction)
    scene = sample_scene(rng, heldout)
    return scene, rng, random.Random(int(rng.integers(2**63)))


def _render_job(job: _Job) -> dict:
    scene, rng, text_rng = _scene_for(job)
    name = f"{job.index:08d}.png"
    render(scene, job.resolution, rng).save(Path(job.out) / job.split / name, compress_level=1)
    return {"file_name": name, "text": caption(scene, text_rng), **asdict(scene), "heldout": scene.heldout}


def split_counts(num_images: int, val_fraction: float = 0.1) -> dict[str, int]:
    """Images per split of a shapes world of `num_images`."""
    num_val = max(1, round(num_images * val_fraction))
    return {"train": num_images - num_val, "validation": num_val}


def built_as(out: str | Path, num_images: int, resolution: int = 64, seed: int = 0, val_fraction: float = 0.1) -> bool:
    """Whether `out` already holds the shapes world these settings build (False when it holds none). One built
    with other settings is an error that names them, so that it is never taken for this one."""
    info_path = Path(out) / "shapes_world.json"
    if not info_path.is_file():
        return False
    info = json.loads(info_path.read_text(encoding="utf-8"))
    wanted = {"counts": split_counts(num_images, val_fraction), "resolution": resolution, "seed": seed}
    differ = [f"{key} {info.get(key)} (wanted {value})" for key, value in wanted.items() if info.get(key) != value]
    if differ:
        raise ValueError(
            f"{out} holds a shapes world built with other settings: {'; '.join(differ)}. "
            "Build into another folder, or delete it first"
        )
    return True


def build(
    out: str | Path,
    num_images: int,
    resolution: int = 64,
    seed: int = 0,
    val_fraction: float = 0.1,
    heldout_fraction: float = 0.5,
    workers: int | None = None,
    progress: bool = True,
) -> dict[str, int]:
    """Write the shapes world as an imagefolder with `train/` and `validation/` splits.

    `num_images` counts both splits; `val_fraction` of them go to validation, of which
    `heldout_fraction` show held-out compositions. Returns the image count per split.
    """
    if num_images < 2:
        raise ValueError(f"num_images must be at least 2, got {num_images}")
    if not 8 <= resolution <= 1024:
        raise ValueError(f"resolution must be in [8, 1024], got {resolution}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    out = Path(out)
    counts = split_counts(num_images, val_fraction)
    jobs = []
    for split, count in counts.items():
        (out / split).mkdir(parents=True, exist_ok=True)
        jobs += [_Job(str(out), split, i, seed, resolution, heldout_fraction) for i in range(count)]
    workers = workers or min(multiprocessing.cpu_count(), 8)
    rows: dict[str, list[dict]] = {split: [] for split in counts}
    bar = tqdm(total=len(jobs), desc="shapes world", unit="img", disable=not progress)
    if workers > 1:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for job, row in zip(jobs, pool.imap(_render_job, jobs, chunksize=64), strict=True):
                rows[job.split].append(row)
                bar.update()
    else:
        for job in jobs:
            rows[job.split].append(_render_job(job))
            bar.update()
    bar.close()
    for split, split_rows in rows.items():
        write_metadata(out / split, split_rows)
    info = {
        "resolution": resolution,
        "seed": seed,
        "counts": counts,
        "heldout_compositions": sorted(" ".join(t) for t in HELDOUT),
    }
    (out / "shapes_world.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return counts
