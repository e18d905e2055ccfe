"""Emoji in several art styles: the same Unicode emoji drawn by independent design teams.

The assets come from the package registries into a cache folder, once:

- noto: Debian's `fonts-noto-color-emoji` (`apt-get download`, `dpkg-deb -x`), drawn with Pillow's RAQM
  layout, which needs libraqm and libfribidi for flags and skin tones;
- twemoji: npm `emoji-datasource-twitter`, 64 px PNGs. Its `emoji.json` also gives each emoji's Unicode
  category and subcategory, so it is fetched whatever the styles;
- openmoji: npm `openmoji`, SVGs drawn with cairosvg;
- fluent: npm `@iconify-json/fluent-emoji-flat`, SVG bodies in `icons.json`, drawn with cairosvg.

Every fully-qualified emoji of the `emoji` package is a concept, keyed by its codepoints without U+FE0F
("1f3c4-1f3fd") and captioned with its CLDR short name ("person surfing: medium skin tone"). A style
contributes an image for each concept it draws: cropped to its alpha bounding box, padded to a square,
composited on white and resized. About `heldout_fraction` of the base concepts, with their skin-tone
variants, go to `validation/`, chosen by a hash of the seed and the concept, so the split of a concept does
not depend on the styles built; a whole style can be held out by filtering the `style` column.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import emoji
from PIL import Image, ImageDraw, ImageFont, features
from tqdm.auto import tqdm

from common.metadata import write_metadata

STYLES = ("noto", "twemoji", "openmoji", "fluent")
LICENCES = {
    "noto": "OFL-1.1 (the font) and Apache-2.0 (noto-emoji), per the Debian package's copyright file",
    "twemoji": "CC-BY-4.0 (Twemoji graphics, per the package README; the emoji-datasource data is MIT)",
    "openmoji": "CC-BY-SA-4.0",
    "fluent": "MIT",
}
NOTO_PACKAGE = "fonts-noto-color-emoji"
TOOLS = {"noto": ("apt-get", "dpkg-deb"), "twemoji": ("npm",), "openmoji": ("npm",), "fluent": ("npm",)}
# npm package and the parts of it kept in the cache (paths inside the tarball's package/ folder).
NPM_PACKAGES = {
    "twemoji": ("emoji-datasource-twitter", ("img/twitter/64/", "emoji.json", "LICENSE", "README.md")),
    "openmoji": ("openmoji", ("color/svg/", "data/openmoji.json", "LICENSE.txt")),
    "fluent": ("@iconify-json/fluent-emoji-flat", ("icons.json", "chars.json", "info.json")),
}
# A style is cached when this path exists in its cache folder.
MARKERS = {
    "noto": "NotoColorEmoji.ttf",
    "twemoji": "img/twitter/64",
    "openmoji": "color/svg",
    "fluent": "icons.json",
}
# Unicode emoji groups as openmoji spells them, to fill in categories emoji-datasource lacks.
GROUPS = {
    "smileys-emotion": "Smileys & Emotion",
    "people-body": "People & Body",
    "component": "Component",
    "animals-nature": "Animals & Nature",
    "food-drink": "Food & Drink",
    "travel-places": "Travel & Places",
    "activities": "Activities",
    "objects": "Objects",
    "symbols": "Symbols",
    "flags": "Flags",
}
SPLITS = ("train", "validation")
SVG_MIN_SIZE = 256  # SVGs are drawn at max(this, 4 x resolution) pixels, then downsampled
NOTO_SIZE = 109  # the only size of Noto's bitmap strike: 136 x 128 px glyphs
# the picture size a bitmap style's assets hold; above it they are upscaled (the SVG styles draw at any size)
BITMAP_SIZES = {"noto": 128, "twemoji": 64}


class AssetError(RuntimeError, ValueError):
    """A tool or library is missing or a fetch failed; a ValueError too, so the CLI prints it plainly."""


def default_cache_dir() -> Path:
    """`$VQCLIP_CACHE/emoji`, or `~/.cache/vqclip/emoji`."""
    root = os.environ.get("VQCLIP_CACHE")
    return Path(root) / "emoji" if root else Path.home() / ".cache" / "vqclip" / "emoji"


# ---------------------------------------------------------------- concepts and captions

TONE = r"(?:light|medium-light|medium|medium-dark|dark) skin tone"
PEOPLE = r"(?:man|woman|person|boy|girl|adult|child|baby)"
HAIR = r"(?:red hair|curly hair|white hair|blond hair|bald|beard)"
TONE_CODEPOINTS = re.compile(r"-1f3f[b-f]")


def concept_key(text: str) -> str:
    """Codepoints of an emoji without U+FE0F: "🏄🏽" -> "1f3c4-1f3fd"."""
    return "-".join(f"{ord(c):04x}" for c in text if c != "\ufe0f")


def _hex_key(stem: str) -> str:
    """The concept key of an asset named by its hex codepoints ("1F44B-1F3FD", "0023-fe0f-20e3")."""
    return "-".join(f"{int(part, 16):04x}" for part in stem.split("-") if int(part, 16) != 0xFE0F)


def _is_flag(text: str) -> bool:
    codes = [ord(c) for c in text]
    regional = len(codes) == 2 and all(0x1F1E6 <= c <= 0x1F1FF for c in codes)
    return regional or (codes[0] == 0x1F3F4 and len(codes) > 1 and 0xE0020 <= codes[1] <= 0xE007F)


def short_name(text: str) -> str:
    """The CLDR short name of an emoji ("flag: Japan"), rebuilt from the `emoji` package's name.

    The package drops the name's colon and commas ("person_surfing_medium_skin_tone", "Japan"); they come
    back from the name's known parts: flags, keycaps, the people of families and couples, skin tones and
    hair styles.
    """
    name = emoji.EMOJI_DATA[text]["en"].strip(":").replace("_", " ")
    if _is_flag(text):
        return f"flag: {name}"
    if m := re.fullmatch(r"keycap (.+)", name):
        return f"keycap: {m[1]}"
    if m := re.fullmatch(rf"(family|kiss|couple with heart)((?: {PEOPLE})+)((?: {TONE})*)", name):
        return f"{m[1]}: " + ", ".join(m[2].split() + re.findall(TONE, m[3]))
    if m := re.fullmatch(rf"(.+?)((?: {TONE})+)(?: ({HAIR}))?", name):
        return f"{m[1]}: " + ", ".join(re.findall(TONE, m[2]) + ([m[3]] if m[3] else []))
    if m := re.fullmatch(rf"({PEOPLE}) ({HAIR})", name):
        return f"{m[1]}: {m[2]}"
    return name


@dataclass(frozen=True)
class Concept:
    key: str  # codepoints without U+FE0F, shared across styles
    text: str  # the fully-qualified emoji
    name: str  # CLDR short name, the caption
    base: str  # key of the emoji without skin tones (itself when it has none)
    skin_tone: bool


@cache
def concepts() -> dict[str, Concept]:
    """Every fully-qualified emoji of the `emoji` package, by key."""
    texts = {
        concept_key(text): text
        for text, data in emoji.EMOJI_DATA.items()
        if data["status"] == emoji.STATUS["fully_qualified"]
    }
    names = {key: short_name(text) for key, text in texts.items()}
    by_name = {name: key for key, name in names.items()}
    table = {}
    for key, text in texts.items():
        base = TONE_CODEPOINTS.sub("", key)
        if base not in texts:  # mixed tones of two people: "handshake: light skin tone, dark skin tone"
            base = by_name.get(names[key].split(":")[0], base)
        table[key] = Concept(key, text, names[key], base, base != key)
    return table


def split_of(concept: Concept, seed: int, heldout_fraction: float) -> str:
    """The split of a concept: about `heldout_fraction` of base concepts, with their variants, validate."""
    digest = hashlib.sha256(f"{seed}:{concept.base}".encode()).digest()
    return "validation" if int.from_bytes(digest[:8], "big") / 2**64 < heldout_fraction else "train"


def categories(assets: dict[str, Path]) -> dict[str, tuple[str, str]]:
    """(category, subcategory) by concept key, from emoji-datasource, else openmoji's data if fetched."""
    found: dict[str, tuple[str, str]] = {}
    openmoji = assets.get("openmoji", Path()) / "data" / "openmoji.json"
    if openmoji.is_file():
        for item in json.loads(openmoji.read_text(encoding="utf-8")):
            if item["group"] in GROUPS:
                found[_hex_key(item["hexcode"])] = (GROUPS[item["group"]], item["subgroups"])
    for item in json.loads((assets["twemoji"] / "emoji.json").read_text(encoding="utf-8")):
        variations = item.get("skin_variations") or {}
        for unified in [item["unified"], *(v["unified"] for v in variations.values())]:
            found[_hex_key(unified)] = (item["category"], item["subcategory"])
    table = concepts()
    return {key: found.get(key) or found.get(concept.base) or ("", "") for key, concept in table.items()}


