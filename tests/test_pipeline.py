import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from common.hub import ModelLoadError
from contrastive.model import PRESETS as CLIP_PRESETS
from contrastive.model import ContrastiveModel
from pipelines.text_to_image import (
    PIPELINE_NAME,
    RERANKERS,
    SAMPLING_DEFAULTS,
    STAGES,
    TextToImagePipeline,
    best_candidates,
)
from prior.model import Prior, PriorConfig
from tests.helpers import mean_log_probability
from vqvae.model import PRESETS as VQ_PRESETS
from vqvae.model import VQVAE

PRIOR = PriorConfig(codebook_size=16, grid_size=8, text_width=32, text_length=16, dim=32, layers=1, heads=2)


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    return TextToImagePipeline(VQVAE(VQ_PRESETS["tiny"]), ContrastiveModel(CLIP_PRESETS["tiny"]), Prior(PRIOR))


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_images_codes_and_scores(pipe):
    out = pipe(["a blue ball on grass", "a red star"], num_images_per_prompt=2, generator=_gen(), show_progress=False)
    assert len(out.images) == 4 and out.images[0].size == (16, 16) and out.images[0].mode == "RGB"
    assert out.codes.shape == (4, 8, 8)
    assert out.scores.shape == (4,) and out.scores.abs().max() <= 1
    features, mask = pipe.contrastive.text_token_features(out.prompts)
    assert torch.allclose(out.log_likelihoods, mean_log_probability(pipe.prior, out.codes, features, mask), atol=1e-5)
    assert (out.log_likelihoods < 0).all()
    assert out.prompts == ["a blue ball on grass"] * 2 + ["a red star"] * 2
    as_array = pipe("a red star", output_type="np", generator=_gen(), show_progress=False).images
    assert as_array.shape == (1, 16, 16, 3) and as_array.dtype.name == "uint8"
    as_tensor = pipe("a red star", output_type="pt", generator=_gen(), show_progress=False).images
    assert as_tensor.shape == (1, 3, 16, 16) and as_tensor.min() >= -1 and as_tensor.max() <= 1


def test_reranking_keeps_the_best_candidate(pipe):
    best = pipe("a blue ball", num_candidates=4, guidance_scale=2.0, generator=_gen(3), show_progress=False)
    all_four = pipe("a blue ball", num_images_per_prompt=4, guidance_scale=2.0, generator=_gen(3), show_progress=False)
    winner = all_four.scores.argmax()
    assert best.scores[0] == pytest.approx(all_four.scores.max().item())
    assert torch.equal(best.codes[0], all_four.codes[winner])


def test_reranking_rules():
    scores = torch.tensor([0.9, 0.8, 0.1, 0.3, 0.29, 0.1])
    null_scores = torch.tensor([0.2, 0.3, 0.0, 0.25, 0.1, 0.0])
    log_likelihoods = torch.tensor([-9.0, -1.0, -1.5, -5.0, -1.0, -1.2])
    assert best_candidates(scores, null_scores, log_likelihoods, 3, "contrastive").tolist() == [0, 3]
    # in each group the first sample is a little the most similar, but by far the least likely
    assert best_candidates(scores, null_scores, log_likelihoods, 3, "contrastive+likelihood").tolist() == [1, 4]
    # in the second group the first sample matches the empty prompt nearly as well as its own
    assert best_candidates(scores, null_scores, log_likelihoods, 3, "contrastive-null").tolist() == [0, 4]


def test_null_scores_are_similarities_with_the_empty_prompt(pipe):
    out = pipe(["a blue ball", "a red star"], output_type="pt", generator=_gen(), show_progress=False)
    with torch.no_grad():
        embedded = pipe.contrastive.encode_image(out.images)
        empty = pipe.contrastive.encode_text([""])
    assert torch.allclose(out.null_scores, (embedded * empty).sum(-1), atol=1e-5)
    assert torch.allclose(out.scores, pipe.contrastive.similarity(out.images, out.prompts), atol=1e-5)
    assert not torch.allclose(out.scores, out.null_scores)


