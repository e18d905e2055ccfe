import numpy as np
import pytest
import torch
from PIL import Image

from app.cli import main
from common.data import to_tensor
from contrastive.model import PRESETS as CLIP_PRESETS
from contrastive.model import ContrastiveModel
from pipelines.editing import BLEND_EDGE, code_cells, edit_region, soft_edge
from pipelines.text_to_image import DEMO_MODEL, TextToImagePipeline, best_candidates
from prior.model import Prior, PriorConfig
from vqvae.model import PRESETS as VQ_PRESETS
from vqvae.model import VQVAE

PRIOR = PriorConfig(codebook_size=16, grid_size=8, text_width=32, text_length=16, dim=32, layers=1, heads=2)
SETTINGS = {"num_candidates": 3, "guidance_scale": 2.0, "show_progress": False}  # 16-px pictures, 2-px code cells


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    return TextToImagePipeline(VQVAE(VQ_PRESETS["tiny"]), ContrastiveModel(CLIP_PRESETS["tiny"]), Prior(PRIOR))


@pytest.fixture(scope="module")
def picture():
    return Image.fromarray((torch.rand(16, 16, 3, generator=torch.Generator().manual_seed(1)) * 255).byte().numpy())


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _grown(region: torch.Tensor, pixels: int) -> torch.Tensor:
    return torch.nn.functional.max_pool2d(region[None, None].float(), 2 * pixels + 1, 1, pixels)[0, 0] > 0