# ---------------------------------------------------------------- fetching the assets


def _run(command: list[str], cwd: Path, hint: str = "") -> str:
    """Run a fetching command; a failure raises AssetError with its last error line and `hint`."""
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        detail = lines[-1] if lines else "no output"
        raise AssetError(f"`{' '.join(command)}` failed (exit {done.returncode}): {detail}. {hint}".strip())
    return done.stdout


def _fetch_noto(stage: Path, work: Path) -> str:
    _run(
        ["apt-get", "download", NOTO_PACKAGE],
        work,
        "If apt cannot locate the package, run `apt-get update` once (as root) and try again.",
    )
    deb = next(work.glob("*.deb"))
    _run(["dpkg-deb", "-x", deb.name, "root"], work)
    version = _run(["dpkg-deb", "-f", deb.name, "Version"], work).strip()
    font = next((work / "root").rglob("NotoColorEmoji.ttf"), None)
    if font is None:
        raise AssetError(f"{deb.name} holds no NotoColorEmoji.ttf")
    stage.mkdir()
    shutil.move(font, stage / "NotoColorEmoji.ttf")
    for notice in (work / "root").rglob("copyright"):
        shutil.copy(notice, stage / "copyright")
    return version


def _fetch_npm(style: str, stage: Path, work: Path) -> str | None:
    package, keep = NPM_PACKAGES[style]
    _run(["npm", "pack", package], work, "Check that the npm registry is reachable (`npm ping`).")
    version = None
    with tarfile.open(next(work.glob("*.tgz"))) as tar:
        for member in tar:
            path = member.name.removeprefix("package/")
            if member.isfile() and ".." not in path.split("/") and path.startswith(keep):
                (stage / path).parent.mkdir(parents=True, exist_ok=True)
                (stage / path).write_bytes(tar.extractfile(member).read())
            elif member.name == "package/package.json":
                version = json.load(tar.extractfile(member))["version"]
    return version


