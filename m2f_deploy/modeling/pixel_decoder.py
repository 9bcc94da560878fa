"""Pixel decoder: deformable-attention encoder over the three coarse levels, then an FPN to stride 4.

transformers' ``Mask2FormerPixelDecoder`` with no padding mask (every pixel valid, so the
valid ratios are 1 and drop out of the reference points).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from m2f_deploy.config import Mask2FormerConfig
from m2f_deploy.modeling.layers import size_tensor
from m2f_deploy.modeling.ms_deform_attn import multi_scale_deformable_attention
from m2f_deploy.modeling.position_encoding import SinePositionEmbedding

NUM_LEVELS = 3  # transformer levels: strides 32, 16, 8
NUM_POINTS = 4  # sampling points per head and level


class DeformableSampler(nn.Module):
    """Sampling locations from reference points and offsets, then MSDA. No parameters.

    A module of its own so that every exported node of the sampling arithmetic carries its scope
    (``.../self_attn/sampler/...``): the fp16 converter keeps that scope in float32.
    """

    def forward(
        self,
        value: Tensor,
        offsets: Tensor,
        weights: Tensor,
        reference_points: Tensor,
        spatial_shapes: list[tuple],
        normalizer: Tensor,
    ) -> Tensor:
        """value [B, S, M, D]; offsets [B, S, M, L, P, 2]; weights [B, S, M, L, P] -> [B, S, M*D].

        reference_points [1, S, M, L, P, 2] and normalizer [M, L, P, 2] come expanded (:func:`sampling_geometry`),
        so that both operations broadcast only over leading axes: onnxruntime's broadcast over a trailing axis of
        2 is ~20x slower than a plain elementwise op. The numbers are transformers' (same division, same sum).
        """
        locations = reference_points + offsets / normalizer
        return multi_scale_deformable_attention(value, spatial_shapes, locations, weights)


class MultiscaleDeformableAttention(nn.Module):
    """Deformable attention over the three levels: per head, level and point a learned offset from each token's
    reference point and a softmax weight; sampled values are summed. [B, S, C] -> [B, S, C], S = tokens of all levels.
    """

    def __init__(self, dim: int, num_heads: int, num_levels: int = NUM_LEVELS, num_points: int = NUM_POINTS):
        super().__init__()
        self.num_heads, self.num_levels, self.num_points = num_heads, num_levels, num_points
        self.sampling_offsets = nn.Linear(dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        self.sampler = DeformableSampler()

    def forward(
        self, x: Tensor, pos: Tensor, reference_points: Tensor, spatial_shapes: list[tuple], normalizer: Tensor
    ) -> Tensor:
        """x, pos: [B, S, C]; reference_points, normalizer: from :func:`sampling_geometry`."""
        b, s, c = x.shape
        m, lv, p = self.num_heads, self.num_levels, self.num_points
        query = x + pos
        value = self.value_proj(x).view(b, s, m, c // m)
        offsets = self.sampling_offsets(query).view(b, s, m, lv, p, 2)
        weights = self.attention_weights(query).view(b, s, m, lv * p).softmax(-1).view(b, s, m, lv, p)
        return self.output_proj(self.sampler(value, offsets, weights, reference_points, spatial_shapes, normalizer))


class DeformableEncoderLayer(nn.Module):
    """Post-norm encoder block: deformable self-attention, then a ReLU feed-forward, each with a residual and
    LayerNorm. [B, S, C] -> [B, S, C]."""

    def __init__(self, config: Mask2FormerConfig):
        super().__init__()
        dim = config.feature_size
        self.self_attn = MultiscaleDeformableAttention(dim, config.num_attention_heads)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, config.encoder_feedforward_dim)
        self.fc2 = nn.Linear(config.encoder_feedforward_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, pos: Tensor, reference_points: Tensor, spatial_shapes, normalizer) -> Tensor:
        x = self.self_attn_layer_norm(x + self.self_attn(x, pos, reference_points, spatial_shapes, normalizer))
        return self.final_layer_norm(x + self.fc2(F.relu(self.fc1(x))))


class DeformableEncoder(nn.Module):
    """``encoder_layers`` :class:`DeformableEncoderLayer` blocks (``layers``), run by :class:`PixelDecoder`."""

    def __init__(self, config: Mask2FormerConfig):
        super().__init__()
        self.layers = nn.ModuleList(DeformableEncoderLayer(config) for _ in range(config.encoder_layers))


def reference_points(spatial_shapes: list[tuple], dtype: torch.dtype, device: torch.device) -> Tensor:
    """[1, S, 1, 2]: the (x, y) centre of every pixel of every level, normalised to (0, 1)."""
    points = []
    for h, w in spatial_shapes:
        ref_y = (torch.arange(h, dtype=dtype, device=device) + 0.5) / h
        ref_x = (torch.arange(w, dtype=dtype, device=device) + 0.5) / w
        ref_y, ref_x = torch.meshgrid(ref_y, ref_x, indexing="ij")
        points.append(torch.stack((ref_x.reshape(-1), ref_y.reshape(-1)), -1))
    return torch.cat(points, 0)[None, :, None, :]


def sampling_geometry(
    reference_points: Tensor, normalizer: Tensor, num_heads: int, num_points: int = NUM_POINTS
) -> tuple[Tensor, Tensor]:
    """Reference points [1, S, 1, 2] and normalizer [L, 2] (W, H) expanded to the sampling offsets' layout.

    -> reference points [1, S, M, L, P, 2] and normalizer [M, L, P, 2]; computed once for all encoder layers.
    """
    _, s, _, _ = reference_points.shape
    levels = normalizer.shape[0]
    ref = reference_points[:, :, None, :, None, :].expand(1, s, num_heads, levels, num_points, 2)
    return ref, normalizer[None, :, None, :].expand(num_heads, levels, num_points, 2)


def conv_gn(cin: int, cout: int, kernel: int, bias: bool, relu: bool = False) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=bias), nn.GroupNorm(32, cout)]
    return nn.Sequential(*layers, *([nn.ReLU()] if relu else []))


class PixelDecoder(nn.Module):
    """The backbone's four maps (finest first) -> mask features [B, C', H/4, W/4] and the three multi-scale
    features of the transformer decoder [B, C, H/32, W/32], [B, C, H/16, W/16], [B, C, H/8, W/8]: 1x1 projections,
    the deformable encoder over the three coarse levels, then an FPN (lateral 1x1, upsample, 3x3) down to stride 4.
    """

    def __init__(self, config: Mask2FormerConfig, feature_channels: list[int]):
        super().__init__()
        dim = config.feature_size
        self.position_embedding = SinePositionEmbedding(dim // 2)
        self.level_embed = nn.Parameter(torch.zeros(NUM_LEVELS, dim))
        # coarsest level first: stride 32, 16, 8
        self.input_projections = nn.ModuleList(
            conv_gn(c, dim, 1, bias=True) for c in feature_channels[-NUM_LEVELS:][::-1]
        )
        self.encoder = DeformableEncoder(config)
        self.mask_projection = nn.Conv2d(dim, config.mask_feature_size, kernel_size=1)
        self.num_fpn_levels = config.num_fpn_levels
        self.num_heads = config.num_attention_heads
        for i, c in enumerate(feature_channels[: self.num_fpn_levels]):
            self.add_module(f"adapter_{i + 1}", conv_gn(c, dim, 1, bias=False))
            self.add_module(f"layer_{i + 1}", conv_gn(dim, dim, 3, bias=False, relu=True))

    def forward(self, features: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """features: the backbone's four maps, finest first.

        Returns mask features [B, mask_dim, H/4, W/4] and the three multi-scale features
        [B, C, H/32, W/32], [B, C, H/16, W/16], [B, C, H/8, W/8] (coarsest first).
        """
        coarse = features[::-1][:NUM_LEVELS]
        embeds = [proj(x) for proj, x in zip(self.input_projections, coarse)]
        spatial_shapes = [tuple(e.shape[-2:]) for e in embeds]
        pos = torch.cat(
            [
                self.position_embedding(x).flatten(2).transpose(1, 2) + self.level_embed[i].view(1, 1, -1)
                for i, x in enumerate(coarse)
            ],
            1,
        )
        x = torch.cat([e.flatten(2).transpose(1, 2) for e in embeds], 1)
        ref = reference_points(spatial_shapes, x.dtype, x.device)
        normalizer = size_tensor([s for h, w in spatial_shapes for s in (w, h)], x).view(-1, 2)  # (W, H) per level
        ref, normalizer = sampling_geometry(ref, normalizer, self.num_heads)
        for layer in self.encoder.layers:
            x = layer(x, pos, ref, spatial_shapes, normalizer)

        b = x.shape[0]
        outputs = []
        start = 0
        for h, w in spatial_shapes:
            outputs.append(x[:, start : start + h * w].transpose(1, 2).reshape(b, -1, h, w))
            start = start + h * w
        for i in range(self.num_fpn_levels - 1, -1, -1):
            lateral = getattr(self, f"adapter_{i + 1}")(features[i])
            up = F.interpolate(outputs[-1], size=lateral.shape[-2:], mode="bilinear", align_corners=False)
            outputs.append(getattr(self, f"layer_{i + 1}")(lateral + up))
        return self.mask_projection(outputs[-1]), outputs[:NUM_LEVELS]
