"""Optional adversarial loss for the tokenizer (VQGAN): a PatchGAN discriminator with hinge loss, switched on
after a configurable step, weighted adaptively so that its gradient at the decoder's last layer matches the
reconstruction loss's (Esser et al. 2021)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from vqvae.model import VQVAE, VQVAEOutput


class PatchDiscriminator(nn.Module):
    """Maps (B, 3, H, W) to a (B, 1, h, w) grid of real/fake logits, one per overlapping patch."""

    def __init__(self, channels: int = 64, layers: int = 3) -> None:
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(3, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        width = channels
        for i in range(1, layers + 1):
            out = channels * min(2**i, 8)
            stride = 2 if i < layers else 1
            blocks += [nn.Conv2d(width, out, 4, stride=stride, padding=1), nn.GroupNorm(8, out), nn.LeakyReLU(0.2)]
            width = out
        blocks.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*blocks)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net(pixels)


class VQGAN(nn.Module):
    """The tokenizer and its discriminator, trained together with one optimizer."""

    def __init__(self, vqvae: VQVAE, discriminator: PatchDiscriminator) -> None:
        super().__init__()
        self.vqvae = vqvae
        self.discriminator = discriminator

    def forward(self, pixels: torch.Tensor) -> tuple[VQVAEOutput, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tokenizer output, the generator's logits (through a frozen copy of the discriminator's weights, so
        the generator loss never trains the discriminator), and the discriminator's real and fake logits."""
        out = self.vqvae(pixels)
        frozen = {name: p.detach() for name, p in self.discriminator.named_parameters()}
        fake_for_generator = functional_call(self.discriminator, frozen, (out.reconstruction,))
        real = self.discriminator(pixels)
        fake = self.discriminator(out.reconstruction.detach())
        return out, fake_for_generator, real, fake


def hinge_discriminator_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return F.relu(1 - real).mean() + F.relu(1 + fake).mean()


def adaptive_weight(
    reconstruction_loss: torch.Tensor, generator_loss: torch.Tensor, last_layer: torch.Tensor
) -> torch.Tensor:
    """||grad rec|| / ||grad gen|| at the decoder's last layer, clamped; a constant for backprop."""
    rec_grad = torch.autograd.grad(reconstruction_loss, last_layer, retain_graph=True)[0]
    gen_grad = torch.autograd.grad(generator_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (gen_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()
