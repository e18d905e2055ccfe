"""How long `vqclip` takes to answer before doing any work: --help of the command and of a few subcommands.

    python benchmarks/cli_startup.py [--repeats 3] [--root CHECKOUT]

Each command runs in a fresh interpreter; the figure is the median wall-clock time of --repeats runs. Prints one
JSON line: seconds per command line.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common.cli import ArgumentParser

COMMANDS = (["--help"], ["data", "shapes", "--help"], ["search", "--help"], ["generate", "--help"])


def startup_s(argv: list[str], repeats: int, root: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(root)}
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "app.cli", *argv], cwd=root, env=env, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs per command; the median is reported")
    parser.add_argument(
        "--root", type=Path, default=Path(__file__).resolve().parents[1], help="the checkout whose vqclip is timed"
    )
    args = parser.parse_args()
    times = {f"vqclip {' '.join(argv)}": round(startup_s(argv, args.repeats, args.root), 2) for argv in COMMANDS}
    print(json.dumps(times))


if __name__ == "__main__":
    main()