def test_reranking_setting_picks_among_the_same_candidates(pipe):
    def best(rerank):
        return pipe("a blue ball", num_candidates=6, rerank=rerank, generator=_gen(4), show_progress=False)

    all_six = pipe("a blue ball", num_images_per_prompt=6, generator=_gen(4), show_progress=False)
    for rerank in RERANKERS:
        kept = best_candidates(all_six.scores, all_six.null_scores, all_six.log_likelihoods, 6, rerank)
        assert torch.equal(best(rerank).codes[0], all_six.codes[kept[0]])
    with pytest.raises(ValueError, match="rerank"):
        best("judge")


def test_save_load_gives_identical_images(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = TextToImagePipeline.from_pretrained(tmp_path / "pipe")
    a = pipe("a small white heart", output_type="pt", generator=_gen(1), show_progress=False)
    b = loaded("a small white heart", output_type="pt", generator=_gen(1), show_progress=False)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.images, b.images)
    separate = TextToImagePipeline.from_stages(
        tmp_path / "pipe/vqvae", tmp_path / "pipe/contrastive", tmp_path / "pipe/prior"
    )
    assert torch.equal(separate("a small white heart", generator=_gen(1), show_progress=False).codes, a.codes)


def test_default_sampling_settings_are_saved_used_and_overridable(pipe, tmp_path):
    stages = (pipe.vqvae, pipe.contrastive, pipe.prior)
    tuned = TextToImagePipeline(*stages, sampling={"temperature": 0.5, "top_k": 3, "num_candidates": 2})
    assert tuned.sampling == {**SAMPLING_DEFAULTS, "temperature": 0.5, "top_k": 3, "num_candidates": 2}
    tuned.save_pretrained(tmp_path / "tuned")
    loaded = TextToImagePipeline.from_pretrained(tmp_path / "tuned")
    assert loaded.sampling == tuned.sampling

    def codes(p, **settings):
        return p("a red star", generator=_gen(2), show_progress=False, **settings).codes

    explicit = codes(pipe, temperature=0.5, top_k=3, num_candidates=2)
    assert torch.equal(codes(loaded), explicit)
    assert not torch.equal(codes(loaded, temperature=1.0, top_k=16, num_candidates=1), explicit)
    assert torch.equal(codes(loaded, temperature=1.0, top_k=16, num_candidates=1), codes(pipe, top_k=16))
    spec = json.loads((tmp_path / "tuned" / PIPELINE_NAME).read_text())
    bad_settings = ({"top_k": 0}, {"temprature": 1.0}, {"rerank": "clip"}, [])
    for bad, message in zip(bad_settings, ("top_k", "temprature", "rerank", "JSON object"), strict=True):
        spec["sampling"] = bad
        (tmp_path / "tuned" / PIPELINE_NAME).write_text(json.dumps(spec))
        with pytest.raises(ModelLoadError, match=message):
            TextToImagePipeline.from_pretrained(tmp_path / "tuned")


def test_mismatched_stages_are_named():
    with pytest.raises(ValueError, match="codebook size is 32 but the tokenizer's is 16"):
        TextToImagePipeline(
            VQVAE(VQ_PRESETS["tiny"]),
            ContrastiveModel(CLIP_PRESETS["tiny"]),
            Prior(PRIOR.replace({"codebook_size": 32})),
        )
    with pytest.raises(ValueError, match="text width"):
        TextToImagePipeline(
            VQVAE(VQ_PRESETS["tiny"]), ContrastiveModel(CLIP_PRESETS["tiny"]), Prior(PRIOR.replace({"text_width": 64}))
        )


def test_pipeline_json_cannot_point_outside(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "pipe")
    spec = json.loads((tmp_path / "pipe" / PIPELINE_NAME).read_text())
    for bad in ("../../etc", "/etc", ".."):
        spec["stages"]["prior"]["folder"] = bad
        (tmp_path / "pipe" / PIPELINE_NAME).write_text(json.dumps(spec))
        with pytest.raises(ModelLoadError, match="plain folder name"):
            TextToImagePipeline.from_pretrained(tmp_path / "pipe")


def test_a_stage_saved_on_its_own_is_noticed(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "pipe")
    pipe.prior.save_pretrained(tmp_path / "pipe" / "prior")  # a new save_id
    with pytest.raises(ModelLoadError, match="saved separately"):
        TextToImagePipeline.from_pretrained(tmp_path / "pipe")


