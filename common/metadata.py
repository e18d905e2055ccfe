"""The `metadata.jsonl` format of image folders; kept free of heavy imports so corpus workers start fast."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

METADATA_NAME = "metadata.jsonl"


def write_metadata(folder: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Write `metadata.jsonl`: one JSON object per row, keys sorted."""
    lines = "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows)
    (Path(folder) / METADATA_NAME).write_text(lines, encoding="utf-8")
