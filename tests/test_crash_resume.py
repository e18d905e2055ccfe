"""A training run killed with SIGKILL at a random moment resumes from its newest complete checkpoint and ends
with the same weights as an uninterrupted run."""

import json
import os
import random
import signal
import subprocess
import time

import pytest
import torch

from common.training import list_checkpoints
from corpora.shapes import build
from tests.launch import LAUNCH_ENV, ROOT, accelerate_launch, launch_command, weights

pytestmark = pytest.mark.slow


def _args(data, out):
    return [
        "--train_data_dir", str(data), "--resolution", "16", "--output_dir", str(out), "--preset", "tiny",
        "--max_train_steps", "10", "--train_batch_size", "8", "--checkpointing_steps", "2", "--validation_steps", "100",
        "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--seed", "1", "--logging_steps", "1",
        "--resume_from_checkpoint", "latest",
    ]  # fmt: skip


def _logged_steps(out):
    path = out / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.is_file() else []


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    data = tmp_path / "data"
    build(data, 120, resolution=16, seed=0, workers=1, progress=False)
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    accelerate_launch("vqvae.train", _args(data, straight))

    kill_after = random.SystemRandom().randint(3, 8)  # a different moment on every run; it must not matter
    proc = subprocess.Popen(
        launch_command("vqvae.train", _args(data, crashed)), cwd=ROOT, env=LAUNCH_ENV, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and (max(_logged_steps(crashed), default=0) < kill_after):
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    complete = list_checkpoints(crashed)
    assert complete and int(complete[-1].name.split("-")[1]) < 10, f"not interrupted (kill after step {kill_after})"
    # a checkpoint half-written when the process died must never be picked up
    half = crashed / "checkpoints" / ".tmp-checkpoint-999"
    half.mkdir(exist_ok=True)
    (half / "trainer_state.json").write_text("{")

    out = accelerate_launch("vqvae.train", _args(data, crashed))
    assert f"at step {complete[-1].name.split('-')[1]}" in out
    assert _logged_steps(crashed) == list(range(1, 11))  # each step logged once: no gap, no repeat
    a, b = weights(straight), weights(crashed)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), f"killed after step {kill_after}"
