"""The LPIPS perceptual distance (Zhang et al. 2018, version 0.1) on VGG16 features, for the tokenizer's loss.

It needs two files on disk; nothing is downloaded:

- VGG16's ImageNet weights as torchvision saves them (`vgg16-397923af.pth`, 528 MB): a path, or "hub" for
  the torch hub cache (`~/.cache/torch/hub/checkpoints/`, or `$TORCH_HOME/hub/checkpoints/`), where
  `torchvision.models.vgg16(weights="IMAGENET1K_V1")` leaves them on a machine that is online;
- LPIPS's linear calibration of those features (`weights/v0.1/vgg.pth`, 7 kB): a path, or by default the
  copy inside the `lpips` package (`pip install lpips`), read from its folder without importing it.

Both are read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from torch import nn

from common.hub import check_state_dict

HUB = "hub"
# the layers LPIPS compares: relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3 of torchvision's vgg16().features
TAPS = (3, 8, 15, 22, 29)
CHANNELS = (64, 128, 256, 512, 512)
VGG16_FILE = "vgg16-397923af.pth"  # torchvision's VGG16_Weights.IMAGENET1K_V1
LINEAR_FILE = Path("weights") / "v0.1" / "vgg.pth"  # inside the lpips package


def hub_vgg16_path() -> Path:
    """Where the torch hub cache keeps torchvision's VGG16 weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE


def packaged_linear_path() -> Path | None:
    """LPIPS's calibration file inside the installed `lpips` package, or None when it is not installed."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / LINEAR_FILE
    return path if path.is_file() else None


def _read(path: Path, what: str) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a malformed file fails in the unpickler in many ways (KeyError, EOFError, ...)
        raise ValueError(f"{path} is not a torch state dict of {what}: {type(err).__name__}: {err}") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} is not a torch state dict of {what}")
    return state


def _vgg16_path(vgg_weights: str | os.PathLike) -> Path:
    if str(vgg_weights) == HUB:
        path = hub_vgg16_path()
        if not path.is_file():
            raise ValueError(
                f"the VGG16 weights are not in the torch hub cache: put torchvision's {VGG16_FILE} (528 MB) in "
                f"{path.parent}/ (a machine that is online fetches it with "
                f'`torchvision.models.vgg16(weights="IMAGENET1K_V1")`), or give its path'
            )
        return path
    path = Path(vgg_weights)
    if not path.is_file():
        raise ValueError(
            f"{path} does not exist: give the path of torchvision's VGG16 weights ({VGG16_FILE}, 528 MB), or "
            f'"{HUB}" to read them from {hub_vgg16_path().parent}/'
        )
    return path


def _linear_path(linear_weights: str | os.PathLike | None) -> Path:
    if linear_weights is None:
        path = packaged_linear_path()
        if path is None:
            raise ValueError(
                "LPIPS's calibration weights are missing: `pip install lpips` (the package holds "
                f"{LINEAR_FILE.as_posix()}, read from disk), or give the path of that vgg.pth"
            )
        return path
    path = Path(linear_weights)
    if not path.is_file():
        raise ValueError(f"{path} does not exist: give the path of LPIPS's {LINEAR_FILE.as_posix()}")
    return path


class LPIPS(nn.Module):
    """Frozen LPIPS distance between two batches of pictures in [-1, 1]: (B, 3, H, W) x 2 -> (B,).

    Zero for identical pictures, differentiable in both. Build it with `load_lpips`.
    """

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models import vgg16

        with torch.device("meta"):  # only the convolutions are kept: the classifier is never allocated
            features = vgg16(weights=None).features[: TAPS[-1] + 1]
        self.features = features.to_empty(device="cpu")
        self.lin = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in CHANNELS)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None], persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None], persistent=False)
        self.requires_grad_(False)
        self.eval()

    def _taps(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """Unit-length feature vectors at each tapped layer."""
        x, taps = (pixels - self.shift) / self.scale, []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in TAPS:
                f = x.float()
                taps.append(f / (f.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
        return taps

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.shape != b.shape or a.ndim != 4 or a.shape[1] != 3:
            raise ValueError(f"expected two batches of shape (B, 3, H, W), got {tuple(a.shape)} and {tuple(b.shape)}")
        distance = a.new_zeros(a.shape[0], dtype=torch.float32)
        for lin, fa, fb in zip(self.lin, self._taps(a), self._taps(b), strict=True):
            distance = distance + lin((fa - fb).pow(2)).mean((1, 2, 3))  # weighted channels, spatial average
        return distance


def load_lpips(vgg_weights: str | os.PathLike, linear_weights: str | os.PathLike | None = None) -> LPIPS:
    """LPIPS from torchvision's VGG16 weights (a path, or "hub") and LPIPS's calibration (a path, or None for the
    `lpips` package's copy). A missing or malformed file raises ValueError saying what to put where."""
    model = LPIPS()
    vgg_path, linear_path = _vgg16_path(vgg_weights), _linear_path(linear_weights)
    vgg = _read(vgg_path, "torchvision's VGG16")
    features = {k.removeprefix("features."): v for k, v in vgg.items() if k.startswith("features.")}
    check_state_dict(model.features.state_dict(), features, vgg_path)
    model.features.load_state_dict(features)
    linear = _read(linear_path, "LPIPS's calibration")
    linear = {k.removeprefix("lin").replace(".model.1.", "."): v for k, v in linear.items()}  # lin0.model.1.weight
    check_state_dict(model.lin.state_dict(), linear, linear_path)
    model.lin.load_state_dict(linear)
    return model
