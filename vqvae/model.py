"""The VQ-VAE image tokenizer: conv encoder -> vector quantizer -> conv decoder.

`encode(pixels) -> codes (B, h, w)`, `decode(codes) -> pixels in [-1, 1]`, and `forward(pixels) ->
VQVAEOutput`. The larger presets add single-head self-attention at the lowest resolution of encoder and
decoder, as taming's VQGAN and LlamaGen's VQ do. The quantizer looks codes up in a low-dimensional,
optionally l2-normalized space (LlamaGen's remedy for codebook collapse), can update its codebook by EMA
instead of by gradient, initializes the codebook from the first batch of encoder outputs, and restarts
codes that fall out of use. Codebook usage and perplexity are computed on every forward pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from common.config import Config, ConfigError, added_field
from common.hub import PretrainedModel


@dataclass
class VQVAEConfig(Config):
    resolution: int = 64
    in_channels: int = 3
    base_channels: int = 64
    # one entry per resolution level; the image is downsampled by 2 ** (len(channel_mult) - 1)
    channel_mult: tuple[int, ...] = (1, 2, 2)
    # residual blocks per level, highest resolution first (full-resolution blocks dominate CPU cost)
    num_res_blocks: tuple[int, ...] = (1, 1, 1)
    latent_channels: int = 64
    codebook_size: int = 512
    codebook_dim: int = 8
    l2_normalize: bool = True
    beta: float = 0.25
    ema: bool = False
    ema_decay: float = 0.99
    # a code whose running usage falls below this fraction of uniform usage is restarted
    dead_code_threshold: float = 0.03
    # levels (0 = full resolution) whose residual blocks are each followed by self-attention, in the encoder and
    # (mirrored) in the decoder
    attention_levels: tuple[int, ...] = added_field(())
    # the blocks between the last level and the code space, in the encoder and the decoder: one residual block,
    # or with this, residual block, self-attention, residual block
    mid_attention: bool = added_field(False)

    limits = {
        "resolution": (8, 1024),
        "in_channels": (1, 4),
        "base_channels": (1, 1024),
        "channel_mult": (1, 16),
        "num_res_blocks": (0, 8),
        "latent_channels": (1, 1024),
        "codebook_size": (2, 65536),
        "codebook_dim": (1, 1024),
        "beta": (0.0, 10.0),
        "ema_decay": (0.0, 1.0),
        "dead_code_threshold": (0.0, 1.0),
        "attention_levels": (0, 5),
    }

    def validate(self) -> None:
        super().validate()
        if not 1 <= len(self.channel_mult) <= 6:
            raise ConfigError(f"config field 'channel_mult': needs 1 to 6 levels, got {len(self.channel_mult)}")
        if len(self.num_res_blocks) != len(self.channel_mult):
            raise ConfigError(
                f"config field 'num_res_blocks': needs one entry per level ({len(self.channel_mult)}), "
                f"got {len(self.num_res_blocks)}"
            )
        if len(set(self.attention_levels)) != len(self.attention_levels) or any(
            level >= len(self.channel_mult) for level in self.attention_levels
        ):
            raise ConfigError(
                f"config field 'attention_levels': needs distinct levels below {len(self.channel_mult)}, "
                f"got {self.attention_levels}"
            )
        if self.resolution % self.downsample_factor:
            raise ConfigError(
                f"config field 'resolution': {self.resolution} is not divisible by the downsampling factor "
                f"{self.downsample_factor}"
            )

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def grid_size(self) -> int:
        return self.resolution // self.downsample_factor


# what the 128- and 256-px presets share
_LARGE = {"base_channels": 128, "latent_channels": 256, "codebook_size": 16384, "mid_attention": True}
_F8 = {**_LARGE, "channel_mult": (1, 2, 2, 4), "num_res_blocks": (2, 2, 2, 2), "attention_levels": (3,)}

PRESETS: dict[str, VQVAEConfig] = {
    # tiny: for tests
    "tiny": VQVAEConfig(
        resolution=16,
        base_channels=8,
        channel_mult=(1, 2),
        num_res_blocks=(1, 1),
        latent_channels=8,
        codebook_size=16,
        codebook_dim=4,
    ),
    # shapes world, 64 px -> 8 x 8 codes
    "shapes-f8": VQVAEConfig(
        base_channels=16, channel_mult=(1, 2, 4, 8), num_res_blocks=(0, 0, 1, 1), codebook_size=512
    ),
    # 64 px -> 16 x 16 codes
    "f4": VQVAEConfig(base_channels=16, channel_mult=(1, 2, 4), num_res_blocks=(0, 1, 2), codebook_size=1024),
    # 64 px -> 16 x 16 codes, wide enough to keep small shapes' edges (2.1M parameters; train it on a GPU)
    "f4-wide": VQVAEConfig(base_channels=48, channel_mult=(1, 2, 2), num_res_blocks=(1, 2, 2), codebook_size=1024),
    # Pictures of 128 and 256 px, after taming's VQGAN and LlamaGen's VQ-8 and VQ-16: 128 channels widening to
    # 512, self-attention at the lowest resolution, 16,384 l2-normalized 8-dimensional codes; train them on a GPU.
    "f8-128": VQVAEConfig(resolution=128, **_F8),  # 128 px -> 16 x 16 codes
    "f8-256": VQVAEConfig(resolution=256, **_F8),  # 256 px -> 32 x 32 codes
    "f16-256": VQVAEConfig(  # 256 px -> 16 x 16 codes
        resolution=256, **_LARGE, channel_mult=(1, 1, 2, 2, 4), num_res_blocks=(2, 2, 2, 2, 2), attention_levels=(4,)
    ),
}


# elements of the (rows, codebook size) blocks the quantizer computes at once (64 MB of float32)
_CHUNK_ELEMENTS = 1 << 24


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            _norm(in_ch), nn.SiLU(), nn.Conv2d(in_ch, out_ch, 3, padding=1),
            _norm(out_ch), nn.SiLU(), nn.Conv2d(out_ch, out_ch, 3, padding=1),
        )  # fmt: skip
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.block(x)


class AttentionBlock(nn.Module):
    """Single-head self-attention over every position of a feature map, with a residual (taming's AttnBlock).

    Not causal: each output position sees the whole map. (B, C, h, w) -> (B, C, h, w).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        q, k, v = rearrange(self.qkv(self.norm(x)), "b (n c) h w -> n b 1 (h w) c", n=3)  # each (B, 1, hw, C)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, 1, hw, C)
        return x + self.proj(rearrange(out, "b 1 (h w) c -> b c h w", h=h, w=w))


def _level(c: VQVAEConfig, level: int, ch: int, width: int) -> tuple[list[nn.Module], int]:
    """The residual blocks of one resolution level, each followed by attention at the attention levels."""
    layers: list[nn.Module] = []
    for _ in range(c.num_res_blocks[level]):
        layers.append(ResBlock(ch, width))
        ch = width
        if level in c.attention_levels:
            layers.append(AttentionBlock(ch))
    return layers, ch


def _mid(c: VQVAEConfig, ch: int) -> list[nn.Module]:
    """The blocks at the code grid's resolution, between the last level and the code space."""
    return [ResBlock(ch, ch), AttentionBlock(ch), ResBlock(ch, ch)] if c.mid_attention else [ResBlock(ch, ch)]


def run_layers(net: nn.Sequential, x: torch.Tensor, recompute: bool) -> torch.Tensor:
    """`net(x)`; with `recompute` (training), the residual and attention blocks keep only their inputs and
    recompute their activations in the backward pass."""
    if not (recompute and torch.is_grad_enabled()):
        return net(x)
    for layer in net:
        x = checkpoint(layer, x, use_reentrant=False) if isinstance(layer, (ResBlock, AttentionBlock)) else layer(x)
    return x


class Encoder(nn.Module):
    def __init__(self, c: VQVAEConfig) -> None:
        super().__init__()
        self.gradient_checkpointing = False
        widths = [c.base_channels * m for m in c.channel_mult]
        layers: list[nn.Module] = [nn.Conv2d(c.in_channels, widths[0], 3, padding=1)]
        ch = widths[0]
        for level, width in enumerate(widths):
            blocks, ch = _level(c, level, ch, width)
            layers += blocks
            if level < len(widths) - 1:
                layers.append(nn.Conv2d(ch, widths[level + 1], 3, stride=2, padding=1))
                ch = widths[level + 1]
        layers += [*_mid(c, ch), _norm(ch), nn.SiLU(), nn.Conv2d(ch, c.latent_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_layers(self.net, x, self.gradient_checkpointing)  # (B, 3, H, W) -> (B, latent, H/f, W/f)


class Decoder(nn.Module):
    def __init__(self, c: VQVAEConfig) -> None:
        super().__init__()
        self.gradient_checkpointing = False
        widths = [c.base_channels * m for m in c.channel_mult][::-1]
        top = len(widths) - 1
        ch = widths[0]
        layers: list[nn.Module] = [nn.Conv2d(c.latent_channels, ch, 3, padding=1), *_mid(c, ch)]
        for level, width in enumerate(widths):  # lowest resolution first: the encoder's level top - level
            blocks, ch = _level(c, top - level, ch, width)
            layers += blocks
            if level < top:
                layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, widths[level + 1], 3, padding=1)]
                ch = widths[level + 1]
        layers += [_norm(ch), nn.SiLU(), nn.Conv2d(ch, c.in_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return run_layers(self.net, z, self.gradient_checkpointing)  # (B, latent, h, w) -> (B, 3, H, W)


@dataclass
class QuantizerOutput:
    quantized: torch.Tensor  # (B, D, h, w) straight-through: forward value z_q, gradient to z_e
    codes: torch.Tensor  # (B, h, w) long
    commitment_loss: torch.Tensor  # beta * ||z_e - sg(z_q)||^2
    codebook_loss: torch.Tensor  # ||sg(z_e) - z_q||^2 (zero with EMA updates)
    perplexity: torch.Tensor  # exp(entropy of the batch's code histogram)
    usage: torch.Tensor  # fraction of codes used in this batch


def _all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from every process (same shape on each), or return it when not distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def _all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(x)
    return x


class VectorQuantizer(nn.Module):
    """Nearest-neighbour quantizer with a straight-through gradient.

    Training-time codebook updates (data init, EMA, dead-code restart) use statistics gathered over
    all processes and the same random choices on each, so the codebook stays identical everywhere.
    """

    def __init__(self, dim: int, codebook_size: int, codebook_dim: int, c: VQVAEConfig) -> None:
        super().__init__()
        self.codebook_size = codebook_size
        self.beta = c.beta
        self.l2_normalize = c.l2_normalize
        self.ema = c.ema
        self.ema_decay = c.ema_decay
        self.dead_code_threshold = c.dead_code_threshold
        self.project_in = nn.Conv2d(dim, codebook_dim, 1) if dim != codebook_dim else nn.Identity()
        self.project_out = nn.Conv2d(codebook_dim, dim, 1) if dim != codebook_dim else nn.Identity()
        self.codebook = nn.Parameter(torch.randn(codebook_size, codebook_dim) / math.sqrt(codebook_dim))
        self.codebook.requires_grad_(not c.ema)
        self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("usage_ema", torch.full((codebook_size,), 1.0 / codebook_size))
        self.register_buffer("ema_sum", self.codebook.detach().clone())
        self.register_buffer("ema_count", torch.ones(codebook_size))

    def lookup_table(self) -> torch.Tensor:
        return F.normalize(self.codebook, dim=-1) if self.l2_normalize else self.codebook

    # Projection into code space and the nearest-neighbour search run in float32 even under mixed-precision
    # autocast: in bfloat16 the distances between close codes round together and the wrong code wins.
    def _prepare(self, z: torch.Tensor) -> torch.Tensor:
        with torch.autocast(z.device.type, enabled=False):
            z = self.project_in(z.float())
            return F.normalize(z, dim=1) if self.l2_normalize else z

    def _chunks(self, flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """`flat` split into row blocks whose (rows, codebook size) intermediates stay near 64 MB."""
        return flat.split(max(1, _CHUNK_ELEMENTS // self.codebook_size))

    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """Index of the nearest codebook entry for each row of `flat` (N, D), a block of rows at a time."""
        with torch.autocast(flat.device.type, enabled=False):
            table = self.lookup_table()
            table_sq = table.pow(2).sum(1)[None]
            codes = [
                (rows.pow(2).sum(1, keepdim=True) - 2 * rows @ table.t() + table_sq).argmin(1)
                for rows in self._chunks(flat.float())
            ]
        return torch.cat(codes) if codes else flat.new_zeros(0, dtype=torch.long)

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, h, w) codes -> (B, dim, h, w) decoder input."""
        z_q = rearrange(self.lookup_table()[codes], "b h w d -> b d h w")
        return self.project_out(z_q)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        z_e = self._prepare(z)  # (B, D, h, w)
        b, _, h, w = z_e.shape
        flat = rearrange(z_e, "b d h w -> (b h w) d")
        if self.training:
            self._update_codebook(flat.detach())
        codes = self.nearest(flat.detach())
        z_q = self.lookup_table()[codes]  # (N, D)
        commitment = self.beta * F.mse_loss(flat, z_q.detach())
        codebook = F.mse_loss(flat.detach(), z_q) if not self.ema else flat.new_zeros(())
        z_q = flat + (z_q - flat).detach()  # straight-through estimator
        counts = torch.bincount(codes, minlength=self.codebook_size).float()
        probs = counts / counts.sum()
        perplexity = torch.exp(-(probs * torch.log(probs.clamp_min(1e-10))).sum())
        if self.training:
            self._track_usage(codes)
        quantized = self.project_out(rearrange(z_q, "(b h w) d -> b d h w", b=b, h=h, w=w))
        return QuantizerOutput(
            quantized=quantized,
            codes=codes.view(b, h, w),
            commitment_loss=commitment,
            codebook_loss=codebook,
            perplexity=perplexity,
            usage=(counts > 0).float().mean(),
        )

    @torch.no_grad()
    def _update_codebook(self, flat: torch.Tensor) -> None:
        everyone = _all_gather_cat(flat)
        first = not bool(self.initialized)
        if first:
            self._init_from_data(everyone)
        if self.ema:
            codes = self.nearest(everyone)
            counts = torch.bincount(codes, minlength=self.codebook_size).type_as(everyone)
            # per-code sums of the vectors, by one-hot products a block at a time: deterministic, unlike index_add_
            # on a GPU, so every process computes the same codebook
            sums = sum(
                F.one_hot(block_codes, self.codebook_size).type_as(rows).t() @ rows
                for block_codes, rows in zip(self._chunks(codes), self._chunks(everyone), strict=True)
            )
            self.ema_count.mul_(self.ema_decay).add_(counts, alpha=1 - self.ema_decay)
            self.ema_sum.mul_(self.ema_decay).add_(sums, alpha=1 - self.ema_decay)
            n = self.ema_count.sum()
            count = (self.ema_count + 1e-5) / (n + self.codebook_size * 1e-5) * n  # Laplace smoothing
            self.codebook.data.copy_(self.ema_sum / count[:, None])
        if not first:  # restarts draw on later batches than the one the codes were just drawn from
            self.restart_dead_codes(everyone)

    def _generator(self, flat: torch.Tensor) -> torch.Generator:
        """The same random stream on every process: seeded from the gathered data itself."""
        seed = int(flat.abs().sum().item() * 1e4) % (2**31)
        return torch.Generator(device=flat.device).manual_seed(seed)

    def _init_from_data(self, flat: torch.Tensor) -> None:
        """Codes on distinct encoder outputs. When the batch has fewer vectors than codes, the codes beyond them
        repeat the first ones and start out of use, so the next batches restart them on fresh outputs."""
        generator = self._generator(flat)
        n, rounds = flat.shape[0], math.ceil(self.codebook_size / flat.shape[0])
        pick = torch.cat([torch.randperm(n, generator=generator, device=flat.device) for _ in range(rounds)])
        pick = pick[: self.codebook_size]
        self.codebook.data.copy_(flat[pick])
        self.ema_sum.copy_(flat[pick])
        self.ema_count.fill_(1.0)
        self.usage_ema[flat.shape[0] :] = 0.0
        self.initialized.fill_(True)

    def _track_usage(self, codes: torch.Tensor) -> None:
        counts = _all_reduce_sum(torch.bincount(codes, minlength=self.codebook_size).float())
        self.usage_ema.mul_(0.99).add_(counts / counts.sum(), alpha=0.01)

    @torch.no_grad()
    def restart_dead_codes(self, flat: torch.Tensor) -> int:
        """Move codes whose running usage is below the threshold onto distinct random encoder outputs; when there
        are more dead codes than outputs, the lowest-numbered ones now and the rest at later steps. Returns how
        many moved."""
        dead = (self.usage_ema < self.dead_code_threshold / self.codebook_size).nonzero().squeeze(1)
        dead = dead[: flat.shape[0]]
        n_dead = len(dead)
        if n_dead == 0:
            return 0
        pick = torch.randperm(flat.shape[0], generator=self._generator(flat), device=flat.device)[:n_dead]
        self.codebook.data[dead] = flat[pick]
        self.ema_sum[dead] = flat[pick]
        self.ema_count[dead] = 1.0
        self.usage_ema[dead] = 1.0 / self.codebook_size
        return n_dead


@dataclass
class VQVAEOutput:
    reconstruction: torch.Tensor  # (B, 3, H, W)
    codes: torch.Tensor  # (B, h, w)
    commitment_loss: torch.Tensor
    codebook_loss: torch.Tensor
    perplexity: torch.Tensor
    usage: torch.Tensor


class VQVAE(PretrainedModel):
    config_class = VQVAEConfig

    def __init__(self, config: VQVAEConfig) -> None:
        super().__init__(config)
        self.encoder = Encoder(config)
        self.quantizer = VectorQuantizer(config.latent_channels, config.codebook_size, config.codebook_dim, config)
        self.decoder = Decoder(config)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute the encoder's and decoder's block activations in the backward pass (training only)."""
        self.encoder.gradient_checkpointing = self.decoder.gradient_checkpointing = enabled

    def _check_pixels(self, pixels: torch.Tensor) -> None:
        c = self.config
        if pixels.ndim != 4 or pixels.shape[1] != c.in_channels:
            raise ValueError(f"expected pixels of shape (B, {c.in_channels}, H, W), got {tuple(pixels.shape)}")
        if pixels.shape[-1] % c.downsample_factor or pixels.shape[-2] % c.downsample_factor:
            raise ValueError(
                f"image size {tuple(pixels.shape[-2:])} is not divisible by the downsampling factor "
                f"{c.downsample_factor}"
            )

    def forward(self, pixels: torch.Tensor) -> VQVAEOutput:
        self._check_pixels(pixels)
        q = self.quantizer(self.encoder(pixels))
        return VQVAEOutput(
            reconstruction=self.decoder(q.quantized),
            codes=q.codes,
            commitment_loss=q.commitment_loss,
            codebook_loss=q.codebook_loss,
            perplexity=q.perplexity,
            usage=q.usage,
        )

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, H/f, W/f) codes."""
        self._check_pixels(pixels)
        z = self.quantizer._prepare(self.encoder(pixels))
        b, _, h, w = z.shape
        return self.quantizer.nearest(rearrange(z, "b d h w -> (b h w) d")).view(b, h, w)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, h, w) codes -> (B, 3, H, W) pixels in [-1, 1]."""
        if codes.ndim != 3:
            raise ValueError(f"expected codes of shape (B, h, w), got {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.config.codebook_size):
            raise ValueError(
                f"codes must lie in [0, {self.config.codebook_size}), got {int(codes.min())}..{int(codes.max())}"
            )
        return self.decoder(self.quantizer.embed(codes)).clamp(-1, 1)
