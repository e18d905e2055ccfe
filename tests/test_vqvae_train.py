import json

import pytest
import torch

from corpora.shapes import build
from tests.launch import accelerate_launch, weights
from vqvae.model import VQVAE


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
