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


def size_tensor(sizes: list, like: torch.Tensor) -> torch.Tensor:
    """A 1-D tensor of sizes (ints in eager mode, 0-d tensors while tracing), like ``like``.

    ``torch.tensor`` of traced sizes would bake them in as constants; stacking keeps them live.
    """
    if any(isinstance(s, torch.Tensor) for s in sizes):
        return torch.stack([s if isinstance(s, torch.Tensor) else torch.tensor(s) for s in sizes]).to(like)
    return torch.tensor(sizes, dtype=like.dtype, device=like.device)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, scale=None):
    """softmax(q k^T * scale + mask) v over [..., L, d] tensors.

    ``mask`` is additive (float) or boolean (True = may attend). Eager mode uses PyTorch's fused
    kernel; a captured graph gets the plain MatMul/Softmax/MatMul, which every exporter and
    runtime understands (the fused op's decomposition breaks torch.export on some shapes).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if not tracing():
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    scores = torch.matmul(q * scale, k.transpose(-1, -2))
    if mask is not None:
        if mask.dtype == torch.bool:
            # An additive 0 / -inf mask of the mask's own shape, then a broadcasting Add: the same numbers as
            # masked_fill, but onnxruntime's Where broadcast over the heads axis is ~15x slower than its Add.
            mask = torch.where(mask, 0.0, float("-inf")).to(scores.dtype)
        scores = scores + mask
    return torch.matmul(scores.softmax(-1), v)


def activation(name: str) -> nn.Module:
    """The activations Mask2Former configs use; the config validates the name."""
    return {"relu": nn.ReLU, "gelu": nn.GELU}[name]()