def fetch_assets(styles: list[str], cache_dir: str | Path | None = None, progress: bool = True) -> dict:
    """The cache folder of each style (and of twemoji, for categories), fetching what is not cached yet."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folders = {}
    for style in dict.fromkeys([*styles, "twemoji"]):
        folder = cache_dir / style
        if not (folder / MARKERS[style]).exists():
            package = NOTO_PACKAGE if style == "noto" else NPM_PACKAGES[style][0]
            for tool in TOOLS[style]:
                if shutil.which(tool) is None:
                    raise AssetError(
                        f"the {style} style needs `{tool}` to fetch {package}, and it is not on PATH: "
                        f"install it, or put {MARKERS[style]} from {package} in {folder}"
                    )
            if progress:
                print(f"fetching the {style} assets into {folder}", file=sys.stderr)
            cache_dir.mkdir(parents=True, exist_ok=True)
            work = Path(tempfile.mkdtemp(prefix=f".{style}-", dir=cache_dir))
            try:
                stage = work / "stage"
                if style == "noto":
                    version = _fetch_noto(stage, work)
                else:
                    stage.mkdir()
                    version = _fetch_npm(style, stage, work)
                (stage / "source.json").write_text(json.dumps({"version": version}) + "\n", encoding="utf-8")
                shutil.rmtree(folder, ignore_errors=True)
                os.replace(stage, folder)
            finally:
                shutil.rmtree(work, ignore_errors=True)
        folders[style] = folder
    return folders


def _version(folder: Path) -> str | None:
    source = folder / "source.json"
    return json.loads(source.read_text(encoding="utf-8"))["version"] if source.is_file() else None


# ---------------------------------------------------------------- rendering


def check_renderers(styles: list[str]) -> None:
    """Raise AssetError when a style's renderer cannot work here (RAQM for noto, cairo for SVGs)."""
    if "noto" in styles and not features.check("raqm"):
        raise AssetError(
            "the noto style needs Pillow's RAQM text layout (libraqm, libfribidi, libharfbuzz) to draw flags "
            "and skin tones; with a Pillow wheel, install the system libfribidi0 (apt-get install "
            "libfribidi0), else build Pillow with libraqm"
        )
    if {"openmoji", "fluent"} & set(styles):
        try:
            import cairosvg  # noqa: F401
        except OSError as err:
            raise AssetError(f"openmoji and fluent need cairosvg and the system libcairo2: {err}") from None


