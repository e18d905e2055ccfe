"""The prior: a decoder-only transformer over the flattened code grid, conditioned on text.

The sequence is `[text prefix (T)] [start] [code_0 ... code_{N-2}]`, and the model predicts `code_0 ...
code_{N-1}` from the last N positions. The prefix is the frozen contrastive text encoder's per-token
features, projected to the model width; its padding positions are masked out. Code positions know the grid's
2-D layout in one of two ways (`positions`): a learned row embedding plus a learned column embedding
("learned"), or 2-D rotary embeddings ("rope2d": half of each attention head's dimensions rotate with the
code's row, half with its column), which hold no table sized by the grid, so the same weights run at any grid
size.

During training the prefix of a random `cond_drop_prob` fraction of rows is replaced by a learned null
condition, which makes classifier-free guidance possible at sampling time. `generate` decodes with a
preallocated KV cache and runs the conditional and unconditional rows in one batch; given code grids and a
mask of the codes to redraw, it keeps the others and feeds each run of them in at once (editing).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from common.config import Config, ConfigError, added_field
from common.hub import PretrainedModel
from prior.prepack import Linear, prepacked


@dataclass
class PriorConfig(Config):
    codebook_size: int = 512
    grid_size: int = 8  # codes per side; the sequence has grid_size ** 2 codes
    text_width: int = 192  # width of the contrastive text encoder's token features
    text_length: int = 32  # its context length
    dim: int = 256
    layers: int = 4
    heads: int = 8
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    cond_drop_prob: float = 0.1
    positions: str = added_field("learned")  # one of POSITIONS

    limits = {
        "codebook_size": (2, 65536),
        "grid_size": (1, 128),
        "text_width": (1, 8192),
        "text_length": (1, 1024),
        "dim": (8, 8192),
        "layers": (1, 96),
        "heads": (1, 128),
        "mlp_ratio": (0.5, 16.0),
        "dropout": (0.0, 0.9),
        "cond_drop_prob": (0.0, 1.0),
    }

    def validate(self) -> None:
        super().validate()
        if self.dim % self.heads:
            raise ConfigError(f"config field 'dim': {self.dim} is not a multiple of heads ({self.heads})")
        if self.positions not in POSITIONS:
            raise ConfigError(f"config field 'positions': {self.positions!r} is not one of {', '.join(POSITIONS)}")
        if self.positions == "rope2d" and (self.dim // self.heads) % 4:
            raise ConfigError(
                f"config field 'positions': rope2d needs a head width (dim / heads = {self.dim // self.heads}) "
                "that is a multiple of 4"
            )

    @property
    def num_codes(self) -> int:
        return self.grid_size**2


POSITIONS = ("learned", "rope2d")
ROPE_BASE = 10000.0

PRESETS: dict[str, PriorConfig] = {
    "tiny": PriorConfig(codebook_size=16, grid_size=4, text_width=32, text_length=16, dim=32, layers=2, heads=2),
    "small": PriorConfig(dim=256, layers=4, heads=8),
    "base": PriorConfig(dim=512, layers=8, heads=8),
    "large": PriorConfig(dim=768, layers=12, heads=12, positions="rope2d"),  # LlamaGen's GPT-B shape
    "xl": PriorConfig(dim=1024, layers=24, heads=16, positions="rope2d"),  # LlamaGen's GPT-L shape
}


MAX_GUIDANCE = 1000.0
MIN_TEMPERATURE = 1e-4  # lower temperatures act as this one, which is practically greedy


class KVCache:
    """Preallocated keys and values: one (B, heads, max_len, head_dim) tensor of each per layer."""

    def __init__(self, layers: int, batch: int, heads: int, max_len: int, head_dim: int, like: torch.Tensor):
        shape = (batch, heads, max_len, head_dim)
        self.k = [like.new_zeros(shape) for _ in range(layers)]
        self.v = [like.new_zeros(shape) for _ in range(layers)]
        self.length = 0


def rope_tables(c: PriorConfig) -> torch.Tensor:
    """(2, T + N, head_dim / 2): cosines and sines of the rotation angle of each dimension pair at each position.
    Text positions do not rotate; code position i (row i // grid_size, column i % grid_size) rotates its first
    half of pairs by row * frequency and its second half by column * frequency."""
    quarter = c.dim // c.heads // 4
    freqs = ROPE_BASE ** -(torch.arange(quarter, dtype=torch.float64) / quarter)
    index = torch.arange(c.num_codes)
    grid = torch.stack([index // c.grid_size, index % c.grid_size], dim=1).double()  # (N, 2) row, column
    angles = rearrange(grid[:, :, None] * freqs, "n a f -> n (a f)")  # (N, head_dim / 2)
    angles = torch.cat([angles.new_zeros(c.text_length, 2 * quarter), angles])
    return torch.stack([angles.cos(), angles.sin()]).float()


def rotate(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """x (B, h, n, d) with pair (x[..., i], x[..., d/2 + i]) rotated by the angle whose cos/sin `rope` (2, n, d/2)
    holds."""
    cos, sin = rope.to(x.dtype)
    first, second = x.chunk(2, dim=-1)
    return torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1)


class Attention(nn.Module):
    def __init__(self, c: PriorConfig) -> None:
        super().__init__()
        self.heads = c.heads
        self.qkv = Linear(c.dim, 3 * c.dim)
        self.out = Linear(c.dim, c.dim)
        self.dropout = c.dropout

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        cache: KVCache | None = None,
        layer: int = 0,
        rope: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)  # 3 x (B, h, n, d)
        if rope is not None:  # (2, n, d / 2): the rotations of these n positions
            q, k = rotate(q, rope), rotate(k, rope)
        if cache is not None:  # write this step's keys/values, attend over everything so far
            start, end = cache.length, cache.length + x.shape[1]
            cache.k[layer][:, :, start:end] = k
            cache.v[layer][:, :, start:end] = v
            k, v = cache.k[layer][:, :, :end], cache.v[layer][:, :, :end]
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)  # (B, h, n, d)
        return self.out(y.transpose(1, 2).reshape(b, n, -1))


class Block(nn.Module):
    def __init__(self, c: PriorConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(c.dim)
        self.attn = Attention(c)
        self.norm2 = nn.LayerNorm(c.dim)
        hidden = int(c.dim * c.mlp_ratio)
        self.mlp = nn.Sequential(Linear(c.dim, hidden), nn.GELU(), Linear(hidden, c.dim), nn.Dropout(c.dropout))

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        cache: KVCache | None = None,
        layer: int = 0,
        rope: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), mask, cache, layer, rope)
        return x + self.mlp(self.norm2(x))


def _filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Set logits outside the top-k and outside the top-p nucleus to -inf."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the smallest set reaching top_p
        drop[..., 0] = False  # and always the most likely code (a tiny top_p rounds to 0 in float32)
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def check_sampling_args(
    codebook_size: int, temperature: float, top_k: int | None, top_p: float | None, guidance_scale: float
) -> None:
    """Raise ValueError naming the first bad sampling argument (a boolean is not a number here)."""

    def number(value: object) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    if not (number(temperature) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive number, got {temperature}")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k}")
    if top_k is not None and top_k > codebook_size:
        raise ValueError(f"top_k must be at most the codebook size ({codebook_size}), got {top_k}")
    if top_p is not None and not (number(top_p) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if not (number(guidance_scale) and 0 <= guidance_scale <= MAX_GUIDANCE):
        raise ValueError(f"guidance_scale must be a number from 0 to {MAX_GUIDANCE}, got {guidance_scale}")


@dataclass
class Generation:
    """What `Prior.generate` returns."""

    codes: torch.Tensor  # (B, h, w)
    # (B, N) each code's log-probability (nats) given the codes before it, under the conditional model at
    # temperature 1, unfiltered: how typical the model finds the grid, whatever settings drew it
    log_probs: torch.Tensor

    def log_likelihood(self, where: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) mean log-probability per code: of the whole grid, or of the codes where `where` (N,) is True."""
        if where is None:
            return self.log_probs.mean(1)
        return self.log_probs[:, where.reshape(-1).to(self.log_probs.device)].mean(1)


class Prior(PretrainedModel):
    config_class = PriorConfig
    _no_split_modules = ["Block"]  # the unit FSDP shards and gathers one at a time

    def __init__(self, config: PriorConfig) -> None:
        super().__init__(config)
        c = config
        self.gradient_checkpointing = False
        self.text_proj = Linear(c.text_width, c.dim)
        self.null_text = nn.Parameter(torch.randn(c.text_length, c.dim) * 0.02)
        self.text_pos = nn.Parameter(torch.randn(c.text_length, c.dim) * 0.02)
        self.code_embed = nn.Embedding(c.codebook_size, c.dim)
        self.start = nn.Parameter(torch.randn(c.dim) * 0.02)
        if c.positions == "learned":
            self.row_pos = nn.Parameter(torch.randn(c.grid_size, c.dim) * 0.02)
            self.col_pos = nn.Parameter(torch.randn(c.grid_size, c.dim) * 0.02)
        else:  # computed, not saved
            self.register_buffer("rope", rope_tables(c), persistent=False)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.layers))
        self.norm = nn.LayerNorm(c.dim)
        self.head = Linear(c.dim, c.codebook_size, bias=False)
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    # ------------------------------------------------------------ pieces

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute each block's activations in the backward pass instead of keeping them (training only)."""
        self.gradient_checkpointing = enabled

    def _code_positions(self) -> torch.Tensor:
        """(N, dim) added to the code inputs: row embedding + column embedding of each code in raster order
        (zeros under rope2d, whose positions act inside attention)."""
        if self.config.positions != "learned":
            return self.start.new_zeros(self.config.num_codes, self.config.dim)
        return rearrange(self.row_pos[:, None] + self.col_pos[None, :], "h w d -> (h w) d")

    def condition(
        self, text_features: torch.Tensor, text_mask: torch.Tensor | None, drop: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The prefix (B, T, dim) and its key mask (B, T); rows where `drop` is True get the null condition."""
        c = self.config
        if text_features.ndim != 3 or tuple(text_features.shape[1:]) != (c.text_length, c.text_width):
            raise ValueError(
                f"expected text features of shape (B, {c.text_length}, {c.text_width}), "
                f"got {tuple(text_features.shape)}"
            )
        prefix = self.text_proj(text_features)
        mask = torch.ones(prefix.shape[:2], dtype=torch.bool, device=prefix.device)
        if text_mask is not None:
            mask = text_mask.to(torch.bool)
        if drop is not None:
            prefix = torch.where(drop[:, None, None], self.null_text.to(prefix.dtype)[None], prefix)
            mask = mask | drop[:, None]
        return prefix + self.text_pos, mask

    @staticmethod
    def _attention_mask(key_mask: torch.Tensor) -> torch.Tensor:
        """(B, 1, L, L) bool from a (B, L) key mask: causal, and padding keys never attended to."""
        length = key_mask.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=key_mask.device).tril()
        return causal[None, None] & key_mask[:, None, None, :]

    def _run(self, x: torch.Tensor, mask: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Run the blocks on `x` (B, n, dim), the sequence positions after those in `cache`, with attention mask
        (B, 1, n, keys); returns logits (B, n, K)."""
        rope = None
        if self.config.positions == "rope2d":
            first = cache.length if cache is not None else 0
            rope = self.rope[:, first : first + x.shape[1]]
        recompute = self.gradient_checkpointing and cache is None and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            if recompute:
                x = checkpoint(block, x, mask, None, i, rope, use_reentrant=False)
            else:
                x = block(x, mask, cache, i, rope)
        if cache is not None:
            cache.length += x.shape[1]
        return self.head(self.norm(x))

    # ------------------------------------------------------------ training

    def forward(
        self,
        codes: torch.Tensor,
        text_features: torch.Tensor,
        targets: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        drop: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """codes (B, h, w) or (B, N) -> logits (B, N, codebook_size) for each code given the earlier ones; with
        targets, the mean cross entropy. Rows where `drop` (B,) is True get the null condition; without `drop`,
        training mode draws it with probability `cond_drop_prob`."""
        c = self.config
        codes = codes.flatten(1)
        if codes.shape[1] != c.num_codes:
            raise ValueError(f"expected {c.num_codes} codes per image, got {codes.shape[1]}")
        if drop is None and self.training and c.cond_drop_prob > 0:
            drop = torch.rand(codes.shape[0], device=codes.device) < c.cond_drop_prob
        prefix, prefix_mask = self.condition(text_features, text_mask, drop)
        start = self.start.expand(codes.shape[0], 1, -1)
        tokens = torch.cat([start, self.code_embed(codes[:, :-1])], dim=1) + self._code_positions()
        x = torch.cat([prefix, tokens], dim=1)  # (B, T + N, dim)
        key_mask = torch.cat([prefix_mask, prefix_mask.new_ones(codes.shape)], dim=1)
        logits = self._run(x, self._attention_mask(key_mask))[:, c.text_length :]  # (B, N, codebook_size)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, c.codebook_size).float(), targets.flatten())
        return logits, loss

    # ------------------------------------------------------------ sampling

    @torch.inference_mode()
    def generate(
        self,
        text_features: torch.Tensor,
        text_mask: torch.Tensor | None = None,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        guidance_scale: float = 1.0,
        generator: torch.Generator | None = None,
        codes: torch.Tensor | None = None,
        redraw: torch.Tensor | None = None,
        use_cache: bool = True,
        show_progress: bool = False,
        callback: Callable[[int, int], None] | None = None,
    ) -> Generation:
        """Sample code grids for B text conditions; with `codes`, redraw some of given grids' codes.

        `guidance_scale` s mixes logits as uncond + s * (cond - uncond): 1 is the plain conditional, 0 the
        unconditional. `codes` (B, h, w) or (B, N) are given grids and `redraw` (h, w) or (N,) bool the codes to
        draw anew in every row; the others are kept, and the redrawn ones are sampled in raster order, each given
        every code before it. Only the codes from the first redrawn one on are decoded step by step, and each run
        of kept codes is fed in at once. Without `codes` every code is drawn. Randomness comes only from
        `generator`. `use_cache=False` recomputes the whole sequence at every step (for comparison).
        `callback(done, total)` is called after each decoding step with the steps done and to do; an exception
        it raises stops sampling (a server uses this to drop work nobody waits for any more).
        """
        c = self.config
        check_sampling_args(c.codebook_size, temperature, top_k, top_p, guidance_scale)
        b = text_features.shape[0]
        guided = guidance_scale != 1.0
        prefix, prefix_mask = self.condition(text_features, text_mask)
        device = prefix.device
        grid, redraw = self._given_codes(b, codes, redraw, device)
        if guided:  # conditional rows first, then the same rows with the null condition, in one batch
            null, null_mask = self.condition(text_features, text_mask, torch.ones(b, dtype=torch.bool, device=device))
            prefix, prefix_mask = torch.cat([prefix, null]), torch.cat([prefix_mask, null_mask])
        positions = self._code_positions()
        rows = prefix.shape[0]
        key_mask = torch.cat([prefix_mask, prefix_mask.new_ones(rows, c.num_codes)], dim=1)  # (rows, all positions)
        # a cached step's one query may see every key so far but padding: an additive (rows, 1, 1, keys) mask,
        # built once (attention would otherwise convert a boolean mask in every layer at every step)
        padding = torch.zeros(key_mask.shape, dtype=prefix.dtype, device=device)
        padding = padding.masked_fill(~key_mask, float("-inf"))[:, None, None]
        cache = None
        if use_cache:
            head_dim = c.dim // c.heads
            cache = KVCache(c.layers, rows, c.heads, c.text_length + c.num_codes, head_dim, prefix)

        def inputs(first: int, last: int) -> torch.Tensor:
            """Input embeddings of code positions first..last-1: the start token, then each earlier code."""
            parts = []
            if first == 0:
                parts.append(self.start.expand(rows, 1, -1))
            known = grid[:, max(first - 1, 0) : last - 1]
            if known.shape[1]:
                embedded = self.code_embed(known)
                parts.append(torch.cat([embedded, embedded]) if guided else embedded)
            return torch.cat(parts, dim=1) + positions[first:last]

        def chunk_mask(first: int, last: int) -> torch.Tensor:
            """(rows, 1, queries, keys) bool for sequence positions first..last-1 attending to 0..last-1."""
            causal = torch.ones(last - first, last, dtype=torch.bool, device=device).tril(first)
            return causal[None, None] & key_mask[:, None, None, :last]

        # each chunk ends at a redrawn code, sampled from its last logits, or at the end of the grid
        drawn = redraw.nonzero().flatten().tolist()
        ends = drawn if drawn and drawn[-1] == c.num_codes - 1 else [*drawn, c.num_codes - 1]
        log_probs = torch.zeros(b, c.num_codes, device=device)
        done = 0  # codes whose logits are computed
        # decoding from the cache multiplies `rows` rows by every weight at each step: reorder the weights for that
        # (a single row is a matrix-vector product, faster as it is)
        with prepacked(self, rows) if cache is not None and rows > 1 else contextlib.nullcontext():
            for step, end in enumerate(tqdm(ends, desc="sampling codes", disable=not show_progress, leave=False)):
                t = c.text_length
                if cache is None or cache.length == 0:  # the prefix and every code position so far at once
                    x = torch.cat([prefix, inputs(0, end + 1)], dim=1)
                    logits = self._run(x, chunk_mask(0, t + end + 1), cache)[:, t + done :]
                elif end == done:  # one code
                    logits = self._run(inputs(done, end + 1), padding[..., : t + end + 1], cache)
                else:  # a run of kept codes and the code after it
                    logits = self._run(inputs(done, end + 1), chunk_mask(t + done, t + end + 1), cache)
                logits = cond = logits.float()  # (rows, end + 1 - done, codebook_size)
                if guided:
                    cond, uncond = logits[:b], logits[b:]
                    logits = uncond + guidance_scale * (cond - uncond)
                if redraw[end]:
                    last = logits[:, -1]
                    last = last - last.max(-1, keepdim=True).values  # <= 0, so dividing cannot overflow
                    last = _filter_logits(last / max(temperature, MIN_TEMPERATURE), top_k, top_p)
                    grid[:, end] = torch.multinomial(last.softmax(-1), 1, generator=generator).squeeze(1)
                chosen = grid[:, done : end + 1, None]
                log_probs[:, done : end + 1] = cond.log_softmax(-1).gather(2, chosen).squeeze(2)
                done = end + 1
                if callback is not None:
                    callback(step + 1, len(ends))
        return Generation(grid.view(b, c.grid_size, c.grid_size), log_probs)

    def _given_codes(
        self, b: int, codes: torch.Tensor | None, redraw: torch.Tensor | None, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N) codes to start from and (N,) bool codes to draw, checked; every code when none are given."""
        n = self.config.num_codes
        if codes is None:
            if redraw is not None:
                raise ValueError("redraw needs the codes it redraws")
            return torch.zeros(b, n, dtype=torch.long, device=device), torch.ones(n, dtype=torch.bool)
        grid = codes.reshape(codes.shape[0], -1).to(device=device, dtype=torch.long).clone()
        if grid.shape != (b, n):
            raise ValueError(f"codes must be (B={b}, {n} codes), got {tuple(codes.shape)}")
        if int(grid.min()) < 0 or int(grid.max()) >= self.config.codebook_size:
            raise ValueError(f"codes must lie in [0, {self.config.codebook_size})")
        if redraw is None or redraw.dtype != torch.bool or redraw.numel() != n:
            raise ValueError(f"redraw must be a bool mask of the {n} codes of a grid")
        return grid, redraw.reshape(n).cpu()
