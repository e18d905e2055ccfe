import json

import torch

from corpora.shapes import build
from vqvae.gan import VQGAN, PatchDiscriminator, adaptive_weight, hinge_discriminator_loss
from vqvae.model import PRESETS, VQVAE
from vqvae.train import main


def test_generator_loss_never_trains_the_discriminator():
    torch.manual_seed(0)
    model = VQGAN(VQVAE(PRESETS["tiny"]), PatchDiscriminator(8, layers=2))
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    out, fake_for_generator, real, fake = model(pixels)
    (-fake_for_generator.mean()).backward(retain_graph=True)
    assert all(p.grad is None for p in model.discriminator.parameters())
    assert model.vqvae.decoder.net[-1].weight.grad.abs().sum() > 0
    model.zero_grad()
    hinge_discriminator_loss(real, fake).backward(retain_graph=True)
    assert all(p.grad is not None for p in model.discriminator.parameters())
    assert all(p.grad is None for p in model.vqvae.decoder.parameters())  # fake images are detached
    rec = (out.reconstruction - pixels).abs().mean()
    weight = adaptive_weight(rec, -fake_for_generator.mean(), model.vqvae.decoder.net[-1].weight)
    assert weight.item() > 0 and not weight.requires_grad


def test_training_with_the_adversarial_loss_saves_the_tokenizer(tmp_path):
    build(tmp_path / "data", 60, resolution=16, seed=0, workers=1, progress=False)
    args = ["--train_data_dir", str(tmp_path / "data"), "--resolution", "16", "--output_dir", str(tmp_path / "out"),
            "--preset", "tiny", "--max_train_steps", "3", "--train_batch_size", "8", "--logging_steps", "1",
            "--disc_start_step", "1", "--disc_channels", "8", "--disc_layers", "2"]  # fmt: skip
    main(args)
    logs = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert logs[0]["g_weight"] == 0 and logs[-1]["g_weight"] > 0  # off before the start step, on after
    assert VQVAE.from_pretrained(tmp_path / "out").config.codebook_size == PRESETS["tiny"].codebook_size
