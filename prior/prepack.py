"""Linear layers that multiply by a once-reordered copy of their weight while decoding on a CPU.

A KV-cached decoding step multiplies a few rows (the batch) by every weight matrix of the prior, and on a CPU
those products take most of the step. oneDNN can reorder a weight once into the layout its product wants for a
given number of rows and then reuse it; at the few rows of decoding that is markedly faster than `F.linear`
(see "Prior decoding" in benchmarks/RESULTS.md). `prepacked(model, rows)` does that for the duration of a
`with` block. The products are the same up to float32 rounding. Where this torch has no oneDNN, or the model
is not a float32 model on the CPU, it does nothing.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn


def reordered_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def reorder(weight: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows)


_switched_off = False


@contextmanager
def switched_off() -> Iterator[None]:
    """Within the block, `prepacked` does nothing: to compare against the plain products."""
    global _switched_off
    before, _switched_off = _switched_off, True
    try:
        yield
    finally:
        _switched_off = before


@functools.cache
def available() -> bool:
    """Whether this torch multiplies by a reordered weight exactly as `F.linear` does (checked once)."""
    if not torch.backends.mkldnn.is_available():
        return False
    generator = torch.Generator().manual_seed(0)
    x, weight, bias = (torch.randn(*shape, generator=generator) for shape in ((3, 8), (5, 8), (5,)))
    try:
        out = reordered_linear(x, reorder(weight, 3), bias)
    except (AttributeError, RuntimeError):  # the ops are missing or refuse these tensors
        return False
    return torch.allclose(out, F.linear(x, weight, bias), rtol=1e-5, atol=1e-6)


class Linear(nn.Linear):
    """`nn.Linear`, which inside `prepacked(...)` multiplies by its reordered weight."""

    packed: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return super().forward(x)
        return reordered_linear(x, self.packed, self.bias)


@contextmanager
def prepacked(model: nn.Module, rows: int) -> Iterator[None]:
    """Within the block, every `Linear` of `model` uses a copy of its weight reordered for inputs of `rows` rows
    (any row count still works). Meant for inference: the copies do not follow changes to the weights."""
    layers = [m for m in model.modules() if isinstance(m, Linear)]
    float32_on_cpu = all(m.weight.device.type == "cpu" and m.weight.dtype == torch.float32 for m in layers)
    usable = float32_on_cpu and not _switched_off and available()
    if usable:
        for layer in layers:
            layer.packed = reorder(layer.weight, rows)
    try:
        yield
    finally:
        for layer in layers:
            layer.packed = None
