"""Swin Transformer backbone (shifted windows, relative position bias, patch merging).

Module names follow the checkpoint format on the Hub and written by transformers'
``save_pretrained`` (``attention.self.query``, ``intermediate.dense``, ``output.dense``, ...), so
that our ``state_dict`` keys are the file's keys and loading needs no renaming table.

Built for export: shape arithmetic uses the tensors' sizes (traced as graph values), padding
is unconditional while tracing, and there is no branching on tensor values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from m2f_deploy.config import SwinConfig
from m2f_deploy.modeling.layers import activation, attention, pad_amount, tracing


def window_partition(x: Tensor, ws: int) -> Tensor:
    """[B, H, W, C] -> [B * H/ws * W/ws, ws * ws, C] (H and W multiples of ws)."""
    b, h, w, c = x.shape
    x = x.view(b, h // ws, ws, w // ws, ws, c)
    return x.transpose(2, 3).reshape(-1, ws * ws, c)


def window_reverse(windows: Tensor, ws: int, h, w) -> Tensor:
    """[B * nW, ws * ws, C] -> [B, H, W, C]."""
    c = windows.shape[-1]
    x = windows.view(-1, h // ws, w // ws, ws, ws, c)
    return x.transpose(2, 3).reshape(-1, h, w, c)


class SwinPatchEmbeddings(nn.Module):
    """Non-overlapping patch projection: a ``patch_size``-strided Conv2d, [B, 3, H, W] -> [B, C, H/4, W/4]."""

    def __init__(self, config: SwinConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.projection = nn.Conv2d(
            config.num_channels, config.embed_dim, kernel_size=config.patch_size, stride=config.patch_size
        )

    def forward(self, pixel_values: Tensor) -> Tensor:
        """[B, 3, H, W] -> [B, C, H/4, W/4] (right/bottom zero padding to a multiple of the patch)."""
        h, w = pixel_values.shape[-2:]
        pad_w, pad_h = pad_amount(w, self.patch_size), pad_amount(h, self.patch_size)
        if tracing() or pad_w or pad_h:
            pixel_values = F.pad(pixel_values, (0, pad_w, 0, pad_h))
        return self.projection(pixel_values)


class SwinEmbeddings(nn.Module):
    """Patch embedding then LayerNorm: [B, 3, H, W] -> tokens [B, H/4 * W/4, C] and the patch grid (H/4, W/4)."""

    def __init__(self, config: SwinConfig):
        super().__init__()
        self.patch_embeddings = SwinPatchEmbeddings(config)
        self.norm = nn.LayerNorm(config.embed_dim)

    def forward(self, pixel_values: Tensor) -> tuple[Tensor, tuple]:
        """-> tokens [B, h*w, C] and the patch grid (h, w)."""
        x = self.patch_embeddings(pixel_values)
        h, w = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), (h, w)


def relative_position_index(ws: int) -> Tensor:
    """[ws*ws, ws*ws] index into the (2ws-1)^2 relative position bias table."""
    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)
    return rel[:, :, 0] * (2 * ws - 1) + rel[:, :, 1]


class SwinSelfAttention(nn.Module):
    """Multi-head self-attention within each window, with a learned relative position bias per head:
    [B*nW, N, C] -> [B*nW, N, C], N = window_size^2 tokens per window."""

    def __init__(self, config: SwinConfig, dim: int, num_heads: int):
        super().__init__()
        ws = config.window_size
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.query = nn.Linear(dim, dim, bias=config.qkv_bias)
        self.key = nn.Linear(dim, dim, bias=config.qkv_bias)
        self.value = nn.Linear(dim, dim, bias=config.qkv_bias)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * ws - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(ws).flatten(), persistent=False)
        self.window_area = ws * ws
        self.fused_qkv = False

    def forward(self, x: Tensor, shift_mask: Tensor | None) -> Tensor:
        """x: [B*nW, N, C] window tokens; shift_mask: [nW, N, N] (0 or -100) or None.

        With ``fused_qkv`` (the exporter turns it on), query, key and value are one product with the three
        weights stacked, split after one transpose: the same dot products, one layer instead of three (int8:
        one quantization of ``x`` and a product wide enough for onnxruntime's kernels).
        """
        bw, n, c = x.shape
        shape = (bw, n, self.num_heads, self.head_dim)
        if self.fused_qkv:
            layers = (self.query, self.key, self.value)
            bias = None if self.query.bias is None else torch.cat([layer.bias for layer in layers])
            qkv = F.linear(x, torch.cat([layer.weight for layer in layers]), bias)
            q, k, v = qkv.view(bw, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q = self.query(x).view(shape).transpose(1, 2)
            k = self.key(x).view(shape).transpose(1, 2)
            v = self.value(x).view(shape).transpose(1, 2)
        bias = self.relative_position_bias_table[self.relative_position_index]
        bias = bias.view(self.window_area, self.window_area, -1).permute(2, 0, 1).unsqueeze(0)  # [1, heads, N, N]
        if shift_mask is not None:
            num_windows = shift_mask.shape[0]
            mask = shift_mask[None, :, None].expand(bw // num_windows, -1, -1, -1, -1).reshape(-1, 1, n, n)
            bias = bias + mask  # [B*nW, heads, N, N]
        out = attention(q, k, v, bias, scale=self.head_dim**-0.5)
        return out.transpose(1, 2).reshape(bw, n, c)


class SwinSelfOutput(nn.Module):
    """The attention's output projection: [..., C] -> [..., C]."""

    def __init__(self, dim: int):
        super().__init__()
        self.dense = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.dense(x)


class SwinAttention(nn.Module):
    """Window attention and its output projection: [B*nW, N, C] -> [B*nW, N, C]."""

    def __init__(self, config: SwinConfig, dim: int, num_heads: int):
        super().__init__()
        self.self = SwinSelfAttention(config, dim, num_heads)
        self.output = SwinSelfOutput(dim)

    def forward(self, x: Tensor, shift_mask: Tensor | None) -> Tensor:
        return self.output(self.self(x, shift_mask))


class SwinIntermediate(nn.Module):
    """The feed-forward's first half: Linear to ``mlp_ratio`` x C, then the activation: [..., C] -> [..., r*C]."""

    def __init__(self, config: SwinConfig, dim: int):
        super().__init__()
        self.dense = nn.Linear(dim, int(config.mlp_ratio * dim))
        self.act = activation(config.hidden_act)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.dense(x))