@pytest.mark.parametrize(
    ("prompt", "message"),
    [("", "empty"), ("   \n\t", "empty"), ([], "non-empty list"), (["ok", 3], "prompt 1 is a int"), (None, "string")],
)
def test_bad_prompts_get_a_clear_error(pipe, prompt, message):
    with pytest.raises(ValueError, match=message):
        pipe(prompt, show_progress=False)


def test_odd_prompts_work(pipe):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = pipe(["x" * 10_000, "🐶 a dog \x00\x1b[31m red", "ünïcödé ball"], generator=_gen(), show_progress=False)
    assert len(out.images) == 3
    assert any("characters" in str(w.message) or "tokens" in str(w.message) for w in caught)
    assert "\x00" not in out.prompts[1] and "\x1b" not in out.prompts[1]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"guidance_scale": float("nan")}, "guidance_scale"), ({"guidance_scale": -2.0}, "guidance_scale"),
     ({"top_k": 0}, "top_k"), ({"top_k": 10_000}, "codebook size"), ({"top_p": 0.0}, "top_p"),
     ({"num_candidates": 0}, "num_candidates"), ({"num_images_per_prompt": 1.5}, "num_images_per_prompt"),
     ({"output_type": "jpeg"}, "output_type")],
)  # fmt: skip
def test_bad_arguments_get_a_clear_error(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipe("a blue ball", show_progress=False, **kwargs)


def test_completion_keeps_the_top_rows_of_the_image(pipe, tmp_path):
    from PIL import Image

    from common.data import resize_center_crop, to_tensor

    picture = Image.fromarray((torch.rand(16, 16, 3, generator=_gen(1)) * 255).byte().numpy())
    picture.save(tmp_path / "in.png")
    codes = pipe.vqvae.encode(to_tensor(picture)[None])  # (1, 8, 8)
    for source in (picture, tmp_path / "in.png", str(tmp_path / "in.png")):
        out = pipe(["a blue ball", "a red star"], image=source, keep_rows=3, num_images_per_prompt=2,
                   num_candidates=2, guidance_scale=2.0, generator=_gen(), show_progress=False)  # fmt: skip
        assert out.codes.shape == (4, 8, 8)
        assert (out.codes[:, :3] == codes[:, :3]).all()
    assert any(not torch.equal(out.codes[0, 3:], other[3:]) for other in out.codes[1:])  # the rest is sampled
    flipped = picture.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    each = pipe(["a blue ball", "a red star"], image=[picture, flipped], keep_rows=3, num_images_per_prompt=2,
                num_candidates=2, generator=_gen(), show_progress=False, batch_size=3)  # fmt: skip
    for rows, source in ((slice(0, 2), picture), (slice(2, 4), flipped)):  # each prompt completes its own image
        assert (each.codes[rows, :3] == pipe.vqvae.encode(to_tensor(source)[None])[:, :3]).all()
    wide = picture.resize((40, 30))  # any size is resized and center-cropped, as training data is
    default = pipe("a blue ball", image=wide, generator=_gen(), show_progress=False)
    resized = pipe.vqvae.encode(to_tensor(resize_center_crop(wide, 16))[None])
    assert default.codes.shape == (1, 8, 8) and torch.equal(default.codes[:, :4], resized[:, :4])  # half the rows


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"keep_rows": 2}, "needs an image"), ({"image": "PIC", "keep_rows": 0}, "from 1 to 7"),
     ({"image": "PIC", "keep_rows": 8}, "from 1 to 7"), ({"image": "PIC", "keep_rows": 2.5}, "integer"),
     ({"image": "PIC", "keep_rows": True}, "integer"), ({"image": 3}, "PIL image or the path"),
     ({"image": "/no/such/picture.png"}, "missing image"), ({"image": ["PIC", "PIC"]}, "2 images for 1 prompts")],
)  # fmt: skip
def test_bad_completion_arguments_get_a_clear_error(pipe, kwargs, message):
    from PIL import Image

    red = Image.new("RGB", (16, 16), "red")
    if kwargs.get("image") == "PIC":
        kwargs["image"] = red
    if kwargs.get("image") == ["PIC", "PIC"]:
        kwargs["image"] = [red, red]
    with pytest.raises(ValueError, match=message):
        pipe("a blue ball", show_progress=False, **kwargs)


