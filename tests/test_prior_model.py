import dataclasses

import pytest
import torch

from prior.model import PRESETS, Prior, PriorConfig, _filter_logits
from tests.helpers import mean_log_probability

TINY = PRESETS["tiny"]


def _prior(**changes) -> Prior:
    torch.manual_seed(0)
    return Prior(dataclasses.replace(TINY, **changes)).eval()


def _text(b=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(b, TINY.text_length, TINY.text_width, generator=g)
    mask = torch.zeros(b, TINY.text_length, dtype=torch.bool)
    mask[:, :5] = True
    return features, mask


def test_forward_shapes_and_loss():
    model = _prior()
    codes = torch.randint(0, TINY.codebook_size, (2, 4, 4))
    features, mask = _text()
    logits, loss = model(codes, features, targets=codes.flatten(1), text_mask=mask)
    assert logits.shape == (2, 16, TINY.codebook_size)
    assert loss.shape == () and loss.item() > 0
    assert model(codes, features)[1] is None


def test_changing_a_later_code_never_changes_earlier_logits():
    model = _prior()
    features, mask = _text()
    codes = torch.randint(0, TINY.codebook_size, (2, 16))
    changed = codes.clone()
    changed[:, 9] = (changed[:, 9] + 1) % TINY.codebook_size
    a, _ = model(codes, features, text_mask=mask)
    b, _ = model(changed, features, text_mask=mask)
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-6)  # logits for codes 0..9 see codes 0..8 only
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_padding_in_the_text_is_ignored():
    model = _prior()
    features, mask = _text()
    noisy = features.clone()
    noisy[:, 5:] = torch.randn_like(noisy[:, 5:])  # padding positions carry other values
    codes = torch.randint(0, TINY.codebook_size, (2, 16))
    assert torch.allclose(model(codes, features, text_mask=mask)[0], model(codes, noisy, text_mask=mask)[0], atol=1e-6)


@pytest.mark.parametrize("use_cache", [True, False])
def test_log_probs_are_the_conditional_models(use_cache):
    model = _prior()
    features, mask = _text()
    settings = {"guidance_scale": 2.0, "temperature": 0.5, "top_k": 3, "use_cache": use_cache}
    out = model.generate(features, mask, generator=torch.Generator().manual_seed(0), **settings)
    assert out.log_probs.shape == (2, 16) and (out.log_probs < 0).all()
    # at temperature 1 and unfiltered, whatever settings drew the codes
    assert torch.allclose(out.log_likelihood(), mean_log_probability(model, out.codes, features, mask), atol=1e-5)
    first_row = torch.arange(16) < 4
    assert torch.allclose(out.log_likelihood(first_row), out.log_probs[:, :4].mean(1))


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_cached_and_uncached_generation_agree(guidance_scale):
    model = _prior()
    features, mask = _text()
    kwargs = {"guidance_scale": guidance_scale, "top_k": 8, "temperature": 0.9}
    cached = model.generate(features, mask, generator=torch.Generator().manual_seed(5), **kwargs).codes
    plain = model.generate(features, mask, generator=torch.Generator().manual_seed(5), use_cache=False, **kwargs).codes
    assert cached.shape == (2, 4, 4)
    assert torch.equal(cached, plain)


def test_same_seed_same_codes_other_seed_other_codes():
    model = _prior()
    features, mask = _text()
    a = model.generate(features, mask, generator=torch.Generator().manual_seed(0)).codes
    b = model.generate(features, mask, generator=torch.Generator().manual_seed(0)).codes
    c = model.generate(features, mask, generator=torch.Generator().manual_seed(1)).codes
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_guidance_zero_samples_the_unconditional_model():
    model = _prior()
    features, mask = _text()
    unconditional = model.generate(features, mask, guidance_scale=0.0, generator=torch.Generator().manual_seed(3)).codes
    # the same as conditioning on the null prefix directly: swap text_proj's output for null_text
    other_text, _ = _text(seed=9)
    also_unconditional = model.generate(
        other_text, mask, guidance_scale=0.0, generator=torch.Generator().manual_seed(3)
    ).codes
    assert torch.equal(unconditional, also_unconditional)  # the text no longer matters
    conditional = model.generate(features, mask, generator=torch.Generator().manual_seed(3)).codes
    other = model.generate(other_text, mask, generator=torch.Generator().manual_seed(3)).codes
    assert not torch.equal(conditional, other)


def test_top_k_and_top_p_never_sample_outside_their_set():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]])
    kept_k = torch.isfinite(_filter_logits(logits, 2, None))
    assert kept_k.tolist() == [[True, True, False, False, False, False]]
    probs = logits.softmax(-1)[0]
    kept_p = torch.isfinite(_filter_logits(logits, None, 0.8))[0]
    assert kept_p.tolist()[:2] == [True, True] and probs[:2].sum() >= 0.8 > probs[:1].sum()
    assert not kept_p[2:].any()
    assert torch.isfinite(_filter_logits(logits, None, 1e-100)).tolist() == [[True] + [False] * 5]
    model = _prior()
    features, mask = _text(b=4)
    with torch.no_grad():
        first_logits, _ = model(torch.zeros(4, 16, dtype=torch.long), features, text_mask=mask)
    allowed = first_logits[:, 0].topk(3).indices
    for seed in range(10):
        codes = model.generate(features, mask, top_k=3, generator=torch.Generator().manual_seed(seed)).codes
        assert all(codes[i, 0, 0] in allowed[i] for i in range(4))


