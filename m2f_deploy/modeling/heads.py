"""Prediction heads: the mask head (MLP -> per-pixel dot product) and the class head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def mlp(dim: int, out_dim: int, num_layers: int = 3) -> nn.Sequential:
    """Linear+ReLU blocks, the last without ReLU; keys ``{i}.0.weight`` as in the checkpoints."""
    blocks = []
    for i in range(num_layers):
        last = i == num_layers - 1
        blocks.append(nn.Sequential(nn.Linear(dim, out_dim if last else dim), nn.Identity() if last else nn.ReLU()))
    return nn.Sequential(*blocks)


class MaskPredictor(nn.Module):
    """Mask head: a 3-layer MLP embeds each query [B, Q, C] -> [B, Q, C'], whose dot product with the mask features
    [B, C', H, W] gives the mask logits [B, Q, H, W]."""

    def __init__(self, hidden_dim: int, mask_feature_size: int):
        super().__init__()
        self.mask_embedder = mlp(hidden_dim, mask_feature_size)

    def embed(self, queries: Tensor) -> Tensor:
        """[B, Q, C] query states (after the decoder's LayerNorm) -> [B, Q, C'] mask embeddings."""
        return self.mask_embedder(queries)

    def forward(
        self, queries: Tensor, mask_features: Tensor, attention_size: tuple | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """queries: [B, Q, C] (after the decoder's LayerNorm); mask_features: [B, C', H, W].

        Returns mask logits [B, Q, H, W] and, when ``attention_size`` (h, w) is given, the
        masked-attention mask for the next layer: [B, Q, h*w] bool, True where the query may NOT
        attend (its mask, resized to h x w, has probability < 0.5 there).
        """
        masks = mask_logits(self.embed(queries), mask_features)
        if attention_size is None:
            return masks, None
        resized = F.interpolate(masks, size=attention_size, mode="bilinear", align_corners=False)
        return masks, attention_mask(resized)


def mask_logits(embeddings: Tensor, features: Tensor) -> Tensor:
    """einsum("bqc,bchw->bqhw") written as one batched MatMul (onnxruntime's Einsum is ~2x slower)."""
    b, c, h, w = features.shape
    return torch.matmul(embeddings, features.reshape(b, c, h * w)).view(b, -1, h, w)


def attention_mask(logits: Tensor) -> Tensor:
    """[B, Q, h, w] mask logits -> [B, Q, h*w] bool, True where the query may NOT attend."""
    return logits.sigmoid().flatten(2) < 0.5
