import pytest
import torch
import torch.nn.functional as F

from prior import prepack
from prior.model import PRESETS, Prior
from prior.prepack import Linear, prepacked

needs_onednn = pytest.mark.skipif(not prepack.available(), reason="this torch cannot multiply by a reordered weight")


@needs_onednn
@pytest.mark.parametrize("rows", [1, 4, 33])
def test_reordered_products_equal_plain_ones_for_any_row_count(rows):
    torch.manual_seed(0)
    layer = Linear(16, 24)
    x = torch.randn(rows, 3, 16)
    with prepacked(layer, rows=4):
        assert layer.packed is not None
        out = layer(x)
    assert layer.packed is None
    assert torch.allclose(out, F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-6)


@needs_onednn
def test_reordered_weights_are_dropped_when_the_block_fails():
    layer = Linear(4, 4)
    with pytest.raises(KeyError), prepacked(layer, rows=2):
        assert layer.packed is not None
        raise KeyError("inside")
    assert layer.packed is None


def test_other_dtypes_keep_the_plain_product():
    layer = Linear(4, 4).to(torch.bfloat16)
    with prepacked(layer, rows=2):
        assert layer.packed is None


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_generation_draws_the_same_codes_with_and_without_reordered_weights(guidance_scale):
    torch.manual_seed(0)
    model = Prior(PRESETS["tiny"]).eval()
    features = torch.randn(3, model.config.text_length, model.config.text_width)

    def sample():
        return model.generate(features, guidance_scale=guidance_scale, generator=torch.Generator().manual_seed(0)).codes

    reordered = sample()
    with prepack.switched_off():
        assert torch.equal(reordered, sample())


@needs_onednn
def test_switched_off_keeps_the_plain_product():
    layer = Linear(4, 4)
    with prepack.switched_off(), prepacked(layer, rows=2):
        assert layer.packed is None
    with prepacked(layer, rows=2):
        assert layer.packed is not None