def _redraw(*cells: int) -> torch.Tensor:
    redraw = torch.zeros(16, dtype=torch.bool)
    redraw[list(cells)] = True
    return redraw


@pytest.mark.parametrize("guidance_scale", [1.0, 2.0])
def test_editing_keeps_every_code_outside_the_mask(guidance_scale):
    model = _prior()
    features, mask = _text()
    given = torch.randint(0, TINY.codebook_size, (2, 16), generator=torch.Generator().manual_seed(2))
    redraw = _redraw(5, 6, 9, 10)  # the middle 2 x 2 codes of the 4 x 4 grid
    results = []
    for use_cache in (True, False):
        out = model.generate(
            features, mask, codes=given, redraw=redraw, guidance_scale=guidance_scale, use_cache=use_cache,
            generator=torch.Generator().manual_seed(0),
        )  # fmt: skip
        assert torch.equal(out.codes.flatten(1)[:, ~redraw], given[:, ~redraw])
        # every code's log-probability, kept ones after the region included, as one forward pass scores them
        assert torch.allclose(out.log_likelihood(), mean_log_probability(model, out.codes, features, mask), atol=1e-5)
        results.append(out.codes)
    assert torch.equal(*results)  # fed in at once from the cache, or recomputed at every step: the same codes
    redrawn = [model.generate(features, mask, codes=given, redraw=redraw, generator=torch.Generator().manual_seed(s))
               for s in range(4)]  # fmt: skip
    assert any(not torch.equal(one.codes, redrawn[0].codes) for one in redrawn[1:])


def test_redrawing_everything_is_generation():
    model = _prior()
    features, mask = _text()
    given = torch.randint(0, TINY.codebook_size, (2, 4, 4))
    everything = torch.ones(4, 4, dtype=torch.bool)
    edited = model.generate(features, mask, codes=given, redraw=everything, generator=torch.Generator().manual_seed(4))
    generated = model.generate(features, mask, generator=torch.Generator().manual_seed(4))
    assert torch.equal(edited.codes, generated.codes) and torch.equal(edited.log_probs, generated.log_probs)


def test_completion_keeps_the_given_rows():
    model = _prior()
    features, mask = _text()
    given = torch.randint(0, TINY.codebook_size, (2, 16))
    for use_cache in (True, False):
        out = model.generate(
            features, mask, codes=given, redraw=torch.arange(16) >= 8, use_cache=use_cache,
            generator=torch.Generator().manual_seed(0),
        )  # fmt: skip
        assert torch.equal(out.codes.flatten(1)[:, :8], given[:, :8])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"redraw": _redraw(3)}, "needs the codes"),
        ({"codes": torch.zeros(2, 15, dtype=torch.long), "redraw": _redraw(3)}, "codes must be"),
        ({"codes": torch.full((2, 16), 16), "redraw": _redraw(3)}, "lie in"),
        ({"codes": torch.zeros(2, 16, dtype=torch.long)}, "redraw must be"),
        ({"codes": torch.zeros(2, 16, dtype=torch.long), "redraw": torch.ones(16)}, "redraw must be"),
        ({"codes": torch.zeros(2, 16, dtype=torch.long), "redraw": torch.ones(3, 3, dtype=torch.bool)}, "redraw"),
    ],
)
def test_bad_editing_arguments(kwargs, message):
    model = _prior()
    features, mask = _text()
    with pytest.raises(ValueError, match=message):
        model.generate(features, mask, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": 17}, "codebook size"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"guidance_scale": -1.0}, "guidance_scale"),
        ({"guidance_scale": float("nan")}, "guidance_scale"),
    ],
)
def test_bad_sampling_arguments(kwargs, message):
    model = _prior()
    features, mask = _text()
    with pytest.raises(ValueError, match=message):
        model.generate(features, mask, **kwargs)


def test_save_load_and_config_checks(tmp_path):
    model = _prior()
    model.save_pretrained(tmp_path / "prior")
    loaded = Prior.from_pretrained(tmp_path / "prior")
    features, mask = _text()
    g = torch.Generator
    assert torch.equal(
        loaded.generate(features, mask, generator=g().manual_seed(0)).codes,
        model.generate(features, mask, generator=g().manual_seed(0)).codes,
    )
    with pytest.raises(ValueError, match="heads"):
        PriorConfig(dim=30, heads=4)
    with pytest.raises(ValueError, match="text features"):
        model(torch.zeros(1, 16, dtype=torch.long), torch.zeros(1, 3, 3))
