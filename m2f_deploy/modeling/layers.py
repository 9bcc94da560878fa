"""Small building blocks shared by the model's parts."""

from __future__ import annotations

import torch
from torch import nn


def tracing() -> bool:
    """True while a graph is being captured (TorchScript tracing, torch.export / dynamo).

    Shape-dependent shortcuts (skipping a zero-size pad) are only taken in eager mode, so that a
    captured graph stays valid for every input size.
    """
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


def pad_amount(size, multiple: int):
    """How much to add to ``size`` to reach a multiple of ``multiple`` (an int, or a traced size)."""
    return (multiple - size % multiple) % multiple


def activation(name: str) -> nn.Module:
    """The activations Mask2Former configs use; the config validates the name."""
    return {"relu": nn.ReLU, "gelu": nn.GELU}[name]()