def test_generate_command_writes_a_grid(pipe, tmp_path, capsys):
    from PIL import Image

    from app.cli import main

    for stage in ("vqvae", "contrastive", "prior"):
        getattr(pipe, stage).save_pretrained(tmp_path / "stages" / stage)
    stages = [f"--{stage}={tmp_path / 'stages' / stage}" for stage in ("vqvae", "contrastive", "prior")]
    sampling = '{"temperature": 0.8, "top_k": 5}'
    assert main(["assemble", *stages, "--out", str(tmp_path / "pipe"), "--sampling", sampling]) == 0
    assert TextToImagePipeline.from_pretrained(tmp_path / "pipe").sampling["top_k"] == 5
    for flag in ("--sampling", "--edit-sampling"):
        for bad in ('{"top_k": -1}', "{top_k: 5}", "[]"):
            assert main(["assemble", *stages, "--out", str(tmp_path / "bad"), flag, bad]) == 2
            assert capsys.readouterr().err.count(f"{flag}:") == 1
    edits = '{"guidance_scale": 2.5}'
    assert (
        main(["assemble", *stages, "--out", str(tmp_path / "e"), "--sampling", sampling, "--edit-sampling", edits]) == 0
    )
    edit_defaults = TextToImagePipeline.from_pretrained(tmp_path / "e").edit_sampling
    assert edit_defaults == {**SAMPLING_DEFAULTS, "temperature": 0.8, "top_k": 5, "guidance_scale": 2.5}
    out = tmp_path / "grid.png"
    assert main(["generate", "a blue ball on grass", "a red star", "--model", str(tmp_path / "pipe"),
                 "-n", "3", "--seed", "0", "--out", str(out)]) == 0  # fmt: skip
    assert Image.open(out).size[0] > 3 * 16
    Image.new("RGB", (16, 16), "green").save(tmp_path / "green.png")
    completed = tmp_path / "completed.png"
    assert main(["generate", "a blue ball on grass", "--model", str(tmp_path / "pipe"), "-n", "2",
                 "--image", str(tmp_path / "green.png"), "--keep-rows", "3", "--out", str(completed)]) == 0  # fmt: skip
    assert Image.open(completed).size[0] == Image.open(out).size[0]  # the image it completes, then 2 pictures
    assert main(["generate", "x", "--model", str(tmp_path / "pipe"), "--keep-rows", "3"]) == 2
    assert "needs an image" in capsys.readouterr().err
    assert main(["generate", "", "--model", str(tmp_path / "pipe")]) == 2
    assert "prompt 0 is empty" in capsys.readouterr().err
    assert main(["generate", "x", "--model", str(tmp_path / "nothing")]) == 2


def test_eval_command_writes_json_and_markdown(pipe, tmp_path, capsys):
    from app.cli import main
    from corpora.shapes import build

    build(tmp_path / "data", 40, resolution=16, seed=0, val_fraction=0.5, workers=1, progress=False)
    pipe.save_pretrained(tmp_path / "pipe")
    args = ["eval", "--model", str(tmp_path / "pipe"), "--data", str(tmp_path / "data"), "--out", str(tmp_path / "ev"),
            "--num-prompts", "6"]  # fmt: skip
    assert main(args) == 0
    report = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert {"psnr", "usage"} <= report["tokenizer"].keys()
    assert "text_to_image_r1" in report["search"]
    assert report["generation"]["prompts"] == 6 and 0 <= report["generation"]["judge_match_all"] <= 1
    assert "## Generation" in (tmp_path / "ev" / "eval.md").read_text()


