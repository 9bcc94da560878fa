"""Sine position embeddings (DETR style, normalised), computed from a feature map's shape."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class SinePositionEmbedding(nn.Module):
    """``[1, 2 * num_pos_feats, H, W]`` sine/cosine embeddings of the (y, x) pixel position.

    Matches transformers' ``Mask2FormerSinePositionEmbedding(normalize=True)`` with no mask:
    positions 1..H (1..W) are scaled to (0, 2 pi] before the sinusoids. Every image of a batch has
    the same embedding, so it is computed once and broadcast: with a dynamic batch axis and a static
    size, the exported graph then folds it into a constant instead of recomputing it per run.
    """

    def __init__(self, num_pos_feats: int, temperature: int = 10000, scale: float = 2 * math.pi):
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, C, H, W] (only its shape, dtype and device are used)."""
        _, _, height, width = x.shape
        dtype, device = x.dtype, x.device
        y_embed = torch.arange(1, height + 1, dtype=dtype, device=device)[None, :, None].expand(1, height, width)
        x_embed = torch.arange(1, width + 1, dtype=dtype, device=device)[None, None, :].expand(1, height, width)
        eps = 1e-6
        y_embed = y_embed / (y_embed[:, -1:, :] + eps) * self.scale
        x_embed = x_embed / (x_embed[:, :, -1:] + eps) * self.scale

        dim_t = torch.arange(self.num_pos_feats, dtype=torch.int64, device=device).to(dtype)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats)

        pos_x = x_embed[:, :, :, None] / dim_t
        pos_y = y_embed[:, :, :, None] / dim_t
        pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)
