"""Small helpers shared by the tests."""

import hashlib
from pathlib import Path

import torch


def folder_digest(folder: Path) -> str:
    """SHA-256 over every file's relative path and bytes: equal digests mean byte-identical folders."""
    h = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        h.update(str(path.relative_to(folder)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def mean_log_probability(prior, codes: torch.Tensor, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) each code grid's mean log-probability under the prior's conditional model, from one teacher-forced
    forward pass: the reference for what `generate` accumulates step by step."""
    with torch.no_grad():
        logits, _ = prior(codes, features, text_mask=mask, drop=torch.zeros(len(codes), dtype=torch.bool))
    return logits.log_softmax(-1).gather(-1, codes.flatten(1)[..., None]).squeeze(-1).mean(1)
