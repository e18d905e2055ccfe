"""Why a row was skipped, and the count of skipped rows by reason that every source keeps."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


class Reason:
    """Why a row was skipped; CAPTION_TRUNCATED is counted for rows that are kept."""

    MISSING_IMAGE = "missing image"
    EMPTY_IMAGE = "empty image file"
    UNREADABLE_IMAGE = "unreadable image"
    TRUNCATED_IMAGE = "truncated image"
    IMAGE_TOO_LARGE = "image too large"
    IMAGE_TOO_SMALL = "image too small"
    MISSING_CAPTION = "missing caption"
    EMPTY_CAPTION = "empty caption"
    NON_STRING_CAPTION = "non-string caption"
    UNREADABLE_CAPTION = "unreadable caption"
    NON_UTF8_LINE = "non-UTF-8 metadata line"
    INVALID_JSON_LINE = "invalid JSON metadata line"
    UNREADABLE_SHARD = "unreadable shard"
    TRUNCATED_SHARD = "truncated shard"
    CAPTION_TRUNCATED = "caption truncated"


class BadImage(ValueError):
    """An image that cannot be used; `reason` is one of the `Reason` strings."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class SkipReport:
    """How many rows were kept, and how many were skipped for each reason."""

    kept: int = 0
    counts: Counter[str] = field(default_factory=Counter)  # by Reason, including CAPTION_TRUNCATED

    @property
    def skipped(self) -> Counter[str]:
        """Skipped rows by reason (`counts` without CAPTION_TRUNCATED, which counts kept rows)."""
        return Counter({r: n for r, n in self.counts.items() if r != Reason.CAPTION_TRUNCATED and n})

    @property
    def total(self) -> int:
        return self.kept + self.skipped.total()

    def __str__(self) -> str:
        line = f"kept {self.kept} of {self.total} rows"
        skipped = sorted(self.skipped.items(), key=lambda item: (-item[1], item[0]))
        if skipped:
            line += "; skipped " + ", ".join(f"{n} {reason}" for reason, n in skipped)
        if self.counts[Reason.CAPTION_TRUNCATED]:
            line += f"; {self.counts[Reason.CAPTION_TRUNCATED]} {Reason.CAPTION_TRUNCATED}"
        return line
