"""Tokenizer metrics on a dataset, and the originals-over-reconstructions grid."""

from __future__ import annotations

import math

import torch
from PIL import Image
from tqdm.auto import tqdm

from common.data import collate
from common.grid import make_grid, to_pil
from common.metrics import psnr, ssim
from vqvae.model import VQVAE


@torch.no_grad()
def evaluate(
    model: VQVAE, dataset: torch.utils.data.Dataset, batch_size: int = 64, progress: bool = True
) -> dict[str, float]:
    """PSNR, SSIM, codebook usage, perplexity and dead codes over `dataset`."""
    model.eval()
    device = next(model.parameters()).device
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate)
    counts = torch.zeros(model.config.codebook_size, dtype=torch.long)
    psnrs, ssims = [], []
    for batch in tqdm(loader, desc="evaluating tokenizer", disable=not progress):
        pixels = batch["pixel_values"].to(device)
        codes = model.encode(pixels)
        reconstruction = model.decode(codes)
        psnrs.append(psnr(reconstruction, pixels).cpu())
        ssims.append(ssim(reconstruction, pixels).cpu())
        counts += torch.bincount(codes.flatten().cpu(), minlength=model.config.codebook_size)
    if not psnrs:
        raise ValueError("cannot evaluate on an empty dataset")
    probs = counts.float() / counts.sum()
    entropy = -(probs * torch.log(probs.clamp_min(1e-10))).sum().item()
    used = int((counts > 0).sum())
    return {
        "psnr": torch.cat(psnrs).mean().item(),
        "ssim": torch.cat(ssims).mean().item(),
        "usage": used / model.config.codebook_size,
        "perplexity": math.exp(entropy),
        "dead_codes": model.config.codebook_size - used,
        "images": int(sum(len(p) for p in psnrs)),
    }


@torch.no_grad()
def reconstruction_grid(model: VQVAE, pixels: torch.Tensor, labels: bool = True) -> Image.Image:
    """Originals in the top row, their reconstructions below, with per-image PSNR."""
    model.eval()
    pixels = pixels.to(next(model.parameters()).device)
    reconstruction = model.decode(model.encode(pixels))
    scores = psnr(reconstruction, pixels).tolist()
    names = ["original"] * len(pixels) + [f"{s:.1f} dB" for s in scores] if labels else None
    return make_grid(to_pil(pixels) + to_pil(reconstruction), names, columns=len(pixels))
