"""Tokenizer quality: PSNR, SSIM, codebook usage and perplexity, and for the shapes world the judge's
attribute fidelity (the judge reads the same color, shape and background from the reconstruction as from
the original).

    python benchmarks/vqvae_quality.py --model runs/vqvae --data data/shapes
    python benchmarks/vqvae_quality.py            # the released shapes-world tokenizer on fresh data

Ends with one JSON line with keys `psnr`, `ssim`, `usage`, `perplexity`, `dead_codes`, `images`, and for
shapes-world data `attribute_fidelity` (plus the per-attribute rates).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from common.cli import ArgumentParser
from common.data import DataConfig, collate, load_image_text
from common.grid import to_pil
from pipelines.text_to_image import DEMO_MODEL
from vqvae.evaluate import evaluate
from vqvae.model import VQVAE

RELEASED = DEMO_MODEL / "vqvae"


@torch.no_grad()
def attribute_fidelity(model: VQVAE, dataset: torch.utils.data.Dataset, batch_size: int = 64) -> dict[str, float]:
    """How often the judge reads the same color, shape and background from reconstruction and original."""
    from corpora.shapes_judge import load_judge

    judge = load_judge()
    same: dict[str, list[bool]] = {}
    for batch in torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate):
        pixels = batch["pixel_values"]
        for name, agree in judge.agreement(to_pil(pixels), to_pil(model.decode(model.encode(pixels)))).items():
            same.setdefault(name, []).extend(agree)
    all_same = [all(row) for row in zip(*same.values(), strict=True)]
    return {
        "attribute_fidelity": sum(all_same) / len(all_same),
        **{f"fidelity_{name}": sum(agree) / len(agree) for name, agree in same.items()},
    }


def main() -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(RELEASED), help="a VQ-VAE folder (default: the released one)")
    parser.add_argument("--data", help="an image folder or dataset (default: 2,000 fresh shapes-world images)")
    parser.add_argument("--max-images", type=int, default=5000)
    parser.add_argument("--shapes", action="store_true", help="measure attribute fidelity (automatic for shapes data)")
    args = parser.parse_args()

    model = VQVAE.from_pretrained(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data
        if data_dir is None:
            from corpora.shapes import build

            data_dir = str(Path(tmp) / "shapes")
            build(data_dir, 2000, resolution=model.config.resolution, seed=987, val_fraction=0.5, progress=False)
        config = DataConfig(train_data_dir=data_dir, resolution=model.config.resolution)
        validation = load_image_text(config, progress=False).validation
        rows = torch.utils.data.Subset(validation, range(min(args.max_images, len(validation))))
        start = time.perf_counter()
        result = evaluate(model, rows, progress=False)
        shapes = args.shapes or (Path(data_dir) / "shapes_world.json").is_file()
        if shapes:
            result.update(attribute_fidelity(model, rows))
    result["seconds"] = round(time.perf_counter() - start, 1)
    result["model"] = args.model
    summary = f"PSNR {result['psnr']:.2f} dB, SSIM {result['ssim']:.3f}, usage {result['usage']:.1%}"
    if shapes:
        summary += f", attribute fidelity {result['attribute_fidelity']:.1%}"
    print(summary)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
