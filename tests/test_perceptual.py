import json

import pytest
import torch
from safetensors.torch import load_file

from corpora.shapes import build
from vqvae import perceptual
from vqvae.model import PRESETS, VQVAE
from vqvae.perceptual import CHANNELS, LPIPS, VGG16_FILE, load_lpips
from vqvae.train import main


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A random VGG16 state dict in torchvision's key layout (its convolutions, and a stand-in classifier entry
    that must be ignored) and random LPIPS calibration weights in the lpips package's layout."""
    folder = tmp_path_factory.mktemp("perceptual")
    generator = torch.Generator().manual_seed(0)
    vgg = {}
    for name, tensor in LPIPS().features.state_dict().items():
        if name.endswith("weight"):
            fan_in = tensor[0].numel()
            vgg[f"features.{name}"] = torch.randn(tensor.shape, generator=generator) * (2 / fan_in) ** 0.5
        else:
            vgg[f"features.{name}"] = torch.zeros(tensor.shape)
    vgg["classifier.6.bias"] = torch.zeros(1000)
    torch.save(vgg, folder / VGG16_FILE)
    linear = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=generator) for i, c in enumerate(CHANNELS)}
    torch.save(linear, folder / "vgg.pth")
    return folder


def test_distance_is_zero_for_the_same_picture_and_has_gradients(weights):
    lpips = load_lpips(weights / VGG16_FILE, weights / "vgg.pth")
    assert not any(p.requires_grad for p in lpips.parameters())
    generator = torch.Generator().manual_seed(1)
    target = torch.rand(2, 3, 32, 32, generator=generator) * 2 - 1
    assert torch.equal(lpips(target, target.clone()), torch.zeros(2))
    reconstruction = (target + 0.3 * torch.randn(2, 3, 32, 32, generator=generator)).requires_grad_(True)
    distance = lpips(reconstruction, target)
    assert distance.shape == (2,) and (distance > 0).all()
    distance.mean().backward()
    assert reconstruction.grad.abs().sum() > 0
    nearer = lpips(target + 0.1 * (reconstruction.detach() - target), target)
    assert (nearer < distance.detach()).all()
    with pytest.raises(ValueError, match="expected two batches"):
        lpips(target, target[:1])


def test_missing_weights_say_what_to_put_where(weights, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(ValueError, match=rf"not in the torch hub cache: put torchvision's {VGG16_FILE} .* in .*hub"):
        load_lpips("hub", weights / "vgg.pth")
    with pytest.raises(ValueError, match="does not exist: give the path of torchvision's VGG16 weights"):
        load_lpips(tmp_path / "nowhere.pth", weights / "vgg.pth")
    monkeypatch.setattr(perceptual, "packaged_linear_path", lambda: None)  # the lpips package not installed
    with pytest.raises(ValueError, match="calibration weights are missing: `pip install lpips`"):
        load_lpips(weights / VGG16_FILE)
    (tmp_path / "not-weights.pth").write_text("hello")
    with pytest.raises(ValueError, match="is not a torch state dict"):
        load_lpips(tmp_path / "not-weights.pth", weights / "vgg.pth")
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="missing weight '0.bias'"):
        load_lpips(tmp_path / "partial.pth", weights / "vgg.pth")


def test_weights_are_found_in_the_hub_cache_and_the_lpips_package(weights, tmp_path, monkeypatch):
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / VGG16_FILE).symlink_to(weights / VGG16_FILE)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    package = tmp_path / "site" / "lpips"  # laid out as the lpips wheel is; it is never imported
    (package / "weights" / "v0.1").mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('importing lpips is not needed')\n")
    (package / "weights" / "v0.1" / "vgg.pth").symlink_to(weights / "vgg.pth")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert perceptual.packaged_linear_path() == package / "weights" / "v0.1" / "vgg.pth"
    found = load_lpips("hub")
    given = load_lpips(weights / VGG16_FILE, weights / "vgg.pth")
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(found(pixels, pixels.flip(0)), given(pixels, pixels.flip(0)))


def test_training_with_the_perceptual_loss(weights, tmp_path):
    build(tmp_path / "data", 40, resolution=32, seed=0, workers=1, progress=False)
    args = ["--train_data_dir", str(tmp_path / "data"), "--resolution", "32", "--output_dir", str(tmp_path / "out"),
            "--preset", "tiny", "--model_config", '{"resolution": 32}', "--max_train_steps", "2",
            "--train_batch_size", "4", "--logging_steps", "1", "--perceptual_weights", str(weights / VGG16_FILE),
            "--lpips_weights", str(weights / "vgg.pth")]  # fmt: skip
    main(args)
    logs = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert all(row["lpips"] > 0 for row in logs)
    saved = load_file(tmp_path / "out" / "model.safetensors")  # the tokenizer alone: no VGG or LPIPS weights
    assert saved.keys() == VQVAE(PRESETS["tiny"]).state_dict().keys()
    with pytest.raises(ValueError, match="perceptual loss: .* does not exist"):
        main([*args[:-4], "--perceptual_weights", str(tmp_path / "nowhere.pth")])
