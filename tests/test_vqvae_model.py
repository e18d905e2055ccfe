import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from common.config import ConfigError
from vqvae import model as vqvae_model
from vqvae.model import PRESETS, VQVAE, AttentionBlock, VectorQuantizer, VQVAEConfig

TINY = PRESETS["tiny"]


def _model(**changes) -> VQVAE:
    torch.manual_seed(0)
    return VQVAE(dataclasses.replace(TINY, **changes))


def test_shapes_of_every_output():
    model = _model()
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    out = model(x)
    assert out.reconstruction.shape == x.shape
    assert out.codes.shape == (3, 8, 8) and out.codes.dtype == torch.long
    assert out.codes.min() >= 0 and out.codes.max() < TINY.codebook_size
    for scalar in (out.commitment_loss, out.codebook_loss, out.perplexity, out.usage):
        assert scalar.shape == ()
    assert model.encode(x).shape == (3, 8, 8)
    assert model.decode(model.encode(x)).shape == x.shape


@pytest.mark.parametrize("ema", [False, True])
def test_gradients_reach_the_encoder_through_the_quantizer(ema):
    model = _model(ema=ema)
    out = model(torch.rand(2, 3, 16, 16) * 2 - 1)
    (out.reconstruction.pow(2).mean() + out.commitment_loss + out.codebook_loss).backward()
    first_conv = model.encoder.net[0].weight
    assert first_conv.grad is not None and first_conv.grad.abs().sum() > 0
    if ema:
        assert model.quantizer.codebook.grad is None
    else:
        assert model.quantizer.codebook.grad.abs().sum() > 0


def test_quantized_equals_codebook_at_codes():
    q = VectorQuantizer(6, 16, 6, dataclasses.replace(TINY, l2_normalize=False))
    q.eval()
    z = torch.randn(2, 6, 4, 4)
    out = q(z)
    expected = q.lookup_table()[out.codes]  # (B, h, w, D)
    assert torch.allclose(out.quantized.permute(0, 2, 3, 1), expected, atol=1e-6)
    # and each code is the nearest entry
    flat = z.permute(0, 2, 3, 1).reshape(-1, 6)
    assert torch.equal(out.codes.flatten(), torch.cdist(flat, q.codebook).argmin(1))


def test_mixed_precision_picks_the_same_codes_as_float32():
    q = VectorQuantizer(8, 4096, 8, dataclasses.replace(TINY, codebook_size=4096, codebook_dim=8))
    q.eval()
    z = torch.randn(4, 8, 16, 16, generator=torch.Generator().manual_seed(0))
    expected = q(z).codes
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(q(z).codes, expected)
        assert torch.equal(q.nearest(q._prepare(z).permute(0, 2, 3, 1).reshape(-1, 8)), expected.flatten())


def test_beta_weighs_the_commitment_term():
    z = torch.randn(2, 4, 4, 4)
    losses = {}
    for beta in (0.25, 1.0):
        q = VectorQuantizer(4, 16, 4, dataclasses.replace(TINY, beta=beta, l2_normalize=False))
        torch.nn.init.normal_(q.codebook, generator=torch.Generator().manual_seed(0))
        q.eval()
        z_e = z.clone().requires_grad_(True)
        out = q(z_e)
        out.commitment_loss.backward()
        losses[beta] = (
            out.commitment_loss.item(),
            out.codebook_loss.item(),
            z_e.grad.clone(),
            q.codebook.grad,
        )
    assert losses[1.0][0] == pytest.approx(4 * losses[0.25][0])  # commitment scales with beta
    assert losses[1.0][1] == pytest.approx(losses[0.25][1])  # codebook term does not
    assert torch.allclose(losses[1.0][2], 4 * losses[0.25][2])  # commitment pulls the encoder ...
    assert losses[1.0][3] is None  # ... and never the codebook


def test_dead_code_is_restarted():
    q = VectorQuantizer(4, 8, 4, dataclasses.replace(TINY, l2_normalize=False))
    q.initialized.fill_(True)
    q.usage_ema.fill_(1 / 8)
    q.usage_ema[3] = 0.0  # code 3 fell out of use
    far = q.codebook.detach().clone()
    data = torch.randn(64, 4) + 10.0
    assert q.restart_dead_codes(data) == 1
    assert not torch.equal(q.codebook[3], far[3])
    assert any(torch.equal(q.codebook[3], row) for row in data)  # moved onto an encoder output
    assert torch.equal(q.codebook[:3], far[:3]) and torch.equal(q.codebook[4:], far[4:])


def test_usage_is_full_on_a_batch_that_hits_every_code():
    q = VectorQuantizer(4, 8, 4, dataclasses.replace(TINY, l2_normalize=True))
    q.eval()
    table = q.lookup_table().detach()  # (8, 4): feed each code's own vector
    z = table.t().reshape(1, 4, 2, 4)
    out = q(z)
    assert sorted(out.codes.flatten().tolist()) == list(range(8))
    assert out.usage.item() == 1.0
    assert out.perplexity.item() == pytest.approx(8.0)


