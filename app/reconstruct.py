"""`vqclip reconstruct --model DIR IMAGE...`: see what the tokenizer keeps of your images."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from common.cli import output_folder
from common.data import image_pixels
from common.grid import make_grid, to_pil
from common.metrics import psnr


def reconstruct(model_dir: str, images: list[str], out: str | None = None) -> list[Path]:
    """Write `<name>.reconstruction.png` (original beside reconstruction) for each image; returns the paths."""
    from vqvae.model import VQVAE

    model = VQVAE.from_pretrained(model_dir)
    resolution = model.config.resolution
    written = []
    for name in images:
        pixels = image_pixels(name, resolution)[None]
        with torch.no_grad():
            codes = model.encode(pixels)
            reconstruction = model.decode(codes)
        score = psnr(reconstruction, pixels).item()
        grid = make_grid(to_pil(torch.cat([pixels, reconstruction])), ["original", f"{score:.1f} dB"], columns=2)
        target = Path(out) if out else Path(name).parent
        target.mkdir(parents=True, exist_ok=True)
        path = target / f"{Path(name).stem}.reconstruction.png"
        grid.save(path)
        print(f"{path}: {codes.shape[1]}x{codes.shape[2]} codes, PSNR {score:.1f} dB")
        written.append(path)
    return written


def _run(args: argparse.Namespace) -> None:
    if args.out is None:  # each PNG goes next to its image
        for image in args.images:
            try:
                output_folder(str(Path(image).parent))
            except argparse.ArgumentTypeError as err:
                raise ValueError(f"cannot write next to {image} ({err}); give --out") from None
    reconstruct(args.model, args.images, args.out)


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("reconstruct", help="encode and decode images with a trained tokenizer")
    parser.add_argument("--model", required=True, help="a VQ-VAE folder (config.json + model.safetensors)")
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument(
        "--out", type=output_folder, help="folder for the side-by-side PNGs (default: next to each image)"
    )
    parser.set_defaults(func=_run)