def test_a_stage_folder_symlinked_out_of_the_pipeline_is_refused(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "pipe")
    (tmp_path / "pipe" / "prior").rename(tmp_path / "elsewhere")
    (tmp_path / "pipe" / "prior").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ModelLoadError, match=r"pipe/prior leads outside .*pipe \(to .*elsewhere\)"):
        TextToImagePipeline.from_pretrained(tmp_path / "pipe")
    (tmp_path / "pipe" / "prior").unlink()  # a link to a folder inside the pipeline folder is fine
    (tmp_path / "elsewhere").rename(tmp_path / "pipe" / "prior-v2")
    (tmp_path / "pipe" / "prior").symlink_to("prior-v2")
    TextToImagePipeline.from_pretrained(tmp_path / "pipe")
    (tmp_path / "pipe" / PIPELINE_NAME).rename(tmp_path / PIPELINE_NAME)
    (tmp_path / "pipe" / PIPELINE_NAME).symlink_to(tmp_path / PIPELINE_NAME)
    with pytest.raises(ModelLoadError, match=rf"{PIPELINE_NAME} leads outside"):
        TextToImagePipeline.from_pretrained(tmp_path / "pipe")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda spec: spec.update(comment="mine"),
            "pipeline.json: unknown key 'comment' \\(known: edit_sampling, sampling, stages\\)",
        ),
        (lambda spec: spec["stages"]["vqvae"].update(path="/etc"), "stage 'vqvae': unknown key 'path'"),
    ],
)
def test_unknown_keys_in_pipeline_json_are_refused(pipe, tmp_path, edit, message):
    pipe.save_pretrained(tmp_path / "pipe")
    spec = json.loads((tmp_path / "pipe" / PIPELINE_NAME).read_text())
    edit(spec)
    (tmp_path / "pipe" / PIPELINE_NAME).write_text(json.dumps(spec))
    with pytest.raises(ModelLoadError, match=message):
        TextToImagePipeline.from_pretrained(tmp_path / "pipe")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"guidance_scale": False}, "guidance_scale"), ({"temperature": True}, "temperature"), ({"top_p": True}, "top_p"),
     ({"generator": "seed"}, "generator must be a torch.Generator"), ({"generator": 0}, "generator"),
     *[({"batch_size": bad}, "batch_size must be an integer") for bad in (0, -1, 1.5, "32", None, True)]],
)  # fmt: skip
def test_booleans_generators_and_batch_sizes_are_checked(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipe("a blue ball", show_progress=False, **kwargs)


def test_booleans_in_stored_sampling_settings_are_refused(pipe, tmp_path):
    with pytest.raises(ValueError, match="guidance_scale"):
        TextToImagePipeline(pipe.vqvae, pipe.contrastive, pipe.prior, sampling={"guidance_scale": False})
    from app.cli import main

    for name in STAGES:
        getattr(pipe, name).save_pretrained(tmp_path / name)
    folders = [f"--{name}={tmp_path / name}" for name in STAGES]
    argv = ["assemble", *folders, "--out", str(tmp_path / "p"), "--sampling", '{"temperature": true}']
    assert main(argv) == 2
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("size", [(0, 0), (1, 1), (64, 4)])
def test_a_picture_too_small_is_refused_as_its_file_would_be(pipe, tmp_path, size):
    from PIL import Image

    from common.data import BadImage

    picture = Image.new("RGB", size, "red")
    with pytest.raises(BadImage, match="too small"):
        pipe("a ball", image=picture, show_progress=False)
    if min(size) > 0:
        picture.save(tmp_path / "small.png")
        with pytest.raises(BadImage, match="too small"):
            pipe("a ball", image=tmp_path / "small.png", show_progress=False)


def test_callback_reports_every_drawing_step_and_can_stop_the_call(pipe):
    seen = []
    out = pipe(["a blue ball", "a red star"], num_images_per_prompt=3, batch_size=4, generator=_gen(),
               show_progress=False, callback=lambda done, total: seen.append((done, total)))  # fmt: skip
    steps = pipe.prior.config.num_codes
    assert seen == [(i, 2 * steps) for i in range(1, 2 * steps + 1)]  # two batches of drawing
    plain = pipe(["a blue ball", "a red star"], num_images_per_prompt=3, batch_size=4, generator=_gen(),
                 show_progress=False)  # fmt: skip
    assert torch.equal(out.codes, plain.codes)

    class Stop(Exception):
        pass

    def stop_at_five(done, total):
        if done == 5:
            raise Stop

    with pytest.raises(Stop):
        pipe("a blue ball", generator=_gen(), show_progress=False, callback=stop_at_five)


def test_edit_reports_its_drawing_steps(pipe):
    seen = []
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    pipe.edit(picture, (0, 8, 16, 16), "a red star", generator=_gen(), show_progress=False,
              callback=lambda done, total: seen.append((done, total)))  # fmt: skip
    total = seen[-1][1]
    assert seen == [(i, total) for i in range(1, total + 1)] and 0 < total <= pipe.prior.config.num_codes