def test_first_training_batch_initializes_codebook_from_data():
    model = _model()
    assert not bool(model.quantizer.initialized)
    model.train()
    model(torch.rand(4, 3, 16, 16) * 2 - 1)
    assert bool(model.quantizer.initialized)


def test_round_trip_is_deterministic_and_survives_save_load(tmp_path):
    model = _model()
    model.train()
    model(torch.rand(4, 3, 16, 16) * 2 - 1)  # initialize the codebook
    model.eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    codes = model.encode(x)
    assert torch.equal(model.decode(codes), model.decode(model.encode(x)))
    model.save_pretrained(tmp_path / "vq")
    loaded = VQVAE.from_pretrained(tmp_path / "vq")
    assert torch.equal(loaded.encode(x), codes)
    assert torch.equal(loaded.decode(codes), model.decode(codes))


def test_bad_inputs_raise_clear_errors():
    model = _model().eval()
    with pytest.raises(ValueError, match="expected pixels of shape"):
        model.encode(torch.rand(3, 16, 16))
    with pytest.raises(ValueError, match="not divisible"):
        model.encode(torch.rand(1, 3, 15, 15))
    with pytest.raises(ValueError, match="codes must lie in"):
        model.decode(torch.full((1, 8, 8), 99))
    with pytest.raises(ValueError, match="resolution"):
        VQVAEConfig(resolution=18, channel_mult=(1, 2, 2))


def test_a_billion_entry_codebook_is_refused_before_allocating(tmp_path):
    import json

    from common.hub import ModelLoadError

    _model().save_pretrained(tmp_path / "vq")
    config = json.loads((tmp_path / "vq" / "config.json").read_text())
    config["codebook_size"] = 10**9
    (tmp_path / "vq" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="codebook_size"):
        VQVAE.from_pretrained(tmp_path / "vq")


LARGE = ("f8-128", "f8-256", "f16-256")


def test_large_presets_are_what_the_anchors_found_necessary():
    grids = {"f8-128": (128, 16), "f8-256": (256, 32), "f16-256": (256, 16)}
    for name in LARGE:
        c = PRESETS[name]
        assert (c.resolution, c.grid_size) == grids[name]
        assert (c.codebook_size, c.codebook_dim, c.l2_normalize) == (16384, 8, True)
        assert c.base_channels == 128 and max(c.channel_mult) == 4
        assert c.attention_levels == (len(c.channel_mult) - 1,) and c.mid_attention
        with torch.device("meta"):  # the full-width network, without allocating it
            weights = sum(p.numel() for p in VQVAE(c).parameters())
        assert 20e6 < weights < 100e6, (name, weights)


def _attention_inputs(model: VQVAE) -> dict[str, list[tuple[int, int]]]:
    """Hooks that record the feature-map size each attention block of encoder and decoder sees."""
    seen: dict[str, list[tuple[int, int]]] = {"encoder": [], "decoder": []}
    for part in seen:
        for block in getattr(model, part).net:
            if isinstance(block, AttentionBlock):
                block.register_forward_hook(lambda m, args, out, part=part: seen[part].append(tuple(out.shape[-2:])))
    return seen


@pytest.mark.parametrize("name", LARGE)
def test_large_preset_tokenizes_a_picture_of_its_size_and_trains(name):
    # the preset's levels, attention blocks and 16,384-entry codebook, narrowed to 8 base channels for the CPU
    config = PRESETS[name].replace({"base_channels": 8})
    torch.manual_seed(0)
    model = VQVAE(config)
    seen = _attention_inputs(model)
    size, grid = config.resolution, config.grid_size
    pixels = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    out = model.train()(pixels)
    assert out.codes.shape == (1, grid, grid) and out.reconstruction.shape == pixels.shape
    loss = (out.reconstruction - pixels).abs().mean() + out.commitment_loss + out.codebook_loss
    loss.backward()
    assert model.encoder.net[0].weight.grad.abs().sum() > 0
    before = model.encoder.net[0].weight.detach().clone()
    optimizer.step()
    assert not torch.equal(model.encoder.net[0].weight, before)
    # attention after each block of the lowest level and in the middle, at the code grid's resolution
    blocks = config.num_res_blocks[-1] + 1
    assert seen == {"encoder": [(grid, grid)] * blocks, "decoder": [(grid, grid)] * blocks}
    model.eval()
    codes = model.encode(pixels)
    assert codes.shape == (1, grid, grid) and int(codes.min()) >= 0 and int(codes.max()) < 16384
    assert model.decode(codes).shape == pixels.shape


def test_attention_is_not_causal_and_keeps_the_shape():
    torch.manual_seed(0)
    block = AttentionBlock(16).eval()
    x = torch.randn(2, 16, 4, 5)
    y = block(x)
    assert y.shape == x.shape
    later = x.clone()
    later[:, :, -1, -1] += 1.0  # the last position in raster order
    changed = (block(later) - y).abs().amax(1)  # (B, h, w)
    assert (changed > 1e-5).all()  # every position, the first one too, depends on it
    earlier = x.clone()
    earlier[:, :, 0, 0] += 1.0
    assert ((block(earlier) - y).abs().amax(1) > 1e-5).all()


