"""benchmarks/gpu_suite.sh at tiny sizes on the CPU (DRY_RUN=1): every benchmark runs and prints one JSON line."""

import json
import os
import subprocess
import sys

import pytest

from tests.launch import ROOT

pytestmark = pytest.mark.slow


def test_the_gpu_suite_dry_run_prints_one_json_line_per_benchmark():
    env = {**os.environ, "DRY_RUN": "1", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        ["bash", "benchmarks/gpu_suite.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line.get("stage") for line in lines[:3]] == ["vqvae", "contrastive", "prior"]
    assert all(line["images_per_s"] > 0 and line["peak_mb"] > 0 for line in lines[:3])
    memory = lines[3]
    assert memory["benchmark"] == "train_memory" and memory["loss_rel_diff"] < 0.02
    assert 0 < memory["checkpointed_mb"] < memory["plain_mb"]  # checkpointing keeps fewer activations
    assert lines[4]["cached_s"] > 0 and set(lines[4]["s_per_image"]) == {"64", "256", "1024"}
    assert len(lines) == 5