@pytest.mark.parametrize("box", [(5, 4, 11, 9), (12, 0, 16, 16)])  # a region inside, and a border (outpainting)
def test_codes_outside_the_mask_are_kept(pipe, picture, box):
    kept = pipe.vqvae.encode(to_tensor(picture)[None])[0]
    cells = code_cells(edit_region(box, (16, 16), 16), 8)
    left, top, right, bottom = box
    assert cells.sum() == ((right + 1) // 2 - left // 2) * ((bottom + 1) // 2 - top // 2)  # every cell it touches
    out = pipe.edit(picture, box, ["a red star", "a blue ball"], num_images_per_prompt=2, generator=_gen(),
                    output_type="pt", **SETTINGS)  # fmt: skip
    assert out.codes.shape == (4, 8, 8) and out.prompts == ["a red star"] * 2 + ["a blue ball"] * 2
    assert (out.codes[:, ~cells] == kept[~cells]).all()
    assert any(not torch.equal(one[cells], out.codes[0][cells]) for one in out.codes[1:])  # the region is drawn
    # blended: the input outside the mask and its soft edge, the drawing inside the mask
    source = to_tensor(picture)
    region = edit_region(box, (16, 16), 16)
    outside = ~_grown(region, BLEND_EDGE - 1)
    assert torch.allclose(out.images[:, :, outside], source[:, outside].expand(4, -1, -1), atol=1e-6)
    drawn = pipe.vqvae.decode(out.codes)
    assert torch.allclose(out.images[:, :, region], drawn[:, :, region], atol=1e-6)
    unblended = pipe.edit(picture, box, ["a red star", "a blue ball"], num_images_per_prompt=2, generator=_gen(),
                          output_type="pt", blend=False, **SETTINGS)  # fmt: skip
    assert torch.equal(unblended.codes, out.codes)  # blending changes pixels, never which candidate wins
    assert torch.allclose(unblended.images, drawn, atol=1e-6)


def test_a_full_mask_is_generation_with_the_same_seed(pipe, picture):
    everything = np.ones((16, 16), bool)
    edited = pipe.edit(picture, everything, "a red star", num_images_per_prompt=2, generator=_gen(5),
                       output_type="pt", **SETTINGS)  # fmt: skip
    generated = pipe("a red star", num_images_per_prompt=2, generator=_gen(5), output_type="pt", **SETTINGS)
    assert torch.equal(edited.codes, generated.codes)
    assert torch.equal(edited.images, generated.images)
    assert torch.equal(edited.log_likelihoods, generated.log_likelihoods)


def test_edits_take_the_models_edit_sampling_settings(pipe, picture, tmp_path):
    """`edit_sampling` is edit's defaults, saved with the pipeline; settings it leaves out are `sampling`'s, and
    generation keeps `sampling`."""
    stages = (pipe.vqvae, pipe.contrastive, pipe.prior)
    tuned = TextToImagePipeline(*stages, sampling={"temperature": 0.6}, edit_sampling={"num_candidates": 3})
    assert tuned.edit_sampling == {**tuned.sampling, "num_candidates": 3}
    assert tuned.sampling["num_candidates"] == 1
    tuned.save_pretrained(tmp_path / "tuned")
    loaded = TextToImagePipeline.from_pretrained(tmp_path / "tuned")
    assert (loaded.sampling, loaded.edit_sampling) == (tuned.sampling, tuned.edit_sampling)

    def edited(p, **settings):
        return p.edit(picture, (5, 4, 11, 9), "a red star", generator=_gen(3), show_progress=False, **settings)

    explicit = edited(pipe, temperature=0.6, num_candidates=3)
    assert torch.equal(edited(loaded).codes, explicit.codes)
    assert torch.equal(edited(loaded, num_candidates=1).codes, edited(pipe, temperature=0.6).codes)
    generated = loaded("a red star", generator=_gen(3), show_progress=False)
    assert torch.equal(
        generated.codes, pipe("a red star", temperature=0.6, generator=_gen(3), show_progress=False).codes
    )
    with pytest.raises(ValueError, match="num_candidates"):
        TextToImagePipeline(*stages, edit_sampling={"num_candidates": 0})
    with pytest.raises(ValueError, match="JSON object"):
        TextToImagePipeline(*stages, edit_sampling=[])


def test_candidates_are_ranked_by_the_whole_grid_or_by_the_region(pipe, picture):
    box = (0, 0, 16, 8)  # the top half: every kept code follows the region
    settings = {**SETTINGS, "rerank": "contrastive+likelihood", "output_type": "pt"}
    fitted = pipe.edit(picture, box, "a red star", generator=_gen(2), **settings)
    naive = pipe.edit(picture, box, "a red star", generator=_gen(2), fit_what_follows=False, **settings)
    # the same three candidates, all returned
    drawn = pipe.edit(picture, box, "a red star", generator=_gen(2), num_images_per_prompt=3,
                      **{**settings, "num_candidates": 1})  # fmt: skip
    features, mask = pipe.contrastive.text_token_features(["a red star"] * 3)
    with torch.no_grad():
        logits, _ = pipe.prior(drawn.codes, features, text_mask=mask, drop=torch.zeros(3, dtype=torch.bool))
    log_probs = logits.log_softmax(-1).gather(-1, drawn.codes.flatten(1)[..., None])[..., 0]
    assert torch.allclose(drawn.log_likelihoods, log_probs.mean(1), atol=1e-5)  # the whole grid's
    region = log_probs[:, :32].mean(1)  # the redrawn codes' alone
    for out, likelihoods in ((fitted, drawn.log_likelihoods), (naive, region)):
        best = best_candidates(drawn.scores, drawn.null_scores, likelihoods, 3, "contrastive+likelihood")
        assert torch.equal(out.codes, drawn.codes[best])
        assert torch.allclose(out.log_likelihoods, likelihoods[best], atol=1e-5)


def test_the_soft_edge_fades_out_over_a_few_pixels():
    region = torch.zeros(16, 16, dtype=torch.bool)
    region[4:8, 4:8] = True
    alpha = soft_edge(region, 3)
    assert (alpha[region] == 1).all()
    assert alpha[5, 8].item() == pytest.approx(2 / 3) and alpha[5, 9].item() == pytest.approx(1 / 3)
    assert alpha[5, 10] == 0 and alpha[0, 0] == 0


def test_masks_follow_the_picture_when_it_is_resized():
    mask = np.zeros((40, 60), bool)  # a 60 x 40 picture: its central 40 x 40 square is scaled to 16 px
    mask[0:20, 10:30] = True  # the left half of the central square's top half
    region = edit_region(mask, (60, 40), 16)
    assert region[:8, :8].all() and not region[8:].any() and not region[:, 8:].any()
    assert torch.equal(edit_region((10, 0, 30, 20), (60, 40), 16), region)  # the same region as a box


def _bad(kind):
    wrong = np.zeros((16, 16), np.uint8)
    if kind == "gray":
        wrong[4:8, 4:8] = 128
    return {
        "empty": np.zeros((16, 16), bool),
        "wrong size": np.ones((8, 16), bool),
        "box outside": (10, 10, 20, 12),
        "empty box": (8, 2, 8, 10),
        "gray": wrong,
        "three-d": np.ones((16, 16, 3), bool),
        "not a mask": "the left half",
    }[kind]


@pytest.mark.parametrize(
    ("kind", "message"),
    [("empty", "mask is empty"), ("wrong size", "mask is 16x8 pixels but the picture is 16x16"),
     ("box outside", "reaches outside the 16x16 picture"), ("empty box", "box .* is empty"),
     ("gray", "black and white only"), ("three-d", "2-D"), ("not a mask", "mask must be")],
)  # fmt: skip
def test_bad_masks_get_a_clear_error(pipe, picture, kind, message):
    with pytest.raises(ValueError, match=message):
        pipe.edit(picture, _bad(kind), "a red star", show_progress=False)


def test_a_tiny_picture_gets_a_clear_error(pipe):
    with pytest.raises(ValueError, match="1x1 pixels; editing needs at least"):
        pipe.edit(Image.new("RGB", (1, 1)), (0, 0, 1, 1), "a red star", show_progress=False)


def test_edit_command(pipe, picture, tmp_path, capsys):
    pipe.save_pretrained(tmp_path / "pipe")
    picture.save(tmp_path / "in.png")
    mask = np.zeros((16, 16), np.uint8)
    mask[2:6, 2:6] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    Image.fromarray(mask[:8]).save(tmp_path / "small-mask.png")
    Image.new("RGB", (1, 1)).save(tmp_path / "dot.png")
    model = ["--model", str(tmp_path / "pipe")]
    for region in (["--box", "4,4,12,12"], ["--mask", str(tmp_path / "mask.png")]):
        out = tmp_path / "edits.png"
        args = ["edit", str(tmp_path / "in.png"), *region, "a red star", "a blue ball", *model, "-n", "2"]
        assert main([*args, "--num-candidates", "2", "--out", str(out)]) == 0
        assert "wrote 4 edits" in capsys.readouterr().out
        assert Image.open(out).size[0] == 4 + 3 * (128 + 4)  # the outlined input, then two edits, each row
    bad = [
        (["--box", "4,4,12"], "--box takes left,top,right,bottom"),
        (["--box", "4,4,40,12"], "reaches outside"),
        (["--mask", str(tmp_path / "small-mask.png")], "mask is 16x8 pixels"),
        ([], "--box or with --mask"),
        (["--box", "0,0,1,1", "--picture-is-a-dot"], "1x1 pixels"),
    ]
    for region, message in bad:
        source = str(tmp_path / ("dot.png" if "--picture-is-a-dot" in region else "in.png"))
        region = [flag for flag in region if flag != "--picture-is-a-dot"]
        assert main(["edit", source, *region, "a red star", *model]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.skipif(not (DEMO_MODEL / "pipeline.json").exists(), reason="the released model is not here")
def test_the_released_model_redraws_only_the_box():
    from corpora.shapes import Scene, render_with_box

    demo = TextToImagePipeline.from_pretrained(DEMO_MODEL)
    image, (left, top, right, bottom) = render_with_box(Scene("red", "ball", "grass", "small", "center"), 64,
                                                        np.random.default_rng(0))  # fmt: skip
    assert 18 < left < right < 46 and 18 < top < bottom < 46  # a small ball in the center
    box = (left - 4, top - 4, right + 4, bottom + 4)
    out = demo.edit(image, box, "a blue star on grass", num_candidates=2, generator=_gen(), show_progress=False)
    cells = code_cells(edit_region(box, (64, 64), 64), 16)
    assert (out.codes[0][~cells] == demo.vqvae.encode(to_tensor(image)[None])[0][~cells]).all()
    outside = ~_grown(edit_region(box, (64, 64), 64), BLEND_EDGE - 1).numpy()
    assert (np.asarray(out.images[0])[outside] == np.asarray(image)[outside]).all()