class SwinOutput(nn.Module):
    """The feed-forward's second half: Linear back to C: [..., r*C] -> [..., C] (r = ``mlp_ratio``)."""

    def __init__(self, config: SwinConfig, dim: int):
        super().__init__()
        self.dense = nn.Linear(int(config.mlp_ratio * dim), dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.dense(x)


def shift_window_mask(hp, wp, ws: int, shift: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """[nW, ws*ws, ws*ws] additive mask (0 or -100) keeping shifted windows from mixing regions.

    Each position of the padded ``hp x wp`` map falls in one of 3 x 3 regions of the cyclic
    shift; two tokens of a window may attend to each other only within one region.
    """
    h_idx = torch.arange(hp, device=device)
    w_idx = torch.arange(wp, device=device)
    h_region = (h_idx >= hp - ws).long() + (h_idx >= hp - shift).long()
    w_region = (w_idx >= wp - ws).long() + (w_idx >= wp - shift).long()
    regions = (h_region[None, :, None, None] * 3 + w_region[None, None, :, None]).to(dtype)
    windows = window_partition(regions, ws).squeeze(-1)  # [nW, N]
    diff = windows[:, None, :] - windows[:, :, None]
    return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)


def window_tables(h: int, w: int, ws: int, shift: int) -> tuple[Tensor, Tensor]:
    """For a static ``h x w`` map: where each window token comes from, and where each map token goes.

    ``gather`` [nW * ws * ws]: for window token k (windows in :func:`window_partition` order, over the map padded
    to multiples of ``ws`` and rolled by ``-shift``), the map token it reads, or ``h * w`` (a zero token) for
    padding. ``scatter`` [h * w]: for map token t, the window token that holds it (the inverse, padding dropped).
    """
    hp, wp = h + pad_amount(h, ws), w + pad_amount(w, ws)
    rows = (torch.arange(hp) + shift) % hp  # rolled row i reads padded row (i + shift) mod hp
    cols = (torch.arange(wp) + shift) % wp
    source = torch.where((rows[:, None] < h) & (cols[None, :] < w), rows[:, None] * w + cols[None, :], h * w)
    gather = window_partition(source[None, :, :, None], ws).flatten()
    scatter = torch.empty(h * w, dtype=torch.long)
    taken = gather < h * w
    scatter[gather[taken]] = torch.arange(gather.numel())[taken]
    return gather, scatter


class SwinLayer(nn.Module):
    """One (shifted-)window transformer block.

    With ``static_windows`` (the exporter turns it on for a static input size), padding, cyclic shift and
    window partition are one ``Gather`` of the tokens through a constant table, and their inverse another
    (:func:`window_tables`): the same values, moved once instead of through Pad, Slice, Concat and Transpose.
    """

    def __init__(self, config: SwinConfig, dim: int, num_heads: int, shift: bool):
        super().__init__()
        self.window_size = config.window_size
        self.shift_size = config.window_size // 2 if shift else 0
        self.layernorm_before = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.attention = SwinAttention(config, dim, num_heads)
        self.layernorm_after = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.intermediate = SwinIntermediate(config, dim)
        self.output = SwinOutput(config, dim)
        self.static_windows = False

    def forward(self, x: Tensor, hw: tuple) -> Tensor:
        """x: [B, H*W, C] -> [B, H*W, C]."""
        h, w = hw
        normed = self.layernorm_before(x)
        if self.static_windows:
            x = x + self._gathered_window_attention(normed, int(h), int(w))
        else:
            x = x + self._window_attention(normed, h, w)
        return x + self.output(self.intermediate(self.layernorm_after(x)))

    def _window_attention(self, x: Tensor, h, w) -> Tensor:
        """Window attention of [B, h*w, C] tokens: pad, roll, partition, attend, and back."""
        b, _, c = x.shape
        ws, shift = self.window_size, self.shift_size
        x = x.view(b, h, w, c)
        pad_h, pad_w = pad_amount(h, ws), pad_amount(w, ws)
        if tracing() or pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        hp, wp = x.shape[1], x.shape[2]
        if shift:
            x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
        mask = shift_window_mask(hp, wp, ws, shift, x.dtype, x.device) if shift else None
        x = self.attention(window_partition(x, ws), mask)
        x = window_reverse(x, ws, hp, wp)
        if shift:
            x = torch.roll(x, shifts=(shift, shift), dims=(1, 2))
        if tracing() or pad_h or pad_w:
            x = x[:, :h, :w, :]
        return x.reshape(b, -1, c)

    def _gathered_window_attention(self, x: Tensor, h: int, w: int) -> Tensor:
        """:meth:`_window_attention` for a static h x w, through :func:`window_tables`."""
        ws, shift = self.window_size, self.shift_size
        gather, scatter = window_tables(h, w, ws, shift)
        c = x.shape[-1]
        tokens = torch.cat([x, x.new_zeros(1, 1, c).expand(x.shape[0], 1, c)], 1)  # the zero token: padding
        windows = tokens[:, gather.to(x.device)].reshape(-1, ws * ws, c)
        hp, wp = h + pad_amount(h, ws), w + pad_amount(w, ws)
        mask = shift_window_mask(hp, wp, ws, shift, x.dtype, x.device) if shift else None
        out = self.attention(windows, mask)
        return out.reshape(x.shape[0], -1, c)[:, scatter.to(x.device)]


class SwinPatchMerging(nn.Module):
    """2x2 neighbourhood concat + LayerNorm + linear: [B, H*W, C] -> [B, ceil(H/2)*ceil(W/2), 2C]."""

    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: Tensor, hw: tuple) -> Tensor:
        h, w = hw
        b, _, c = x.shape
        x = x.view(b, h, w, c)
        pad_h, pad_w = h % 2, w % 2
        if tracing() or pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x.view(b, -1, 4 * c)))


