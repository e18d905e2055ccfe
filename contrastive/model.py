"""The contrastive image-text encoder: open_clip's CLIP, built from a config of ours and trained from scratch.

Nothing is downloaded: the model is open_clip's `CLIP` class with our vision/text configs (`pretrained`
is never used) and the tokenizer is open_clip's `SimpleTokenizer` with its bundled BPE vocabulary.

- `encode_image(pixels)` / `encode_text(texts)`: L2-normalized embeddings by default.
- `text_token_features(texts)`: the text transformer's per-token features and padding mask, which the
  prior conditions on.
- `forward(pixels, tokens) -> (image_features, text_features, logit_scale)`, the inputs of
  `open_clip.ClipLoss`; the learnable temperature is clamped to at most `max_logit_scale`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import CLIPTextCfg, CLIPVisionCfg
from torch import nn

from common.config import Config, ConfigError
from common.hub import PretrainedModel

VOCAB_SIZE = 49408  # open_clip's bundled BPE vocabulary
PAD_ID = 0


@dataclass
class ContrastiveConfig(Config):
    resolution: int = 64
    patch_size: int = 8
    vision_width: int = 256
    vision_layers: int = 4
    vision_head_width: int = 64
    context_length: int = 32
    text_width: int = 256
    text_layers: int = 4
    text_heads: int = 4
    embed_dim: int = 256
    init_logit_scale: float = math.log(1 / 0.07)
    max_logit_scale: float = 100.0

    limits = {
        "resolution": (8, 1024),
        "patch_size": (1, 64),
        "vision_width": (8, 4096),
        "vision_layers": (1, 64),
        "vision_head_width": (4, 512),
        "context_length": (4, 512),
        "text_width": (8, 4096),
        "text_layers": (1, 64),
        "text_heads": (1, 64),
        "embed_dim": (8, 4096),
        "init_logit_scale": (0.0, 10.0),
        "max_logit_scale": (1.0, 1000.0),
    }

    def validate(self) -> None:
        super().validate()
        if self.resolution % self.patch_size:
            raise ConfigError(f"config field 'resolution': {self.resolution} is not a multiple of patch_size")
        if self.vision_width % self.vision_head_width:
            raise ConfigError("config field 'vision_width': must be a multiple of vision_head_width")
        if self.text_width % self.text_heads:
            raise ConfigError("config field 'text_width': must be a multiple of text_heads")


PRESETS: dict[str, ContrastiveConfig] = {
    "tiny": ContrastiveConfig(
        resolution=16, patch_size=4, vision_width=32, vision_layers=1, vision_head_width=16,
        context_length=16, text_width=32, text_layers=1, text_heads=2, embed_dim=32,
    ),
    "mini": ContrastiveConfig(  # the shapes demo: 8M weights, 6.3M of them the token embedding
        vision_width=128, vision_layers=4, text_width=128, text_layers=4, text_heads=4, embed_dim=128
    ),
    "small": ContrastiveConfig(
        vision_width=192, vision_layers=3, text_width=192, text_layers=3, text_heads=3, embed_dim=192
    ),
    "base": ContrastiveConfig(),
    "large": ContrastiveConfig(
        vision_width=512, vision_layers=8, text_width=512, text_layers=8, text_heads=8, embed_dim=512
    ),
}  # fmt: skip


LOGIT_SCALE = "clip.logit_scale"


def _saved_logit_scale(module: nn.Module, state: dict, prefix: str, local_metadata: dict) -> None:
    """The temperature as the scalar that saved models hold (a shard of FSDP's stays as it is)."""
    value = state.get(prefix + LOGIT_SCALE)
    if type(value) is torch.Tensor:
        state[prefix + LOGIT_SCALE] = value.reshape(())


def _loaded_logit_scale(module: nn.Module, state: dict, prefix: str, *args) -> None:
    value = state.get(prefix + LOGIT_SCALE)
    if type(value) is torch.Tensor and value.numel() == 1:
        state[prefix + LOGIT_SCALE] = value.reshape(1)


class ContrastiveModel(PretrainedModel):
    config_class = ContrastiveConfig
    _no_split_modules = ["ResidualAttentionBlock"]  # the unit FSDP shards and gathers one at a time

    def __init__(self, config: ContrastiveConfig) -> None:
        super().__init__(config)
        vision = CLIPVisionCfg(
            layers=config.vision_layers,
            width=config.vision_width,
            head_width=config.vision_head_width,
            patch_size=config.patch_size,
            image_size=config.resolution,
        )
        text = CLIPTextCfg(
            context_length=config.context_length,
            vocab_size=VOCAB_SIZE,
            width=config.text_width,
            heads=config.text_heads,
            layers=config.text_layers,
        )
        self.clip = open_clip.CLIP(config.embed_dim, vision, text, init_logit_scale=config.init_logit_scale)
        # FSDP2 shards only tensors with a dimension: the temperature is held as (1,) and saved as a scalar, as always
        self.clip.logit_scale = nn.Parameter(self.clip.logit_scale.detach().reshape(1))
        self.register_state_dict_post_hook(_saved_logit_scale)
        self.register_load_state_dict_pre_hook(_loaded_logit_scale)
        self.tokenizer = open_clip.SimpleTokenizer(context_length=config.context_length)

    @property
    def device(self) -> torch.device:
        return self.clip.logit_scale.device

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """(B, context_length) token ids; longer texts are truncated (ending in the end-of-text token)."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise ValueError("texts must be a list of strings")
        return self.tokenizer(list(texts)).to(self.device)

    def _tokens(self, texts: list[str] | torch.Tensor) -> torch.Tensor:
        return texts.to(self.device) if isinstance(texts, torch.Tensor) else self.tokenize(texts)

    def encode_image(self, pixels: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(B, 3, R, R) in [-1, 1] -> (B, embed_dim)."""
        r = self.config.resolution
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, r, r):
            raise ValueError(f"expected pixels of shape (B, 3, {r}, {r}), got {tuple(pixels.shape)}")
        return self.clip.encode_image(pixels, normalize=normalize)

    def encode_text(self, texts: list[str] | torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Strings or (B, context_length) token ids -> (B, embed_dim)."""
        return self.clip.encode_text(self._tokens(texts), normalize=normalize)

    def text_token_features(self, texts: list[str] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token features (B, context_length, text_width) after the final layer norm, and a (B,
        context_length) bool mask that is True for real tokens and False for padding."""
        tokens = self._tokens(texts)
        clip = self.clip
        cast = clip.transformer.get_cast_dtype()
        x = clip.token_embedding(tokens).to(cast) + clip.positional_embedding.to(cast)
        x = clip.ln_final(clip.transformer(x, attn_mask=clip.attn_mask))
        return x, tokens != PAD_ID

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute each transformer block's activations in the backward pass (open_clip's own switch)."""
        self.clip.set_grad_checkpointing(enabled)

    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale.clamp(max=math.log(self.config.max_logit_scale)).exp().reshape(())

    def forward(self, pixels: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.encode_image(pixels), self.encode_text(tokens), self.logit_scale()

    @torch.no_grad()
    def similarity(self, pixels: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """Cosine similarity of each image with the text at the same position, (B,)."""
        return F.cosine_similarity(self.encode_image(pixels), self.encode_text(texts), dim=-1)
