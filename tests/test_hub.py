import json
import os
import pickle
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

from common.config import Config, ConfigError, added_field
from common.hub import (
    CONFIG_NAME,
    MAX_JSON_DEPTH,
    STORAGE_DTYPES,
    WEIGHTS_NAME,
    ModelLoadError,
    PretrainedModel,
    storage_dtype,
)


@dataclass
class TinyConfig(Config):
    width: int = 4
    depth: int = 2
    scale: float = 1.0
    name: str = "tiny"
    kernel: tuple[int, int] = (3, 3)
    limits = {"width": (1, 4096), "depth": (1, 64)}


class Tiny(PretrainedModel):
    config_class = TinyConfig

    def __init__(self, config: TinyConfig) -> None:
        super().__init__(config)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(config.width, config.width) for _ in range(config.depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x)) * self.config.scale
        return x


def test_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    model = Tiny(TinyConfig(width=8, depth=3, scale=0.5, kernel=(5, 1)))
    x = torch.randn(4, 8)
    model.save_pretrained(tmp_path / "m")
    loaded = Tiny.from_pretrained(tmp_path / "m")
    assert loaded.config == model.config
    assert torch.equal(loaded(x), model(x))
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    modes = {(tmp_path / "m" / name).stat().st_mode & 0o777 for name in (CONFIG_NAME, WEIGHTS_NAME)}
    assert len(modes) == 1  # both files get the umask's usual mode


def test_half_precision_save_is_half_the_size_and_loads_in_float32(tmp_path):
    torch.manual_seed(0)
    model = Tiny(TinyConfig(width=64, depth=2))
    with torch.no_grad():
        model.layers[0].bias[0] = 1e6  # too large for float16: that tensor stays float32
    model.save_pretrained(tmp_path / "full")
    model.save_pretrained(tmp_path / "half", dtype=torch.float16)
    from safetensors.torch import load_file

    stored = load_file(tmp_path / "half" / WEIGHTS_NAME)
    assert stored["layers.0.weight"].dtype == torch.float16 and stored["layers.0.bias"].dtype == torch.float32
    full_size, half_size = ((tmp_path / n / WEIGHTS_NAME).stat().st_size for n in ("full", "half"))
    assert half_size < 0.6 * full_size
    loaded = Tiny.from_pretrained(tmp_path / "half")
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    assert torch.equal(loaded.layers[0].bias, model.layers[0].bias)
    assert torch.equal(loaded.layers[1].weight, model.layers[1].weight.half().float())
    with pytest.raises(ValueError, match="floating-point"):
        model.save_pretrained(tmp_path / "int", dtype=torch.int8)
    assert [storage_dtype(name) for name in STORAGE_DTYPES] == [None, torch.float16, torch.bfloat16]
    with pytest.raises(ValueError, match="float16"):
        storage_dtype("int8")


def _edit_config(directory, **changes):
    path = directory / CONFIG_NAME
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"width": 16}, "layers.0.weight"),  # weights no longer fit the config
        ({"depth": 2}, "unexpected weight 'layers.2.bias'"),
        ({"colour": 3}, "unknown config field(s) ['colour']"),
        ({"width": "8"}, "'width'"),
        ({"scale": True}, "'scale'"),
        ({"kernel": [3]}, "'kernel'"),
        ({"width": 10**9}, "'width'"),
        ({"model_class": "Other"}, "holds a Other"),
    ],
)
def test_mismatch_names_the_offender(tmp_path, changes, message):
    Tiny(TinyConfig(width=8, depth=3)).save_pretrained(tmp_path / "m")
    _edit_config(tmp_path / "m", **changes)
    with pytest.raises(ModelLoadError) as err:
        Tiny.from_pretrained(tmp_path / "m")
    assert message in str(err.value)


def test_missing_field_is_refused(tmp_path):
    Tiny(TinyConfig()).save_pretrained(tmp_path / "m")
    data = json.loads((tmp_path / "m" / CONFIG_NAME).read_text())
    del data["depth"]
    (tmp_path / "m" / CONFIG_NAME).write_text(json.dumps(data))
    with pytest.raises(ModelLoadError, match=r"missing config field\(s\) \['depth'\]"):
        Tiny.from_pretrained(tmp_path / "m")


@dataclass
class GrownConfig(Config):
    width: int = 4
    gain: float = added_field(1.0)  # a field that saves made before it existed lack


