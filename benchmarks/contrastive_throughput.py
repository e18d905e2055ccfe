"""Contrastive training speed through `contrastive.train` against the pure step of its model (the ceiling).

    python benchmarks/contrastive_throughput.py --data data/shapes

The `base` preset at batch 64 on 2 threads by default; `benchmarks/throughput.py --stage contrastive` with the
same flags (see there). Ends with one JSON line.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from throughput import main  # noqa: E402

if __name__ == "__main__":
    main(stage_name="contrastive")
