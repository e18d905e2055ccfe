"""Small helpers shared by the tests."""

import hashlib
from pathlib import Path


def folder_digest(folder: Path) -> str:
    """SHA-256 over every file's relative path and bytes: equal digests mean byte-identical folders."""
    h = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        h.update(str(path.relative_to(folder)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()
