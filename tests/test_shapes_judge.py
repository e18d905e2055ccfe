import numpy as np
import pytest
from PIL import Image

from common.config import ConfigError
from corpora.shapes import ATTRIBUTES, Scene, blur, render
from corpora.shapes_judge import (
    EVAL_STREAM,
    JudgeConfig,
    ShapesJudge,
    accuracy,
    check,
    load_judge,
    render_set,
    train,
)


@pytest.fixture(scope="module")
def judge() -> ShapesJudge:
    return load_judge()


@pytest.fixture(scope="module")
def red_ball() -> Image.Image:
    return render(Scene("red", "ball", "grass", "large", "center"), 64, np.random.default_rng(0))


def test_released_judge_agrees_with_renderer(judge: ShapesJudge) -> None:
    images, labels = render_set(200, seed=123, stream=EVAL_STREAM, workers=0, progress=False)
    crisp = [Image.fromarray(image) for image in images]
    for pictures in (crisp, [blur(p, 1.0) for p in crisp]):
        readings = judge.read(pictures)
        for k, name in enumerate(ATTRIBUTES):
            truth = [ATTRIBUTES[name][label] for label in labels[:, k]]
            accuracy = np.mean([r[name] == t for r, t in zip(readings, truth, strict=True)])
            assert accuracy >= 0.97, (name, accuracy)


def test_read_any_size_and_mode(judge: ShapesJudge) -> None:
    scene = Scene("yellow", "star", "brick wall", "large", "left")
    big = render(scene, 128, np.random.default_rng(1))
    expected = {"color": "yellow", "shape": "star", "background": "brick wall", "size": "large"}
    for image in (big, big.convert("RGBA"), big.resize((96, 96))):
        assert judge.read([image])[0] == {**expected, "position": "left"}


def test_score_semantics(judge: ShapesJudge, red_ball: Image.Image) -> None:
    prompts = ["a red ball on grass", "a blue ball on grass", "a sphere", "a large red box", "on the grass"]
    result = judge.score(prompts, [red_ball] * len(prompts))
    assert result.matches == [True, False, True, False, True]
    assert result.match_rate == pytest.approx(3 / 5)
    assert result.readings[0]["color"] == "red"
    assert result.missing == [(), ("color",), (), ("shape",), ()]
    from app.demo import verdict_label

    assert verdict_label(prompts[3], result.missing[3]) == "NO, wrong shape: a large red box"
    assert verdict_label(prompts[0], result.missing[0]) == "ok: a red ball on grass"
    with pytest.raises(ValueError, match="2 prompts but 1 images"):
        judge.score(["a red ball", "a ball"], [red_ball])


def test_agreement_per_attribute(judge: ShapesJudge, red_ball: Image.Image) -> None:
    blue_star = render(Scene("blue", "star", "grass", "large", "center"), 64, np.random.default_rng(0))
    agreement = judge.agreement([red_ball, red_ball], [blur(red_ball, 1.0), blue_star])
    assert agreement == {"color": [True, False], "shape": [True, False], "background": [True, True]}
    assert judge.agreement([red_ball], [blue_star], ("size",)) == {"size": [True]}
    with pytest.raises(ValueError, match="2 originals but 1 copies"):
        judge.agreement([red_ball, red_ball], [red_ball])


def test_config_limits() -> None:
    with pytest.raises(ConfigError, match="channels"):
        JudgeConfig(channels=(8, 8, 8))
    with pytest.raises(ConfigError, match="hidden"):
        JudgeConfig(hidden=10**6)


def test_train_writes_a_loadable_judge_that_learns(tmp_path) -> None:
    cfg = JudgeConfig(channels=(8, 8, 16, 8), hidden=32)
    out = tmp_path / "judge"
    losses = train(out, steps=30, batch_size=32, pool_size=64, lr=1e-2, workers=0, config=cfg, progress=False)
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    model = load_judge(out)
    assert model.config == cfg
    reading = model.read([Image.new("RGB", (40, 30), "white")])[0]
    assert all(reading[name] in values for name, values in ATTRIBUTES.items())
    with pytest.raises(ValueError, match="judge accuracy below 0.99 for"):
        check(out, num_images=20)


def test_released_judge_reads_128_px_renders(judge: ShapesJudge) -> None:
    images, labels = render_set(100, seed=123, stream=EVAL_STREAM, workers=0, progress=False, resolution=128)
    assert images.shape == (100, 128, 128, 3)
    small, same_labels = render_set(100, seed=123, stream=EVAL_STREAM, workers=0, progress=False)
    assert np.array_equal(labels, same_labels) and small.shape == (100, 64, 64, 3)  # the same scenes
    result = accuracy(judge, 200, seed=123, workers=0, progress=False, resolution=128)  # blurred: sigma 2 px
    assert min(min(condition.values()) for condition in result.values()) >= 0.97, result