def test_configs_saved_before_attention_load_unchanged():
    # the released tokenizer's config.json predates the attention fields; its codes and pixels are those that
    # the code before them produced (tests/fixtures/shapes-demo-vqvae, see its README)
    import json

    import numpy as np
    from PIL import Image

    from common.grid import to_pil
    from pipelines.text_to_image import DEMO_MODEL

    saved = json.loads((DEMO_MODEL / "vqvae" / "config.json").read_text())
    assert "attention_levels" not in saved and "mid_attention" not in saved
    model = VQVAE.from_pretrained(DEMO_MODEL / "vqvae").eval()
    assert model.config.attention_levels == () and not model.config.mid_attention
    fixture = Path(__file__).parent / "fixtures" / "shapes-demo-vqvae"
    strip = torch.from_numpy(np.array(Image.open(fixture / "input.png"))).permute(2, 0, 1).float() / 127.5 - 1
    pixels = torch.stack(strip.split(64, dim=2))
    codes = model.encode(pixels)
    assert codes.tolist() == json.loads((fixture / "codes.json").read_text())
    rebuilt = np.concatenate([np.asarray(image) for image in to_pil(model.decode(codes))], axis=1).astype(int)
    assert np.abs(rebuilt - np.asarray(Image.open(fixture / "reconstruction.png")).astype(int)).max() <= 1


def test_attention_levels_are_checked():
    with pytest.raises(ConfigError, match="attention_levels"):
        dataclasses.replace(TINY, attention_levels=(2,))  # tiny has levels 0 and 1
    with pytest.raises(ConfigError, match="attention_levels"):
        dataclasses.replace(TINY, attention_levels=(1, 1))


class _LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any operation makes."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        sizes = [t.numel() for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        self.largest = max([self.largest, *sizes])
        return out


@pytest.mark.parametrize("ema", [False, True])
def test_a_16384_code_lookup_works_in_blocks(ema, monkeypatch):
    q = VectorQuantizer(8, 16384, 8, dataclasses.replace(TINY, codebook_size=16384, codebook_dim=8, ema=ema))
    flat = F.normalize(torch.randn(2048, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    table = q.lookup_table().detach()
    whole = (flat.pow(2).sum(1, keepdim=True) - 2 * flat @ table.t() + table.pow(2).sum(1)[None]).argmin(1)
    with _LargestTensor() as probe, torch.no_grad():
        assert torch.equal(q.nearest(flat), whole)
        monkeypatch.setattr(vqvae_model, "_CHUNK_ELEMENTS", 16384 * 7)  # uneven blocks of 7 rows
        assert torch.equal(q.nearest(flat), whole)
        monkeypatch.undo()
        q._update_codebook(flat)  # initialization, EMA and restarts
    assert probe.largest <= 1 << 24  # blocks of 64 MB, never the 2048 x 16384 distance matrix


def test_initial_codes_are_distinct_encoder_outputs():
    q = VectorQuantizer(4, 64, 4, dataclasses.replace(TINY, codebook_size=64, l2_normalize=False))
    data = torch.randn(64, 4)
    q._init_from_data(data)
    assert len({tuple(row.tolist()) for row in q.codebook.detach()}) == 64
    assert all(any(torch.equal(code, row) for row in data) for code in q.codebook.detach())


def test_codes_a_small_first_batch_repeats_restart_on_the_next_batches():
    q = VectorQuantizer(4, 64, 4, dataclasses.replace(TINY, codebook_size=64, l2_normalize=False))
    first, second, third = torch.randn(16, 4), torch.randn(32, 4), torch.randn(32, 4)
    q._update_codebook(first)  # 16 vectors for 64 codes
    rows = {tuple(row.tolist()) for row in q.codebook.detach()}
    assert rows == {tuple(row.tolist()) for row in first}  # not yet moved onto the same batch again
    assert (q.usage_ema[16:] == 0).all() and (q.usage_ema[:16] > 0).all()
    q._update_codebook(second)
    assert {tuple(row.tolist()) for row in q.codebook.detach()[16:48]} == {tuple(row.tolist()) for row in second}
    q._update_codebook(third)
    assert {tuple(row.tolist()) for row in q.codebook.detach()[48:]} <= {tuple(row.tolist()) for row in third}
    assert len({tuple(row.tolist()) for row in q.codebook.detach()}) == 64


def test_more_dead_codes_than_outputs_restart_on_distinct_outputs():
    q = VectorQuantizer(4, 16384, 4, dataclasses.replace(TINY, codebook_size=16384, l2_normalize=False))
    q.usage_ema.zero_()  # every code out of use
    data = torch.randn(1000, 4)
    assert q.restart_dead_codes(data) == 1000
    moved = q.codebook.detach()[:1000]
    assert len({tuple(row.tolist()) for row in moved}) == 1000  # each on its own encoder output
    assert {tuple(row.tolist()) for row in moved} == {tuple(row.tolist()) for row in data}
    restarted = 1000
    while (steps := q.restart_dead_codes(torch.randn(1000, 4))) > 0:
        restarted += steps
    assert restarted == 16384 and (q.usage_ema > 0).all()