def test_only_an_added_field_may_be_missing():
    assert GrownConfig.from_dict({"width": 3}) == GrownConfig(width=3, gain=1.0)
    assert GrownConfig.from_dict({"width": 3, "gain": 2}).gain == 2.0
    with pytest.raises(ConfigError, match=r"missing config field\(s\) \['width'\]"):
        GrownConfig.from_dict({"gain": 2.0})
    with pytest.raises(ConfigError, match="'gain'"):
        GrownConfig.from_dict({"width": 3, "gain": "loud"})


def test_config_limits_checked_on_construction():
    with pytest.raises(ConfigError, match="'depth'"):
        TinyConfig(depth=0)


def test_pickle_weights_are_never_loaded(tmp_path):
    directory = tmp_path / "m"
    Tiny(TinyConfig()).save_pretrained(directory)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    # a pickle posing as the weights file, and one beside a missing weights file
    (directory / WEIGHTS_NAME).write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ModelLoadError, match="not a valid safetensors file"):
        Tiny.from_pretrained(directory)
    (directory / WEIGHTS_NAME).unlink()
    (directory / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ModelLoadError, match="pickle files are never loaded"):
        Tiny.from_pretrained(directory)
    assert not marker.exists()


def test_saving_over_a_model_replaces_it_and_keeps_other_files(tmp_path):
    Tiny(TinyConfig(width=4)).save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "checkpoints").mkdir()
    Tiny(TinyConfig(width=6)).save_pretrained(tmp_path / "m")
    assert Tiny.from_pretrained(tmp_path / "m").config.width == 6
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["checkpoints", CONFIG_NAME, WEIGHTS_NAME]


def test_weights_and_config_from_different_saves_are_refused(tmp_path):
    Tiny(TinyConfig(width=4)).save_pretrained(tmp_path / "a")
    Tiny(TinyConfig(width=4)).save_pretrained(tmp_path / "b")
    (tmp_path / "b" / WEIGHTS_NAME).replace(tmp_path / "a" / WEIGHTS_NAME)
    with pytest.raises(ModelLoadError, match="come from different saves"):
        Tiny.from_pretrained(tmp_path / "a")


KILLED_WRITER = """
import os, sys, torch
import common.hub as hub
from tests.test_hub import Tiny, TinyConfig

real_save = hub.save_file
def save_then_die(state, path, metadata=None):
    real_save(state, path, metadata=metadata)
    with open(path, "r+b") as f:  # half-written file, then the process is killed
        f.truncate(os.path.getsize(path) // 2)
    os._exit(9)
hub.save_file = save_then_die
Tiny(TinyConfig(width=8)).save_pretrained(sys.argv[1])
"""


def test_killed_write_leaves_previous_model_intact(tmp_path):
    torch.manual_seed(0)
    old = Tiny(TinyConfig(width=4))
    old.save_pretrained(tmp_path / "m")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(
        [sys.executable, "-c", KILLED_WRITER, str(tmp_path / "m")], cwd=root, capture_output=True, check=False
    )
    assert result.returncode == 9, result.stderr.decode()
    loaded = Tiny.from_pretrained(tmp_path / "m")
    assert loaded.config.width == 4
    x = torch.randn(2, 4)
    assert torch.equal(loaded(x), old(x))


def test_not_a_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="is not a model directory"):
        Tiny.from_pretrained(tmp_path / "nothing")


def test_huge_or_broken_config_refused(tmp_path):
    Tiny(TinyConfig()).save_pretrained(tmp_path / "m")
    (tmp_path / "m" / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        Tiny.from_pretrained(tmp_path / "m")
    (tmp_path / "m" / CONFIG_NAME).write_text(" " * (2 << 20))
    with pytest.raises(ModelLoadError, match="refusing to read it"):
        Tiny.from_pretrained(tmp_path / "m")


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 200_000])  # the second is past Python's recursion limit
def test_deeply_nested_json_is_refused_naming_the_file(tmp_path, depth):
    Tiny(TinyConfig()).save_pretrained(tmp_path / "m")
    (tmp_path / "m" / CONFIG_NAME).write_text('{"width": ' + "[" * depth + "]" * depth + "}")
    with pytest.raises(ModelLoadError, match=rf"{CONFIG_NAME} nests JSON more than {MAX_JSON_DEPTH} levels"):
        Tiny.from_pretrained(tmp_path / "m")


def test_a_config_of_too_many_weights_is_refused_before_anything_is_allocated(tmp_path):
    from vqvae.model import VQVAE, VQVAEConfig

    directory = tmp_path / "vqvae"
    VQVAE(VQVAEConfig(base_channels=8, channel_mult=(1,), num_res_blocks=(0,), latent_channels=4)).save_pretrained(
        directory
    )
    # every field within its own limit; together, hundreds of billions of weights
    _edit_config(directory, base_channels=1024, channel_mult=[16] * 6, num_res_blocks=[8] * 6, latent_channels=1024)
    with pytest.raises(ModelLoadError, match=r"config.json: describes a model of [\d,]+ weights, more than"):
        VQVAE.from_pretrained(directory)