class SwinStage(nn.Module):
    """``depths[i]`` Swin blocks, windows alternately plain and shifted, then patch merging (all stages but the
    last): [B, H*W, C] -> ([B, H*W, C], [B, ceil(H/2)*ceil(W/2), 2C] or None)."""

    def __init__(self, config: SwinConfig, index: int):
        super().__init__()
        dim = config.stage_channels[index]
        self.blocks = nn.ModuleList(
            SwinLayer(config, dim, config.num_heads[index], shift=i % 2 == 1) for i in range(config.depths[index])
        )
        self.downsample = SwinPatchMerging(dim) if index < len(config.depths) - 1 else None

    def forward(self, x: Tensor, hw: tuple) -> tuple[Tensor, Tensor | None]:
        """-> (features before downsampling [B, H*W, C], downsampled tokens or None)."""
        for block in self.blocks:
            x = block(x, hw)
        return x, (self.downsample(x, hw) if self.downsample is not None else None)


class SwinEncoder(nn.Module):
    """The four stages (``layers``), run by :class:`SwinBackbone`, which norms each stage's output."""

    def __init__(self, config: SwinConfig):
        super().__init__()
        self.layers = nn.ModuleList(SwinStage(config, i) for i in range(len(config.depths)))


class SwinBackbone(nn.Module):
    """Swin with a LayerNorm on each of the four stage outputs (transformers' ``SwinBackbone``)."""

    def __init__(self, config: SwinConfig):
        super().__init__()
        self.embeddings = SwinEmbeddings(config)
        self.encoder = SwinEncoder(config)
        self.hidden_states_norms = nn.ModuleDict(
            {stage: nn.LayerNorm(c) for stage, c in zip(config.out_features, config.stage_channels)}
        )
        self.channels = config.stage_channels

    def forward(self, pixel_values: Tensor) -> list[Tensor]:
        """[B, 3, H, W] -> four feature maps [B, C_i, H/2^(i+2), W/2^(i+2)], i = 0..3."""
        x, (h, w) = self.embeddings(pixel_values)
        features = []
        for stage, norm in zip(self.encoder.layers, self.hidden_states_norms.values()):
            out, x = stage(x, (h, w))
            b, _, c = out.shape
            features.append(norm(out).view(b, h, w, c).permute(0, 3, 1, 2).contiguous())
            h, w = (h + 1) // 2, (w + 1) // 2
        return features
