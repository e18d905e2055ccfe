"""Run a training module through `accelerate launch` in a subprocess, as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

from common.net import free_port

ROOT = Path(__file__).resolve().parents[1]


def launch_command(
    module: str, args: list[str], num_processes: int = 1, as_module: bool = True, config_file: Path | None = None
) -> list[str]:
    """The `accelerate launch` command line for a module (or a script path) on CPU processes, with a launch config
    (e.g. recipes/accelerate/fsdp.yaml) when given."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes)]
    if config_file is not None:
        launcher += ["--config_file", str(config_file)]
    else:
        launcher += ["--multi_gpu"] if num_processes > 1 else ["--cpu"]
    if num_processes > 1:  # a port of its own, so that launches of tests run side by side never meet
        launcher += ["--main_process_port", str(free_port())]
    launcher += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    return [*launcher, *(["-m", module] if as_module else [module]), *args]


LAUNCH_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def accelerate_launch(
    module: str,
    args: list[str],
    num_processes: int = 1,
    timeout: int = 300,
    as_module: bool = True,
    config_file: Path | None = None,
) -> str:
    """Run `accelerate launch -m module args` (or a script path); return its output, failing the test on error."""
    result = subprocess.run(
        launch_command(module, args, num_processes, as_module, config_file),
        cwd=ROOT, env=LAUNCH_ENV, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{module} failed:\n{output[-4000:]}"
    return output


def weights(directory: Path) -> dict:
    return load_file(Path(directory) / "model.safetensors")
