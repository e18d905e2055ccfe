"""Run a training module through `accelerate launch` in a subprocess, as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


def accelerate_launch(
    module: str, args: list[str], num_processes: int = 1, timeout: int = 300, as_module: bool = True
) -> str:
    """Run `accelerate launch -m module args` (or a script path); return its output, failing the test on error."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes)]
    launcher += ["--multi_gpu"] if num_processes > 1 else ["--cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [*launcher, "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         *(["-m", module] if as_module else [module]), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{module} failed:\n{output[-4000:]}"
    return output


def weights(directory: Path) -> dict:
    return load_file(Path(directory) / "model.safetensors")
