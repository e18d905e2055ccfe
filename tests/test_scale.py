"""Model scale: the prior presets up to xl, 2-D rotary positions over grids up to 32x32, and the memory flags
(activation checkpointing, compile, fused AdamW) shared by the stages."""

import dataclasses
import hashlib
import json

import pytest
import torch

from common.training import TrainingConfig, enable_gradient_checkpointing
from contrastive.model import PRESETS as CONTRASTIVE_PRESETS
from contrastive.model import ContrastiveModel
from pipelines.text_to_image import DEMO_MODEL
from prior.model import PRESETS, Prior, PriorConfig, rope_tables, rotate
from vqvae.model import PRESETS as VQVAE_PRESETS
from vqvae.model import VQVAE

ROPE = dataclasses.replace(PRESETS["tiny"], positions="rope2d", grid_size=32)  # 1,024 codes


def _text(c: PriorConfig, b: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(b, c.text_length, dtype=torch.bool)
    mask[:, :5] = True
    return torch.randn(b, c.text_length, c.text_width, generator=g), mask


def _weights(name: str) -> int:
    config = PRESETS[name].replace({"codebook_size": 16384, "grid_size": 16, "text_width": 256, "text_length": 32})
    with torch.device("meta"):
        return sum(p.numel() for p in Prior(config).parameters())


def test_prior_presets_grow_to_about_300m_weights():
    counts = {name: _weights(name) for name in ("small", "base", "large", "xl")}
    assert list(counts.values()) == sorted(counts.values())
    assert 90e6 < counts["large"] < 130e6  # LlamaGen's GPT-B: 111M
    assert 280e6 < counts["xl"] < 360e6  # GPT-L: 343M
    assert PRESETS["xl"].positions == PRESETS["large"].positions == "rope2d"


@pytest.mark.parametrize("name", ["small", "base", "large", "xl"])
def test_each_prior_preset_takes_a_training_step_on_1024_codes(name):
    """Each preset's width and heads with one block, a small codebook and a short text, on a 32x32 grid."""
    config = PRESETS[name].replace(
        {"layers": 1, "codebook_size": 64, "grid_size": 32, "text_width": 16, "text_length": 8}
    )
    torch.manual_seed(0)
    model = Prior(config).train()
    codes = torch.randint(0, 64, (1, 32, 32))
    features, mask = _text(config, b=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    kept = torch.zeros(1, dtype=torch.bool)  # the caption, not the null condition, in both passes
    logits, loss = model(codes, features, targets=codes.flatten(1), text_mask=mask, drop=kept)
    assert logits.shape == (1, 1024, 64) and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    optimizer.step()
    assert model(codes, features, targets=codes.flatten(1), text_mask=mask, drop=kept)[1] < loss


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_1024_codes_sample_the_same_with_the_kv_cache_as_by_recomputation(guidance_scale):
    """The last rows of a 32x32 grid, after 1,000 given codes: the cache holds every earlier position, and each of
    the 24 sampled codes is recomputed from the whole sequence in the other run."""
    torch.manual_seed(0)
    model = Prior(ROPE).eval()
    features, mask = _text(ROPE)
    given = torch.randint(0, ROPE.codebook_size, (2, 1024), generator=torch.Generator().manual_seed(2))
    redraw = torch.arange(1024) >= 1000
    kwargs = {"guidance_scale": guidance_scale, "top_k": 8, "codes": given, "redraw": redraw}
    cached = model.generate(features, mask, generator=torch.Generator().manual_seed(3), **kwargs).codes
    plain = model.generate(features, mask, generator=torch.Generator().manual_seed(3), use_cache=False, **kwargs).codes
    assert cached.shape == (2, 32, 32) and torch.equal(cached.flatten(1)[:, :1000], given[:, :1000])
    assert not torch.equal(cached.flatten(1), given)
    assert torch.equal(cached, plain)


def test_rope2d_is_causal_and_its_attention_depends_only_on_the_offset_between_codes():
    torch.manual_seed(0)
    model = Prior(ROPE).eval()
    features, mask = _text(ROPE)
    codes = torch.randint(0, ROPE.codebook_size, (2, 1024))
    changed = codes.clone()
    changed[:, 500] = (changed[:, 500] + 1) % ROPE.codebook_size
    a, b = model(codes, features, text_mask=mask)[0], model(changed, features, text_mask=mask)[0]
    assert torch.allclose(a[:, :501], b[:, :501], atol=1e-5) and not torch.allclose(a[:, 501:], b[:, 501:])
    # a rotated query . rotated key is a function of (row offset, column offset) alone, in both axes
    rope = rope_tables(ROPE)[:, ROPE.text_length :]  # (2, 1024, d / 2): code positions only
    q, k = torch.randn(2, 1, 1, 1, 16).unbind(0)

    def score(i: int, j: int) -> float:
        return (rotate(q, rope[:, i : i + 1]) * rotate(k, rope[:, j : j + 1])).sum().item()

    at = lambda row, col: row * 32 + col  # noqa: E731
    assert score(at(3, 4), at(1, 2)) == pytest.approx(score(at(20, 30), at(18, 28)), abs=1e-4)
    assert score(at(3, 4), at(1, 2)) != pytest.approx(score(at(3, 4), at(2, 1)), abs=1e-3)  # rows != columns
    text = rope_tables(ROPE)[:, : ROPE.text_length]
    assert torch.equal(text[0], torch.ones_like(text[0])) and torch.equal(text[1], torch.zeros_like(text[1]))


def test_rope2d_weights_hold_no_table_sized_by_the_grid():
    small = Prior(dataclasses.replace(ROPE, grid_size=8))
    large = Prior(ROPE)
    assert {k: v.shape for k, v in small.state_dict().items()} == {k: v.shape for k, v in large.state_dict().items()}
    assert "rope" not in large.state_dict()  # computed from the config, never saved
    with pytest.raises(ValueError, match="multiple of 4"):
        PriorConfig(dim=48, heads=8, positions="rope2d")
    with pytest.raises(ValueError, match="positions"):
        PriorConfig(positions="sinusoidal")


def test_the_released_prior_loads_without_the_positions_field_and_samples_as_it_always_did():
    assert "positions" not in json.loads((DEMO_MODEL / "prior" / "config.json").read_text())
    prior = Prior.from_pretrained(DEMO_MODEL / "prior")
    assert prior.config.positions == "learned"
    c = prior.config
    g = torch.Generator().manual_seed(0)
    features = torch.randn(1, c.text_length, c.text_width, generator=g)
    mask = torch.ones(1, c.text_length, dtype=torch.bool)
    mask[:, 6:] = False
    codes = prior.generate(features, mask, guidance_scale=3.0, generator=torch.Generator().manual_seed(1)).codes
    # the codes this model drew, with these settings, before the field existed
    assert hashlib.sha256(codes.numpy().tobytes()).hexdigest()[:16] == "d0909562be9e5198"


def _saved_bytes(model: torch.nn.Module, run) -> int:
    """Bytes of the tensors autograd keeps for the backward pass of `run(model)`."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = run(model)
    loss.backward()
    return total


def _prior_step(model):
    c = model.config
    codes = torch.randint(0, c.codebook_size, (2, c.num_codes), generator=torch.Generator().manual_seed(0))
    features, mask = _text(c)
    return model(codes, features, targets=codes, text_mask=mask, drop=torch.zeros(2, dtype=torch.bool))[1]


def _contrastive_step(model):
    pixels = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    image, text, scale = model(pixels, model.tokenize(["a red ball", "a blue box", "a star", "a heart"]))
    return (scale * image @ text.t()).logsumexp(1).mean()


DEEPER = {"vision_layers": 3, "text_layers": 3}


def _vqvae_step(model):
    pixels = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    out = model(pixels)
    return (out.reconstruction - pixels).pow(2).mean() + out.commitment_loss + out.codebook_loss


@pytest.mark.parametrize(
    ("build", "step"),
    [
        (lambda: Prior(dataclasses.replace(ROPE, grid_size=8, layers=4)), _prior_step),
        (lambda: Prior(dataclasses.replace(PRESETS["tiny"], layers=4)), _prior_step),
        (lambda: ContrastiveModel(CONTRASTIVE_PRESETS["tiny"].replace(DEEPER)), _contrastive_step),
        (lambda: VQVAE(VQVAE_PRESETS["tiny"]), _vqvae_step),
    ],
    ids=["prior-rope2d", "prior-learned", "contrastive", "vqvae"],
)  # fmt: skip
def test_gradient_checkpointing_keeps_less_and_gives_the_same_gradients(build, step):
    grads, saved = [], []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = build().train()
        if checkpointed:
            enable_gradient_checkpointing(model)
        saved.append(_saved_bytes(model, step))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-5, rtol=1e-4) for n in grads[0])
    assert saved[1] < 0.7 * saved[0], saved


def test_gradient_checkpointing_is_refused_by_a_model_without_blocks():
    with pytest.raises(ValueError, match="no blocks to checkpoint"):
        enable_gradient_checkpointing(torch.nn.Linear(2, 2))


def test_compile_and_checkpointing_flags_reach_the_model(tmp_path):
    from common.training import Trainer

    model = Prior(PRESETS["tiny"])
    keys = list(model.state_dict())
    settings = TrainingConfig(output_dir=tmp_path, compile=True, gradient_checkpointing=True, train_batch_size=1)
    trainer = Trainer(settings, model, [{"codes": torch.zeros(16, dtype=torch.long), "text": "a"}] * 2, None)
    assert trainer.unwrapped._compiled_call_impl is not None  # torch.compile's in-place form
    assert trainer.unwrapped.gradient_checkpointing
    assert list(trainer.unwrapped.state_dict()) == keys  # checkpoints and saves keep their names