def _pixels(image: Image.Image | None) -> tuple | None:
    return (image.size, image.tobytes()) if image is not None else None


@cache
def _noto(path: str) -> tuple[ImageFont.FreeTypeFont, float, tuple | None]:
    """The font, the advance of one emoji (all are equal), and the pixels of its "unknown flag", if any."""
    font = ImageFont.truetype(path, NOTO_SIZE, layout_engine=ImageFont.Layout.RAQM)
    unknown = _pixels(_crop(_draw_text(font, "\U0001f1ff\U0001f1ff")))  # there is no region ZZ
    return font, font.getlength("\U0001f600"), unknown


def _draw_text(font: ImageFont.FreeTypeFont, text: str) -> Image.Image:
    left, top, right, bottom = font.getbbox(text)
    margin = NOTO_SIZE // 4
    image = Image.new("RGBA", (right - left + 2 * margin, bottom - top + 2 * margin), (0, 0, 0, 0))
    ImageDraw.Draw(image).text((margin - left, margin - top), text, font=font, embedded_color=True)
    return image


def _crop(image: Image.Image) -> Image.Image | None:
    """The image cropped to its alpha bounding box; None when it is blank."""
    box = image.getchannel("A").getbbox()
    return image.crop(box) if box else None


def _render_noto(text: str, font_path: str) -> Image.Image | None:
    font, advance, unknown = _noto(font_path)
    if font.getlength(text) > 1.5 * advance:  # the font lacks the sequence and lays out its parts
        return None
    image = _crop(_draw_text(font, text))
    return None if image is None or (unknown is not None and _pixels(image) == unknown) else image


def _render_svg(svg: bytes, size: int) -> Image.Image:
    import cairosvg

    return Image.open(io.BytesIO(cairosvg.svg2png(bytestring=svg, output_width=size))).convert("RGBA")


def _fluent_svg(icons: dict, name: str) -> bytes:
    icon = icons["icons"][name]
    width, height = icon.get("width", icons.get("width", 16)), icon.get("height", icons.get("height", 16))
    left, top = icon.get("left", 0), icon.get("top", 0)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
        f'viewBox="{left} {top} {width} {height}">{icon["body"]}</svg>'
    ).encode()


