"""The masked-attention transformer decoder (queries -> masked cross-attn -> self-attn -> FFN)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from m2f_deploy.config import Mask2FormerConfig
from m2f_deploy.modeling.heads import MaskPredictor, attention_mask, mask_logits
from m2f_deploy.modeling.layers import activation, attention
from m2f_deploy.modeling.pixel_decoder import NUM_LEVELS
from m2f_deploy.modeling.position_encoding import SinePositionEmbedding


def _heads(x: Tensor, num_heads: int) -> Tensor:
    """[B, L, C] -> [B, heads, L, C/heads]."""
    b, n, c = x.shape
    return x.view(b, n, num_heads, c // num_heads).transpose(1, 2)


def _merge_heads(x: Tensor) -> Tensor:
    """[B, heads, L, d] -> [B, L, heads*d]."""
    b, m, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, m * d)


class SelfAttention(nn.Module):
    """Query self-attention; the position embedding is added to queries and keys, not values."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, pos: Tensor) -> Tensor:
        qk = x + pos
        q, k, v = (_heads(t, self.num_heads) for t in (self.q_proj(qk), self.k_proj(qk), self.v_proj(x)))
        return self.out_proj(_merge_heads(attention(q, k, v)))


class MaskedCrossAttention(nn.Module):
    """``nn.MultiheadAttention``'s parameters (packed in-projection) with a boolean attention mask."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.zeros(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, mask: Tensor) -> Tensor:
        """query: [B, Q, C]; key, value: [B, HW, C]; mask: [B, Q, HW] bool, True = may not attend."""
        wq, wk, wv = self.in_proj_weight.chunk(3)
        bq, bk, bv = self.in_proj_bias.chunk(3)
        q = _heads(F.linear(query, wq, bq), self.num_heads)
        k = _heads(F.linear(key, wk, bk), self.num_heads)
        v = _heads(F.linear(value, wv, bv), self.num_heads)
        out = attention(q, k, v, ~mask[:, None])
        return self.out_proj(_merge_heads(out))


class MaskedAttentionDecoderLayer(nn.Module):
    """One decoder block: masked cross-attention to one pixel-decoder level, self-attention among the queries, a
    feed-forward; post-norm (or pre-norm with ``pre_norm``). [B, Q, C] -> [B, Q, C]."""

    def __init__(self, config: Mask2FormerConfig):
        super().__init__()
        dim = config.hidden_dim
        self.pre_norm = config.pre_norm
        self.cross_attn = MaskedCrossAttention(dim, config.num_attention_heads)
        self.cross_attn_layer_norm = nn.LayerNorm(dim)
        self.self_attn = SelfAttention(dim, config.num_attention_heads)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, config.dim_feedforward)
        self.act = activation(config.activation_function)
        self.fc2 = nn.Linear(config.dim_feedforward, dim)
        self.final_layer_norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, query_pos: Tensor, memory: Tensor, memory_pos: Tensor, mask: Tensor) -> Tensor:
        """x, query_pos: [B, Q, C]; memory, memory_pos: [B, HW, C]; mask: [B, Q, HW]."""
        cross = lambda t: self.cross_attn(t + query_pos, memory + memory_pos, memory, mask)  # noqa: E731
        ffn = lambda t: self.fc2(self.act(self.fc1(t)))  # noqa: E731
        if self.pre_norm:
            x = x + cross(self.cross_attn_layer_norm(x))
            x = x + self.self_attn(self.self_attn_layer_norm(x), query_pos)
            return x + ffn(self.final_layer_norm(x))
        x = self.cross_attn_layer_norm(x + cross(x))
        x = self.self_attn_layer_norm(x + self.self_attn(x, query_pos))
        return self.final_layer_norm(x + ffn(x))


class MaskedAttentionDecoder(nn.Module):
    """The ``decoder_layers - 1`` blocks, the shared final LayerNorm and the mask head; run by
    :class:`TransformerModule`, which holds the round-robin loop."""

    def __init__(self, config: Mask2FormerConfig):
        super().__init__()
        self.layers = nn.ModuleList(MaskedAttentionDecoderLayer(config) for _ in range(config.decoder_layers - 1))
        self.layernorm = nn.LayerNorm(config.hidden_dim)
        self.mask_predictor = MaskPredictor(config.hidden_dim, config.mask_feature_size)


class TransformerModule(nn.Module):
    """Learned queries refined over the three pixel-decoder levels, round robin (32, 16, 8, 32, ...).

    ``low_res_attention_masks`` (off by default; the exporter turns it on): when no auxiliary logits are asked
    for, the masks of the earlier layers serve only as the next layer's attention mask, at that layer's level
    size. Bilinear resizing is linear, so resizing the mask features first and then taking the product gives
    the same logits as transformers' product at H/4 x W/4 followed by the resize, up to float rounding, at a
    fraction of the cost (on Swin-T at 384x384: 9 products of 100 x 256 x 9216 become products over 144, 576
    and 2304 positions). Rounding can move a logit within ~1e-6 of 0 across the threshold, which is why the
    reference (eager) model keeps transformers' order.
    """

    def __init__(self, config: Mask2FormerConfig):
        super().__init__()
        dim = config.hidden_dim
        self.position_embedder = SinePositionEmbedding(dim // 2)
        self.queries_embedder = nn.Embedding(config.num_queries, dim)
        self.queries_features = nn.Embedding(config.num_queries, dim)
        project = config.feature_size != dim or config.enforce_input_projection
        self.input_projections = nn.ModuleList(
            nn.Conv2d(config.feature_size, dim, kernel_size=1) if project else nn.Identity() for _ in range(NUM_LEVELS)
        )
        self.decoder = MaskedAttentionDecoder(config)
        self.level_embed = nn.Embedding(NUM_LEVELS, dim)
        self.low_res_attention_masks = False

    def forward(
        self, multi_scale_features: list[Tensor], mask_features: Tensor, auxiliary: bool = False
    ) -> tuple[list[Tensor], list[Tensor]]:
        """multi_scale_features: three [B, C, h_l, w_l], coarsest first; mask_features: [B, C', H/4, W/4].

        Returns the per-layer query states (after the final LayerNorm) and mask logits
        [B, Q, H/4, W/4]: only the last of each unless ``auxiliary``.
        """
        memories, memory_pos, sizes = [], [], []
        for i, feat in enumerate(multi_scale_features):
            sizes.append(tuple(feat.shape[-2:]))
            memory_pos.append(self.position_embedder(feat).flatten(2).transpose(1, 2))
            level = self.input_projections[i](feat).flatten(2) + self.level_embed.weight[i][None, :, None]
            memories.append(level.transpose(1, 2))

        b = mask_features.shape[0]
        query_pos = self.queries_embedder.weight[None].expand(b, -1, -1)
        x = self.queries_features.weight[None].expand(b, -1, -1)
        decoder = self.decoder
        num_layers = len(decoder.layers)
        low_res = self.low_res_attention_masks and not auxiliary
        if low_res:  # the mask features at each level's size, once
            level_features = [
                F.interpolate(mask_features, size=size, mode="bilinear", align_corners=False) for size in sizes
            ]

        def predict(state: Tensor, next_layer: int) -> tuple[Tensor | None, Tensor | None]:
            """Mask logits after a layer (None where only the attention mask is needed) and the next mask."""
            if next_layer >= num_layers:
                return decoder.mask_predictor(state, mask_features)[0], None
            level = next_layer % NUM_LEVELS
            if low_res:
                return None, attention_mask(mask_logits(decoder.mask_predictor.embed(state), level_features[level]))
            return decoder.mask_predictor(state, mask_features, sizes[level])

        states = [decoder.layernorm(x)]
        masks, attn_mask = predict(states[-1], 0)
        mask_logits_per_layer = [masks]
        for i, layer in enumerate(decoder.layers):
            # A query whose mask is empty at this level attends everywhere instead of nowhere.
            attn_mask = attn_mask & ~attn_mask.all(-1, keepdim=True)
            x = layer(x, query_pos, memories[i % NUM_LEVELS], memory_pos[i % NUM_LEVELS], attn_mask)
            states.append(decoder.layernorm(x))
            masks, attn_mask = predict(states[-1], i + 1)
            mask_logits_per_layer.append(masks)
        if not auxiliary:
            return states[-1:], mask_logits_per_layer[-1:]
        return states, mask_logits_per_layer
