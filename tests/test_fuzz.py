"""Arbitrary prompts and arguments: every call either works or raises a ValueError that says what is wrong;
the command line exits 0 or 2 with one readable line, never a traceback."""

import json
import math
import os
import re
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.cli import main
from common.hub import CONFIG_NAME, WEIGHTS_NAME, ModelLoadError
from contrastive.index import EMBEDDINGS_NAME, INDEX_NAME, ImageIndex, model_identity
from contrastive.model import PRESETS as CLIP_PRESETS
from contrastive.model import ContrastiveModel
from pipelines.text_to_image import PIPELINE_NAME, STAGES, TextToImagePipeline
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


# ---------------------------------------------------------------- the command line: checked before any work

# Every command that writes, with the flag naming its output and whether that is a file or a folder. The models
# and data named do not exist: a command that started its work before checking its output would fail on them.
WRITERS = {
    "generate": (["generate", "a ball", "--model", "{tmp}/none"], "--out", "file"),
    "search --grid": (["search", "a ball", "--index", "{tmp}/none"], "--grid", "file"),
    "assemble": (["assemble", "--vqvae", "{tmp}/a", "--contrastive", "{tmp}/b", "--prior", "{tmp}/c"], "--out",
                 "folder"),
    "reconstruct": (["reconstruct", "--model", "{tmp}/none", "{tmp}/x.png"], "--out", "folder"),
    "index build": (["index", "build", "--model", "{tmp}/none", "--images", "{tmp}/none"], "--out", "folder"),
    "index add": (["index", "add", "--images", "{tmp}/none"], "--index", "folder"),
    "eval": (["eval", "--model", "{tmp}/none", "--data", "{tmp}/none"], "--out", "folder"),
    "data shapes": (["data", "shapes"], "--out", "folder"),
    "data shards": (["data", "shards", "--from", "{tmp}/none"], "--out", "folder"),
    "demo": (["demo"], "--out", "folder"),
}  # fmt: skip
BAD_OUTPUTS = {  # where an output cannot go, and what the error says
    "file": [
        ("folder", "{tmp}/folder is a folder; give a file name"),
        ("file/out.png", "cannot be created: {tmp}/file is a file, not a folder"),
        ("read-only/out.png", "cannot be created: {tmp}/read-only is not writable"),
    ],
    "folder": [
        ("file", "{tmp}/file is a file, not a folder"),
        ("file/out", "cannot be created: {tmp}/file is a file, not a folder"),
        ("read-only", "{tmp}/read-only is not writable"),
        ("read-only/out", "cannot be created: {tmp}/read-only is not writable"),
    ],
}


PROGRESS_BAR = re.compile(r"\[\d\d:\d\d")  # tqdm's elapsed time


def _one_line_error(capsys, argv, command):
    """Run the command line; assert it stopped with status 2 and one line (after any progress bars) naming the
    command; return the line."""
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse
        code = exit_.code
    err = capsys.readouterr().err
    lines = [line for line in re.split(r"[\r\n]", err) if line.strip() and not PROGRESS_BAR.search(line)]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"vqclip {command.split()[0]}") and ": error: " in lines[0], err
    return lines[0]


