"""A training run killed with SIGKILL at a random moment resumes from its newest complete checkpoint and ends
with the same weights as an uninterrupted run, for each stage."""

import json
import os
import random
import signal
import subprocess
import time

import pytest
import torch

from common.data import DataConfig, load_image_text
from common.data.shards import write_shards
from common.training import list_checkpoints
from contrastive.model import PRESETS as CONTRASTIVE_PRESETS
from contrastive.model import ContrastiveModel
from corpora.shapes import build
from tests.launch import LAUNCH_ENV, ROOT, accelerate_launch, launch_command, weights
from vqvae.model import PRESETS as VQVAE_PRESETS
from vqvae.model import VQVAE

pytestmark = pytest.mark.slow
STEPS = 10


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """16 px shapes data and tiny frozen stages for the prior."""
    root = tmp_path_factory.mktemp("crash")
    build(root / "data", 120, resolution=16, seed=0, workers=1, progress=False)
    splits = load_image_text(DataConfig(train_data_dir=str(root / "data"), resolution=16), progress=False)
    write_shards(splits.train, root / "shards" / "train", 40, progress=False)
    write_shards(splits.validation, root / "shards" / "validation", 40, progress=False)
    torch.manual_seed(0)
    VQVAE(VQVAE_PRESETS["tiny"]).save_pretrained(root / "vqvae")
    ContrastiveModel(CONTRASTIVE_PRESETS["tiny"]).save_pretrained(root / "contrastive")
    return root


def _args(world, module, out, data):
    source = ["--train_data_dir", str(world / "data")]
    if data == "shards":  # read by two workers, each a stream of its own
        source = [
            "--train_shards",
            str(world / "shards" / "train"),
            "--validation_shards",
            str(world / "shards" / "validation"),
            "--shuffle_buffer",
            "16",
            "--dataloader_num_workers",
            "2",
        ]
    args = [
        *source, "--output_dir", str(out), "--preset", "tiny",
        "--max_train_steps", str(STEPS), "--train_batch_size", "8", "--checkpointing_steps", "2",
        "--validation_steps", "100", "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--seed", "1",
        "--logging_steps", "1", "--resume_from_checkpoint", "latest",
    ]  # fmt: skip
    if module == "prior.train":
        return [*args, "--vqvae", str(world / "vqvae"), "--contrastive", str(world / "contrastive"), "--eval_rows", "8"]
    return [*args, "--resolution", "16"]


def _logged_steps(out):
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    return [row["step"] for row in map(json.loads, path.read_text().splitlines()) if "loss" in row]


def _writing_a_checkpoint(out):
    """True while a checkpoint after the first complete one is being written."""
    folder = out / "checkpoints"
    return bool(list_checkpoints(out)) and any(p.name.startswith(".tmp-") for p in folder.iterdir())


@pytest.mark.parametrize(
    ("module", "moment", "data"),
    [("vqvae.train", "step", "folder"), ("vqvae.train", "checkpoint write", "folder"),
     ("contrastive.train", "step", "folder"), ("prior.train", "step", "folder"),
     ("vqvae.train", "step", "shards"), ("contrastive.train", "step", "shards"), ("prior.train", "step", "shards")],
)  # fmt: skip
def test_sigkill_then_resume_matches_an_uninterrupted_run(world, tmp_path, module, moment, data):
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    accelerate_launch(module, _args(world, module, straight, data))

    kill_after = random.SystemRandom().randint(3, 8)  # a different moment on every run; it must not matter

    def due() -> bool:
        if moment == "step":
            return max(_logged_steps(crashed), default=0) >= kill_after
        return _writing_a_checkpoint(crashed)

    proc = subprocess.Popen(
        launch_command(module, _args(world, module, crashed, data)), cwd=ROOT, env=LAUNCH_ENV, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not due():
        time.sleep(0.001)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    complete = list_checkpoints(crashed)
    last = int(complete[-1].name.split("-")[1]) if complete else 0
    assert 0 < last < STEPS, f"not interrupted mid-run ({moment}, kill after step {kill_after})"
    if moment == "checkpoint write":
        assert any(p.name.startswith(".tmp-") for p in (crashed / "checkpoints").iterdir()), "missed the write"
    else:  # a checkpoint half-written when the process died must never be picked up
        half = crashed / "checkpoints" / ".tmp-checkpoint-999"
        half.mkdir(exist_ok=True)
        (half / "trainer_state.json").write_text("{")

    out = accelerate_launch(module, _args(world, module, crashed, data))
    assert f"at step {last}" in out
    assert _logged_steps(crashed) == list(range(1, STEPS + 1))  # each step logged once: no gap, no repeat
    a, b = weights(straight), weights(crashed)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), f"{moment}: killed after step {kill_after}"
