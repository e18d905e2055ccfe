"""Editing on the shapes world: does an edit show what the prompt names, drop the old object, keep the rest?

    python benchmarks/edit_quality.py                 # 100 pictures, the released models/shapes-demo
    python benchmarks/edit_quality.py --n 10          # a quick look
    python benchmarks/edit_quality.py --sheet edits.png   # also a contact sheet of the first 8 edits

Each of `--n` fresh pictures shows one object of a seen composition (random size and position); the mask is the
object's box (`corpora.shapes.render_with_box`) grown by 4 pixels, and the prompt names another color and another
shape on the same background ("a red star on grass"). `pipe.edit` draws the region with the model's editing defaults
(`edit_sampling` in its pipeline.json) and keeps the best of `--num-candidates` drawings, ranked with the whole
grid's likelihood; the naive edit ranks the same drawings with the likelihood of the redrawn codes alone, never
looking at the kept codes after them. The judge reads the blended edits. The PSNRs compare the tokenizer's drawing
(`blend=False`) with the tokenizer's reconstruction of the input, over all pictures' pixels together: `outside_psnr`
outside the mask grown by one code cell, `seam_psnr` on the ring one code cell wide just outside the mask.
`edit_s_quarter` and `generate_s` time (median of `--repeats`) an edit of a centered quarter-area box and a
generation from nothing, same settings. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from common.data import to_tensor
from common.grid import make_grid
from common.metrics import psnr
from corpora.shapes import POSITIONS, SEEN, SIZES, Scene, render_with_box, triple_prompt
from corpora.shapes_judge import load_judge
from pipelines.editing import edit_region, outline
from pipelines.text_to_image import DEMO_MODEL, TextToImagePipeline

GROW = 4  # pixels the object's box is grown by


def edits(n: int, resolution: int, seed: int) -> list[tuple[Scene, object, tuple[int, int, int, int], str]]:
    """`n` (scene, picture, mask box, prompt): fresh pictures and the edit each asks for."""
    rng, pick = np.random.default_rng(seed), random.Random(seed)
    jobs = []
    for _ in range(n):
        color, shape, background = pick.choice(SEEN)
        scene = Scene(color, shape, background, pick.choice(SIZES), pick.choice(POSITIONS))
        picture, (left, top, right, bottom) = render_with_box(scene, resolution, rng)
        others = [t for t in SEEN if t[2] == background and t[0] != color and t[1] != shape]
        box = (max(0, left - GROW), max(0, top - GROW), min(resolution, right + GROW), min(resolution, bottom + GROW))
        jobs.append((scene, picture, box, triple_prompt(*pick.choice(others))))
    return jobs


def pooled_psnr(a: torch.Tensor, b: torch.Tensor, where: torch.Tensor) -> float:
    """PSNR (dB) over the pixels where `where` (B, R, R) is True, of all pictures together."""
    return psnr(
        a.permute(1, 0, 2, 3)[:, where][None, :, :, None], b.permute(1, 0, 2, 3)[:, where][None, :, :, None]
    ).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEMO_MODEL), help="a pipeline folder (default: the released demo)")
    parser.add_argument("--n", type=int, default=100, help="pictures edited")
    parser.add_argument("--num-candidates", type=int, help="drawings per edit, the best kept (default: the model's)")
    parser.add_argument("--guidance-scale", type=float, help="default: the model's")
    parser.add_argument("--temperature", type=float, help="default: the model's")
    parser.add_argument("--repeats", type=int, default=3, help="timed edits and generations; the median is kept")
    parser.add_argument("--sheet", help="write the first 8 inputs (region outlined), edits and naive edits here")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=2026, help="seeds the pictures, the prompts and the sampling")
    args = parser.parse_args()

    pipe = TextToImagePipeline.from_pretrained(args.model).to(args.device)
    for name in ("num_candidates", "guidance_scale", "temperature"):
        if getattr(args, name) is not None:
            pipe.edit_sampling[name] = getattr(args, name)
    judge = load_judge(device=args.device)
    resolution, grid = pipe.vqvae.config.resolution, pipe.prior.config.grid_size
    cell = resolution // grid
    jobs = edits(args.n, resolution, args.seed)

    def edit(picture, box, prompt: str, fit: bool, index: int):
        generator = torch.Generator(args.device).manual_seed(args.seed + index)
        return pipe.edit(picture, box, prompt, generator=generator, fit_what_follows=fit, show_progress=False)

    scenes, prompts = [job[0] for job in jobs], [job[3] for job in jobs]
    sources = torch.stack([to_tensor(picture) for _, picture, _, _ in jobs]).to(pipe.device)
    with torch.no_grad():
        reconstructed = pipe.vqvae.decode(pipe.vqvae.encode(sources))
    start = time.perf_counter()
    results, sheet = {}, []
    for fit in (True, False):
        images, drawn, masks = [], [], []
        for index, (_, picture, box, prompt) in enumerate(tqdm(jobs, desc="fitted" if fit else "naive")):
            out = edit(picture, box, prompt, fit, index)
            images.append(out.images[0])
            drawn.append(pipe.vqvae.decode(out.codes))  # what blend=False returns
            masks.append(edit_region(box, picture.size, resolution))
        verdicts = judge.score(prompts, images)
        old = [r["color"] == s.color and r["shape"] == s.shape for r, s in zip(verdicts.readings, scenes, strict=True)]
        mask = torch.stack(masks).to(pipe.device)
        grown = F.max_pool2d(mask[:, None].float(), 2 * cell + 1, stride=1, padding=cell)[:, 0] > 0
        prefix = "" if fit else "naive_"
        results[f"{prefix}edit_match"] = verdicts.match_rate
        results[f"{prefix}old_object_kept"] = sum(old) / len(old)
        if fit:
            results["outside_psnr"] = pooled_psnr(torch.cat(drawn), reconstructed, ~grown)
        results[f"{prefix}seam_psnr"] = pooled_psnr(torch.cat(drawn), reconstructed, grown & ~mask)
        sheet.append(images[:8])
    seconds = time.perf_counter() - start

    quarter = (resolution // 4, resolution // 4, 3 * resolution // 4, 3 * resolution // 4)
    _, picture, _, prompt = jobs[0]
    timed = {"edit": [], "generate": []}
    for repeat in range(args.repeats):
        begin = time.perf_counter()
        edit(picture, quarter, prompt, True, repeat)
        timed["edit"].append(time.perf_counter() - begin)
        begin = time.perf_counter()
        generator = torch.Generator(args.device).manual_seed(args.seed + repeat)
        pipe(prompt, **pipe.edit_sampling, show_progress=False, generator=generator)  # the edit's settings
        timed["generate"].append(time.perf_counter() - begin)
    edit_s, generate_s = statistics.median(timed["edit"]), statistics.median(timed["generate"])
    if args.sheet:
        shown = [outline(p, edit_region(b, p.size, resolution)) for _, p, b, _ in jobs[:8]]
        labels = ["input", "edit", "naive edit"]
        cells = [image for row in zip(shown, *sheet, strict=True) for image in row]
        captions = [f"{labels[i % 3]}: {jobs[i // 3][3]}" if i % 3 else labels[0] for i in range(len(cells))]
        make_grid(cells, captions, columns=6).save(args.sheet)
    print(
        json.dumps(
            {
                **{k: round(v, 4) for k, v in results.items()},
                "edit_s_quarter": round(edit_s, 3),
                "generate_s": round(generate_s, 3),
                "edit_over_generate": round(edit_s / generate_s, 3),
                "pictures": len(jobs),
                **pipe.edit_sampling,
                "seconds": round(seconds, 1),
                "model": args.model,
            }
        )
    )


if __name__ == "__main__":
    main()
