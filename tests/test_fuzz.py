"""Arbitrary prompts and arguments: every call either works or raises a ValueError that says what is wrong;
the command line exits 0 or 2 with one readable line, never a traceback."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.cli import main
from contrastive.index import ImageIndex, model_identity
from contrastive.model import PRESETS as CLIP_PRESETS
from contrastive.model import ContrastiveModel
from pipelines.text_to_image import TextToImagePipeline
from prior.model import Prior, PriorConfig
from vqvae.model import PRESETS as VQ_PRESETS
from vqvae.model import VQVAE

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
PRIOR = PriorConfig(codebook_size=16, grid_size=8, text_width=32, text_length=16, dim=32, layers=1, heads=2)


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    return TextToImagePipeline(VQVAE(VQ_PRESETS["tiny"]), ContrastiveModel(CLIP_PRESETS["tiny"]), Prior(PRIOR))


@pytest.fixture(scope="module")
def index(pipe):
    model = pipe.contrastive
    with torch.no_grad():
        embeddings = model.encode_image(torch.rand(5, 3, 16, 16) * 2 - 1)
    index = ImageIndex(embeddings, [f"img{i}" for i in range(5)], ["a caption"] * 5, model_identity(model))
    index.set_model(model)
    return index


def _works_or_value_error(call):
    try:
        call()
    except ValueError as err:
        assert str(err), "a ValueError must say what is wrong"


@FAST
@given(prompt=st.one_of(st.text(max_size=300), st.lists(st.one_of(st.text(max_size=40), st.integers()), max_size=3)))
def test_any_prompt(pipe, prompt):
    _works_or_value_error(lambda: pipe(prompt, show_progress=False, generator=torch.Generator().manual_seed(0)))


numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 5), st.sampled_from([1e308, 999.0]))


@FAST
@given(guidance=numbers, temperature=numbers, top_k=st.one_of(st.none(), st.integers(-3, 40)),
       top_p=st.one_of(st.none(), numbers))  # fmt: skip
def test_any_sampling_arguments(pipe, guidance, temperature, top_k, top_p):
    def call():
        out = pipe("a blue ball", guidance_scale=guidance, temperature=temperature, top_k=top_k, top_p=top_p,
                   show_progress=False, generator=torch.Generator().manual_seed(0))  # fmt: skip
        assert out.codes.min() >= 0 and out.codes.max() < PRIOR.codebook_size
        assert not math.isnan(out.scores.sum().item())

    _works_or_value_error(call)


@FAST
@given(query=st.text(max_size=200), k=st.integers(-3, 20))
def test_any_search(index, query, k):
    def call():
        hits = index.search(query, k)
        assert len(hits) == min(k, len(index))

    _works_or_value_error(call)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=st.text(max_size=80), guidance=st.sampled_from(["3", "-1", "nan", "inf", "x"]))
def test_the_command_line_answers_in_one_line(pipe, tmp_path_factory, capsys, prompt, guidance):
    folder = tmp_path_factory.getbasetemp() / "fuzz-pipe"
    if not folder.exists():
        pipe.save_pretrained(folder)
    out = tmp_path_factory.getbasetemp() / "fuzz.png"
    try:
        code = main(["generate", prompt, "--model", str(folder), "--guidance-scale", guidance, "--out", str(out)])
    except SystemExit as exit_:  # argparse rejects what is not a number
        code = exit_.code
    err = capsys.readouterr().err
    assert code in (0, 2)
    assert "Traceback" not in err
    if code == 2 and err.startswith("vqclip generate: error"):
        assert len(err.strip().splitlines()) == 1