def _replace_weight(directory, key, value):
    """Rewrite one tensor of a saved model's weights, keeping the save's identity."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = directory / WEIGHTS_NAME
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata()
    state = load_file(path)
    state[key] = value(state[key])
    save_file(state, path, metadata=metadata)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (lambda w: w.index_fill(0, torch.tensor([1]), float("nan")), "holds NaN or infinite values"),
        (lambda w: w.index_fill(0, torch.tensor([0]), float("-inf")), "holds NaN or infinite values"),
        (lambda w: w.long(), "is torch.int64, the model expects torch.float32"),
        (lambda w: w > 0, "is torch.bool"),
        (lambda w: w.to(torch.complex64), "is torch.complex64"),
    ],
)
def test_non_finite_or_non_float_weights_are_refused_naming_the_tensor(tmp_path, value, message):
    Tiny(TinyConfig()).save_pretrained(tmp_path / "m")
    _replace_weight(tmp_path / "m", "layers.1.weight", value)
    with pytest.raises(ModelLoadError, match=rf"weight 'layers.1.weight' {message}"):
        Tiny.from_pretrained(tmp_path / "m")


def test_float16_and_float64_weights_still_load(tmp_path):
    Tiny(TinyConfig()).save_pretrained(tmp_path / "m")
    _replace_weight(tmp_path / "m", "layers.0.weight", lambda w: w.double())
    _replace_weight(tmp_path / "m", "layers.1.weight", lambda w: w.half())
    assert Tiny.from_pretrained(tmp_path / "m").layers[1].weight.dtype == torch.float32


@pytest.mark.parametrize("name", [CONFIG_NAME, WEIGHTS_NAME])
def test_a_file_symlinked_out_of_the_model_folder_is_refused(tmp_path, name):
    Tiny(TinyConfig()).save_pretrained(tmp_path / "m")
    (tmp_path / "m" / name).rename(tmp_path / name)
    (tmp_path / "m" / name).symlink_to(tmp_path / name)
    with pytest.raises(ModelLoadError, match=rf"{name} leads outside .*m \(to .*\); files of a model folder"):
        Tiny.from_pretrained(tmp_path / "m")
    (tmp_path / "m" / name).unlink()  # a link that stays inside is fine
    (tmp_path / name).rename(tmp_path / "m" / f"real-{name}")
    (tmp_path / "m" / name).symlink_to(f"real-{name}")
    assert Tiny.from_pretrained(tmp_path / "m").config == TinyConfig()


def test_a_symlinked_model_folder_loads(tmp_path):
    Tiny(TinyConfig()).save_pretrained(tmp_path / "m")
    (tmp_path / "link").symlink_to(tmp_path / "m")
    assert Tiny.from_pretrained(tmp_path / "link").config == TinyConfig()


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def test_saved_files_and_folders_get_the_umask_modes(tmp_path, umask_027):
    from common.hub import atomic_write_text, respect_umask

    atomic_write_text(tmp_path / "out" / "eval.json", "{}\n")
    assert (tmp_path / "out" / "eval.json").stat().st_mode & 0o777 == 0o640
    Tiny(TinyConfig()).save_pretrained(tmp_path / "m")
    assert {(tmp_path / "m" / name).stat().st_mode & 0o777 for name in (CONFIG_NAME, WEIGHTS_NAME)} == {0o640}
    import tempfile

    folder = tempfile.mkdtemp(dir=tmp_path)  # 0700, its files 0600
    os.close(tempfile.mkstemp(dir=folder)[0])
    respect_umask(folder)
    assert {p.stat().st_mode & 0o777 for p in (tmp_path.joinpath(folder), *tmp_path.joinpath(folder).iterdir())} == {
        0o750,
        0o640,
    }


def test_a_save_removes_what_killed_saves_left_and_only_that(tmp_path):
    Tiny(TinyConfig()).save_pretrained(tmp_path / "m")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    left = tmp_path / "m" / f".tmp-save-{int(dead.stdout)}-abc"  # a process that no longer runs
    running = tmp_path / "m" / f".tmp-save-{os.getpid()}-def"  # a save in progress
    for folder in (left, running):
        folder.mkdir()
        (folder / WEIGHTS_NAME).write_bytes(b"half")
    Tiny(TinyConfig()).save_pretrained(tmp_path / "m")
    assert not left.exists() and running.exists()
