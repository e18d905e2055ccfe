import dataclasses

import pytest
import torch

from vqvae.model import PRESETS, VQVAE, VectorQuantizer, VQVAEConfig

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
