"""The released shapes-world model (`models/shapes-demo`): it loads, fits its size budget, and each stage still
does its job, so the released weights can never silently go stale."""

import torch

from app.demo import run as run_demo
from common.data import DataConfig, load_image_text
from common.grid import to_pil
from common.metrics import psnr
from corpora import shapes
from corpora.shapes_judge import load_judge
from pipelines.text_to_image import DEMO_MODEL, TextToImagePipeline

MAX_BYTES = 30 * 10**6


def test_released_model_fits_its_size_budget():
    files = [p for p in DEMO_MODEL.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"pipeline.json", "config.json", "model.safetensors"}
    assert sum(p.stat().st_size for p in files) <= MAX_BYTES


def test_released_model_draws_what_its_prompts_say():
    pipe = TextToImagePipeline.from_pretrained(DEMO_MODEL)
    prompts = ["a blue ball on grass", "a red star in the night sky", "a yellow heart on sand"]
    out = pipe(prompts, num_images_per_prompt=4, generator=torch.Generator().manual_seed(0), show_progress=False)
    assert load_judge().score(out.prompts, out.images).match_rate >= 0.75


def test_released_tokenizer_and_contrastive_model_work_on_fresh_images(tmp_path):
    pipe = TextToImagePipeline.from_pretrained(DEMO_MODEL)
    shapes.build(tmp_path, 64, seed=4321, val_fraction=0.5, workers=1, progress=False)
    rows = load_image_text(DataConfig(train_data_dir=str(tmp_path)), progress=False).validation
    pixels = torch.stack([rows[i]["pixel_values"] for i in range(len(rows))])
    rebuilt = pipe.vqvae.decode(pipe.vqvae.encode(pixels))
    assert psnr(rebuilt, pixels).mean() > 30
    agreement = load_judge().agreement(to_pil(pixels), to_pil(rebuilt))  # color, shape and background
    same = [all(row) for row in zip(*agreement.values(), strict=True)]
    assert sum(same) / len(same) >= 0.9
    scores = pipe.contrastive.similarity(pixels, rows.captions)  # each image with its own caption
    shuffled = pipe.contrastive.similarity(pixels, rows.captions[1:] + rows.captions[:1])
    assert (scores > shuffled).float().mean() >= 0.8


def test_demo_runs(tmp_path, capsys):
    summary = run_demo(None, tmp_path, num_images=1, num_candidates=2, num_world_images=40, seed=0)
    assert (tmp_path / "generated.png").is_file() and (tmp_path / "search.png").is_file()
    assert (tmp_path / "demo.json").is_file()
    assert 0 <= summary["generation"]["judge_match_rate"] <= 1
    assert "the judge finds every attribute" in capsys.readouterr().out