def _square(image: Image.Image, resolution: int) -> Image.Image:
    """Pad a cropped RGBA image to a centered square on white, as RGB at `resolution` pixels."""
    side = max(image.size)
    canvas = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    canvas.alpha_composite(image, ((side - image.width) // 2, (side - image.height) // 2))
    canvas = canvas.convert("RGB")
    return canvas if side == resolution else canvas.resize((resolution, resolution), Image.LANCZOS)


@dataclass(frozen=True)
class _Job:
    style: str
    source: str | bytes  # noto: the emoji; twemoji and openmoji: a file; fluent: the SVG
    font_path: str
    path: str
    resolution: int


def _render_job(job: _Job) -> bool:
    """Write one image; False when the style cannot draw the emoji."""
    if job.style == "noto":
        image = _render_noto(job.source, job.font_path)
    elif job.style == "twemoji":
        image = _crop(Image.open(job.source).convert("RGBA"))
    else:
        svg = Path(job.source).read_bytes() if job.style == "openmoji" else job.source
        image = _crop(_render_svg(svg, max(SVG_MIN_SIZE, 4 * job.resolution)))
    if image is None:
        return False
    _square(image, job.resolution).save(job.path, optimize=False)
    return True


def _sources(style: str, folder: Path) -> dict[str, str | bytes]:
    """What to draw for each concept the style may have, by concept key."""
    if style == "noto":
        return {key: concept.text for key, concept in concepts().items()}
    if style == "twemoji":
        return {_hex_key(p.stem): str(p) for p in sorted((folder / "img/twitter/64").glob("*.png"))}
    if style == "openmoji":
        return {_hex_key(p.stem): str(p) for p in sorted((folder / "color/svg").glob("*.svg"))}
    icons = json.loads((folder / "icons.json").read_text(encoding="utf-8"))
    chars = json.loads((folder / "chars.json").read_text(encoding="utf-8"))
    drawn = {code: name for code, name in chars.items() if name in icons["icons"]}
    return {_hex_key(code): _fluent_svg(icons, name) for code, name in drawn.items()}


# ---------------------------------------------------------------- building the corpus


def _check_arguments(styles: list[str], resolution: int, heldout_fraction: float) -> None:
    if not styles or len(set(styles)) != len(styles) or not set(styles) <= set(STYLES):
        raise ValueError(f"styles must be distinct names from {','.join(STYLES)}; got {','.join(styles)}")
    if not 8 <= resolution <= 1024:
        raise ValueError(f"resolution must be in [8, 1024], got {resolution}")
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    check_renderers(styles)


def build(
    out: str | Path,
    styles: list[str] | tuple[str, ...] = STYLES,
    resolution: int = 64,
    cache_dir: str | Path | None = None,
    skin_tones: bool = True,
    heldout_fraction: float = 0.1,
    seed: int = 0,
    progress: bool = True,
    workers: int | None = None,
) -> dict[str, int]:
    """Write the emoji of `styles` as an imagefolder with `train/` and `validation/` splits.

    Fetches the assets into `cache_dir` first if they are not there. Returns the images written per style.
    """
    styles = list(styles)
    _check_arguments(styles, resolution, heldout_fraction)
    upscaled = {style: BITMAP_SIZES[style] for style in styles if resolution > BITMAP_SIZES.get(style, resolution)}
    if upscaled and progress:
        print(
            f"note: at {resolution} px, {' and '.join(f'{s} ({px} px)' for s, px in upscaled.items())} are upscaled "
            "from smaller bitmaps and look softer than the SVG styles (openmoji, fluent)",
            file=sys.stderr,
        )
    assets = fetch_assets(styles, cache_dir, progress)
    out = Path(out)
    for split in SPLITS:
        (out / split).mkdir(parents=True, exist_ok=True)
    table, kinds = concepts(), categories(assets)
    jobs, rows = [], []
    font_path = str(assets["noto"] / MARKERS["noto"]) if "noto" in styles else ""
    for style in styles:
        sources = _sources(style, assets[style])
        for key, concept in table.items():
            if key not in sources or (concept.skin_tone and not skin_tones):
                continue
            split = split_of(concept, seed, heldout_fraction)
            name = f"{style}_{key}.png"
            jobs.append(_Job(style, sources[key], font_path, str(out / split / name), resolution))
            category, subcategory = kinds[key]
            row = {"file_name": name, "text": concept.name, "style": style, "concept": key}
            row |= {"category": category, "subcategory": subcategory, "skin_tone": concept.skin_tone}
            rows.append((split, row))
    workers = workers or min(multiprocessing.cpu_count(), 8)
    parallel = workers > 1 and len(jobs) > 1
    pool = multiprocessing.get_context("spawn").Pool(workers) if parallel else contextlib.nullcontext()
    with pool:
        results = pool.imap(_render_job, jobs, chunksize=32) if parallel else map(_render_job, jobs)
        done = list(tqdm(results, total=len(jobs), desc="emoji", unit="img", disable=not progress))
    kept = [(split, row) for (split, row), ok in zip(rows, done, strict=True) if ok]
    counts = {style: {split: 0 for split in SPLITS} for style in styles}
    for split in SPLITS:
        split_rows = [row for s, row in kept if s == split]
        for row in split_rows:
            counts[row["style"]][split] += 1
        write_metadata(out / split, split_rows)
    info = {
        "resolution": resolution,
        "seed": seed,
        "heldout_fraction": heldout_fraction,
        "skin_tones": skin_tones,
        "upscaled_from_px": upscaled,
        "emoji_package": emoji.__version__,
        "counts": counts,
        "concepts": {split: len({row["concept"] for s, row in kept if s == split}) for split in SPLITS},
        "licences": {s: {"licence": LICENCES[s], "version": _version(assets[s])} for s in styles},
    }
    (out / "emoji_corpus.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return {style: sum(split_counts.values()) for style, split_counts in counts.items()}


def _cli(args: argparse.Namespace) -> None:
    styles = [s.strip() for s in args.styles.split(",") if s.strip()]
    _check_arguments(styles, args.resolution, args.heldout_fraction)
    start = time.perf_counter()
    fetch_assets(styles, args.cache_dir)
    fetched = time.perf_counter()
    from common.data.load import build_corpus  # here: render workers import this module and must start fast

    def build_into(folder: Path) -> dict[str, int]:
        return build(
            folder,
            styles,
            resolution=args.resolution,
            cache_dir=args.cache_dir,
            skin_tones=args.skin_tones,
            heldout_fraction=args.heldout_fraction,
            seed=args.seed,
            workers=args.workers,
        )

    counts = build_corpus(build_into, args.out, args.format, args.samples_per_shard)
    per_style = ", ".join(f"{style} {n}" for style, n in counts.items())
    print(
        f"wrote {sum(counts.values())} images ({per_style}) to {args.out}; "
        f"fetch {fetched - start:.1f} s, render {time.perf_counter() - fetched:.1f} s"
    )


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add `emoji` to the subcommands of `vqclip data`."""
    parser = subparsers.add_parser("emoji", help="render emoji in several art styles as an imagefolder")
    from common.cli import output_folder

    parser.add_argument(
        "--out", type=output_folder, required=True, help="output folder (train/ and validation/ go in it)"
    )
    parser.add_argument("--styles", default=",".join(STYLES), help="comma-separated, from the default ones")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument(
        "--cache-dir",
        default=None,
        help="asset cache (default: $VQCLIP_CACHE/emoji or ~/.cache/vqclip/emoji)",
    )
    parser.add_argument(
        "--no-skin-tones", dest="skin_tones", action="store_false", help="leave out the skin-tone variants"
    )
    parser.add_argument("--heldout-fraction", type=float, default=0.1, help="base concepts for validation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: all cores)")
    from common.data.load import add_format_args

    add_format_args(parser)
    parser.set_defaults(func=_cli)
