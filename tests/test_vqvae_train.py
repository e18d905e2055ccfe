import json

import pytest
import torch

from common.training import run_script
from corpora.shapes import build
from tests.launch import accelerate_launch, weights
from vqvae.model import VQVAE
from vqvae.train import main, model_config, parse_args


@pytest.fixture(scope="module")
def shapes16(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shapes16")
    build(folder, 120, resolution=16, seed=0, workers=1, progress=False)
    return folder


def _args(data, out, steps, batch=8, *extra):
    return [
        "--train_data_dir", str(data), "--resolution", "16", "--output_dir", str(out), "--preset", "tiny",
        "--max_train_steps", str(steps), "--train_batch_size", str(batch), "--checkpointing_steps", "2",
        "--validation_steps", "2", "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--seed", "1",
        "--logging_steps", "1", *extra,
    ]  # fmt: skip


def _close(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    return all(torch.allclose(wa[k], wb[k], atol=1e-5, rtol=1e-4) for k in wa)


def test_train_checkpoint_resume_continues_exactly(shapes16, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    accelerate_launch("vqvae.train", _args(shapes16, straight, 4))
    accelerate_launch("vqvae.train", _args(shapes16, resumed, 2))
    out = accelerate_launch("vqvae.train", _args(shapes16, resumed, 4, 8, "--resume_from_checkpoint", "latest"))
    assert "at step 2" in out
    state = json.loads((resumed / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["step"] == 4
    steps = [json.loads(line)["step"] for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert steps[-2:] == [3, 4]
    assert _close(straight, resumed)
    # the outputs a user looks at
    evaluation = json.loads((resumed / "eval.json").read_text())
    assert {"psnr", "ssim", "usage", "perplexity", "dead_codes"} <= evaluation.keys()
    assert 0 < evaluation["usage"] <= 1
    assert (resumed / "reconstruction.png").is_file() and (resumed / "samples" / "reconstruction-000004.png").is_file()
    model = VQVAE.from_pretrained(resumed)
    assert model.encode(torch.zeros(1, 3, 16, 16)).shape == (1, 8, 8)


def test_two_processes_match_one_with_the_doubled_batch(shapes16, tmp_path):
    # A large epsilon keeps Adam from blowing float-summation noise in near-zero gradients up to lr size.
    one, two = tmp_path / "one", tmp_path / "two"
    eps = ("--adam_epsilon", "1e-3")
    accelerate_launch("vqvae.train", _args(shapes16, one, 3, 8, *eps))
    accelerate_launch("vqvae.train", _args(shapes16, two, 2, 4, *eps), num_processes=2)
    resume = ("--resume_from_checkpoint", "latest", *eps)
    accelerate_launch("vqvae.train", _args(shapes16, two, 3, 4, *resume), num_processes=2)
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-3"]
    assert {p.name for p in (two / "checkpoints" / "checkpoint-3").glob("rng-*.safetensors")} == {
        "rng-0.safetensors",
        "rng-1.safetensors",
    }
    assert _close(one, two)
    # only the main process writes: each step is logged once, and one final model and grid exist
    logged = [json.loads(line)["step"] for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3]
    assert sorted(p.name for p in (two / "samples").iterdir()) == [
        "reconstruction-000002.png",
        "reconstruction-000003.png",
    ]


def _config(*flags):
    return model_config(parse_args(["--train_data_dir", "data", "--output_dir", "out", *flags]))


def test_a_resolution_that_misses_the_presets_grid_is_refused_at_start(tmp_path, capsys):
    refused = r"--resolution 256 gives preset f4 a 64 x 64 code grid \(4096 codes a picture\), but f4 is made for 64 px"
    with pytest.raises(ValueError, match=refused + r".* take --preset f8-256 \(32 x 32\) or f16-256 \(16 x 16\)"):
        _config("--preset", "f4", "--resolution", "256")
    with pytest.raises(ValueError, match="For 128 px take --preset f8-128"):
        _config("--preset", "f16-256", "--resolution", "128")
    with pytest.raises(ValueError, match="No preset is for 96 px"):
        _config("--preset", "f4", "--resolution", "96")
    assert _config("--preset", "f16-256", "--resolution", "256").grid_size == 16
    assert _config("--preset", "f8-128", "--resolution", "128").grid_size == 16
    assert _config("--preset", "f4", "--model_config", '{"codebook_size": 64}').grid_size == 16
    # saying so keeps the grid
    assert _config("--preset", "f4", "--resolution", "256", "--model_config", '{"resolution": 256}').grid_size == 64
    # the command prints one line and exits 2, before reading any data
    with pytest.raises(SystemExit) as exit_code:
        run_script(lambda: main(["--train_data_dir", str(tmp_path / "none"), "--output_dir", str(tmp_path / "out"),
                                 "--preset", "f4", "--resolution", "256"]), "vqvae.train")  # fmt: skip
    assert exit_code.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vqvae.train: error: --resolution 256 gives preset f4") and "\n" not in err