@pytest.mark.parametrize(
    ("command", "target", "message"),
    [(command, *bad) for command, (_, _, kind) in sorted(WRITERS.items()) for bad in BAD_OUTPUTS[kind]],
)
def test_an_output_that_cannot_be_written_is_refused_first(tmp_path, capsys, monkeypatch, command, target, message):
    argv, flag, _ = WRITERS[command]
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("")
    (tmp_path / "read-only").mkdir()
    real_access = os.access
    monkeypatch.setattr(  # as for a user who may not write there (root may write anywhere)
        os, "access", lambda path, mode: real_access(path, mode) and not str(path).endswith("read-only")
    )
    argv = [a.format(tmp=tmp_path) for a in argv] + [flag, str(tmp_path / target)]
    err = _one_line_error(capsys, argv, command)
    assert f"argument {flag}: " in err and message.format(tmp=tmp_path) in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["generate", "x", "--model", "none", "--device", "bogus"], "argument --device: 'bogus' is not a device"),
        (["generate", "x", "--model", "none", "--device", "cuda"], "argument --device: cuda: this machine has no CUDA"),
        (["generate", "x", "--model", "none", "--seed", str(2**70)], "argument --seed: must be an integer from 0 to"),
        (["generate", "x", "--model", "none", "-n", "0"], "argument -n/--num-images: must be an integer from 1"),
        (["eval", "--model", "none", "--data", "none", "--num-prompts", "0"], "argument --num-prompts: must be"),
        (["eval", "--model", "none", "--data", "none", "--num-prompts", "-1"], "argument --num-prompts: must be"),
        (["search", "x", "--index", "none", "-k", "two"], "argument -k: expected an integer, got 'two'"),
        (["data", "shapes", "--out", "{tmp}/s", "--num-images", "0"], "argument --num-images: must be"),
    ],
)
def test_bad_flags_are_named_in_one_line(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    err = _one_line_error(capsys, [a.format(tmp=tmp_path) for a in argv], argv[0])
    assert message in err


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """Keep `datasets` off the network and out of the home cache."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("data/shapez", "data/shapez is neither an existing file or folder nor a dataset reachable on the Hub (it "
         "names no Hub dataset; is the path mistyped?)"),
        ("more_pictures/", "more_pictures/ is neither an existing file or folder nor a dataset reachable on the Hub"),
        ("./pictures", "./pictures is neither an existing file or folder"),
        ("more_pictures", "more_pictures is neither an existing file or folder nor a dataset reachable on the Hub "
         "(ConnectionError: "),
        ("garbage.jsonl", "garbage.jsonl cannot be read as json data: ArrowInvalid: JSON parse error"),
    ],
)  # fmt: skip
def test_a_missing_or_unreadable_data_source_says_so_in_one_line(tmp_path, capsys, monkeypatch, offline, spec, message):
    from common.data import DataConfig, load_image_text
    from vqvae.train import main as train_vqvae

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "garbage.jsonl").write_text('not json\n{"file_name": \n')
    with pytest.raises(ValueError, match=re.escape(message)):
        load_image_text(DataConfig(dataset_name=spec), progress=False)
    with pytest.raises(ValueError, match=re.escape(message)):
        train_vqvae(["--dataset_name", spec, "--output_dir", "out", "--preset", "tiny", "--resolution", "16"])
    ContrastiveModel(CLIP_PRESETS["tiny"]).save_pretrained(tmp_path / "clip")
    err = _one_line_error(capsys, ["index", "build", "--model", "clip", "--images", spec, "--out", "index"], "index")
    assert message in err


# ---------------------------------------------------------------- model, pipeline and index folders from anyone

# Any JSON value, nested up to past Python's recursion limit: a deep one is a marker that `_dump` writes as that
# many nested lists, as hypothesis's recursive strategies stay shallow.
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, 2, 3, 8, 16, 64, 4096, 10**9, -1, 0.5]), st.text(max_size=20),
)  # fmt: skip
json_values = st.one_of(
    st.recursive(
        scalars,
        lambda children: st.one_of(
            st.lists(children, max_size=5), st.dictionaries(st.text(max_size=8), children, max_size=4)
        ),
        max_leaves=20,
    ),
    st.integers(1, 5000).map(lambda depth: f"@@deep{depth}@@"),
)
FOLDER_FUZZ = settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)


def _write_json(path, value):
    """`value` as JSON, each deep marker of `json_values` written as lists nested that deep."""
    text = json.dumps(value)
    path.write_text(re.sub(r'"@@deep(\d+)@@"', lambda found: "[" * int(found[1]) + "]" * int(found[1]), text))


def _loads_or_names(path, load):
    """`load()` works, or raises a ModelLoadError (a ValueError) whose message names `path`."""
    try:
        load()
    except ModelLoadError as err:
        assert str(path) in str(err), err


@pytest.fixture(scope="module")
def saved(pipe, tmp_path_factory):
    """The pipeline, its three stages and an index, saved once."""
    root = tmp_path_factory.mktemp("saved")
    pipe.save_pretrained(root / "pipe")
    embeddings = torch.nn.functional.normalize(torch.randn(3, 8), dim=1)
    info = {"model_class": "Random", "config": {"embed_dim": 8}, "save_id": None, "dir": None}
    ImageIndex(embeddings, ["a", "b", "c"], ["x", "y", "z"], info).save(root / "index")
    return root


def _copy(saved, name, tmp_path_factory):
    target = tmp_path_factory.mktemp("case") / name
    shutil.copytree(saved / name, target, symlinks=True)
    return target


@FOLDER_FUZZ
@given(stage=st.sampled_from(["vqvae", "contrastive", "prior"]), data=st.data(), value=json_values)
def test_any_value_in_any_config_field(saved, tmp_path_factory, stage, data, value):
    folder = _copy(saved / "pipe", stage, tmp_path_factory)
    config = json.loads((folder / CONFIG_NAME).read_text())
    field = data.draw(st.sampled_from([*sorted(config), "unknown_field"]))
    config[field] = value
    _write_json(folder / CONFIG_NAME, config)
    _loads_or_names(folder / CONFIG_NAME, lambda: STAGES[stage].from_pretrained(folder))


@FOLDER_FUZZ
@given(value=json_values)
def test_any_config_file(saved, tmp_path_factory, value):
    folder = _copy(saved / "pipe", "prior", tmp_path_factory)
    _write_json(folder / CONFIG_NAME, value)
    _loads_or_names(folder / CONFIG_NAME, lambda: Prior.from_pretrained(folder))


def _pipeline_paths(spec):
    """Every place in pipeline.json a value can go: the whole file, each key, each stage's keys, a new key."""
    places = [(), ("extra",), ("stages", "extra"), ("sampling", "extra")]
    for key, value in spec.items():
        places.append((key,))
        for inner, entry in value.items():
            places.append((key, inner))
            if isinstance(entry, dict):
                places += [(key, inner, name) for name in [*entry, "extra"]]
    return places


@FOLDER_FUZZ
@given(data=st.data(), value=json_values)
def test_any_value_anywhere_in_pipeline_json(saved, tmp_path_factory, data, value):
    root = _copy(saved, "pipe", tmp_path_factory)
    spec = json.loads((root / PIPELINE_NAME).read_text())
    place = data.draw(st.sampled_from(_pipeline_paths(spec)))
    if place:
        parent = spec
        for key in place[:-1]:
            parent = parent[key]
        parent[place[-1]] = value
    _write_json(root / PIPELINE_NAME, spec if place else value)
    _loads_or_names(root, lambda: TextToImagePipeline.from_pretrained(root))


@FOLDER_FUZZ
@given(data=st.data(), value=json_values)
def test_any_value_in_any_index_json_field(saved, tmp_path_factory, data, value):
    folder = _copy(saved, "index", tmp_path_factory)
    meta = json.loads((folder / INDEX_NAME).read_text())
    field = data.draw(st.sampled_from([*sorted(meta), *[f"model.{k}" for k in meta["model"]], "extra"]))
    if field.startswith("model."):
        meta["model"][field.removeprefix("model.")] = value
    else:
        meta[field] = value
    _write_json(folder / INDEX_NAME, meta)
    _loads_or_names(folder / INDEX_NAME, lambda: ImageIndex.load(folder))


@FOLDER_FUZZ
@given(
    which=st.sampled_from(["pipe/vqvae", "pipe/prior", "index"]),
    header=st.one_of(
        st.binary(max_size=300),
        json_values.map(lambda value: json.dumps(value).encode()),
        st.dictionaries(
            st.sampled_from(["embeddings", "weight", "__metadata__", "code_embed.weight"]),
            st.fixed_dictionaries(
                {"dtype": st.sampled_from(["F32", "F16", "I64", "BOOL", "C64", "X", 3]),
                 "shape": st.lists(st.integers(-2, 2**40), max_size=3),
                 "data_offsets": st.lists(st.integers(-2, 2**40), min_size=0, max_size=3)}
            ),
            max_size=3,
        ).map(lambda value: json.dumps(value).encode()),
    ),
    length=st.one_of(st.none(), st.integers(0, 2**64 - 1)),
    tail=st.binary(max_size=64),
)  # fmt: skip
def test_any_bytes_in_a_safetensors_header(saved, tmp_path_factory, which, header, length, tail):
    folder = _copy(saved, which.split("/")[0], tmp_path_factory)
    folder = folder / which.split("/")[1] if "/" in which else folder
    path = folder / (EMBEDDINGS_NAME if which == "index" else WEIGHTS_NAME)
    size = len(header) if length is None else length
    path.write_bytes(size.to_bytes(8, "little") + header + tail)
    load = (
        (lambda: ImageIndex.load(folder)) if which == "index" else (lambda: STAGES[which[5:]].from_pretrained(folder))
    )
    _loads_or_names(path, load)
