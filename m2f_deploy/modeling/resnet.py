"""ResNet backbone (bottleneck blocks, four stages at strides 4-32), as Mask2Former's ResNet-50 / 101 use it.

Module names are transformers' ``ResNetBackbone`` names (``embedder.embedder.convolution``,
``encoder.stages.0.layers.0.layer.1.normalization``, ...), so that our ``state_dict`` keys are the keys of a Hugging
Face checkpoint. detectron2's ResNet (``STRIDE_IN_1X1: False``) puts a stage's stride in the 3x3 convolution of its
first block, which is transformers' ``downsample_in_bottleneck=False``; both are supported.

Batch norm is frozen (inference only) and folded: each convolution runs with ``weight * scale`` and the bias
``bias - running_mean * scale``, ``scale = gamma / sqrt(running_var + eps)``. The folded weights are computed from the
checkpoint's tensors inside ``forward``, so the state dict keeps the four batch-norm tensors under transformers' names
(what :func:`~m2f_deploy.checkpoints.save_checkpoint` writes back); while a graph is traced they are computed
outside it, so the graph holds one ``Conv`` with constant (folded) weights and bias per layer and no batch norm.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from m2f_deploy.config import ResNetConfig
from m2f_deploy.modeling.layers import activation, tracing

BN_EPS = 1e-5  # torch's BatchNorm2d default (transformers) and detectron2's FrozenBatchNorm2d


class FrozenBatchNorm2d(nn.Module):
    """Batch norm with fixed statistics: buffers ``weight``, ``bias``, ``running_mean``, ``running_var``
    (the names of torch's ``BatchNorm2d`` and of detectron2's ``FrozenBatchNorm2d``). Not run on its own:
    :class:`ResNetConvLayer` folds it into its convolution."""

    def __init__(self, channels: int, eps: float = BN_EPS):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(channels))
        self.register_buffer("bias", torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def scale_shift(self) -> tuple[Tensor, Tensor]:
        """The per-channel affine map equal to this norm at inference: y = x * scale + shift."""
        scale = self.weight * torch.rsqrt(self.running_var + self.eps)
        return scale, self.bias - self.running_mean * scale


class ResNetConvLayer(nn.Module):
    """Convolution (no bias) + frozen batch norm (+ activation), run as one folded convolution:
    [B, C_in, H, W] -> [B, C_out, H / stride, W / stride]."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 3, stride: int = 1, act: str | None = "relu"):
        super().__init__()
        self.convolution = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False)
        self.normalization = FrozenBatchNorm2d(c_out)
        self.activation = activation(act) if act else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        conv = self.convolution
        with torch.no_grad() if tracing() else contextlib.nullcontext():
            scale, shift = self.normalization.scale_shift()
            weight = conv.weight * scale.view(-1, 1, 1, 1)
        if tracing():  # folded here: the graph gets constants, not a product of constants to fold
            weight, shift = weight.detach(), shift.detach()
        return self.activation(F.conv2d(x, weight, shift, conv.stride, conv.padding))


class ResNetShortCut(ResNetConvLayer):
    """The projection shortcut of a stage's first block: 1x1 convolution (strided) + frozen batch norm."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__(c_in, c_out, kernel=1, stride=stride, act=None)


class ResNetBottleNeckLayer(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand, plus the shortcut, then the activation; the stride is in the 3x3
    convolution unless ``downsample_in_bottleneck`` (then in the first 1x1)."""

    def __init__(self, config: ResNetConfig, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        mid = c_out // 4
        in_1x1 = config.downsample_in_bottleneck
        self.shortcut = ResNetShortCut(c_in, c_out, stride) if c_in != c_out or stride != 1 else nn.Identity()
        self.layer = nn.Sequential(
            ResNetConvLayer(c_in, mid, 1, stride if in_1x1 else 1, config.hidden_act),
            ResNetConvLayer(mid, mid, 3, 1 if in_1x1 else stride, config.hidden_act),
            ResNetConvLayer(mid, c_out, 1, act=None),
        )
        self.activation = activation(config.hidden_act)

    def forward(self, x: Tensor) -> Tensor:
        return self.activation(self.layer(x) + self.shortcut(x))


class ResNetStage(nn.Module):
    """``depth`` bottleneck blocks; the first one changes the width and (but in stage 1) halves the size."""

    def __init__(self, config: ResNetConfig, c_in: int, c_out: int, stride: int, depth: int):
        super().__init__()
        self.layers = nn.Sequential(
            ResNetBottleNeckLayer(config, c_in, c_out, stride),
            *[ResNetBottleNeckLayer(config, c_out, c_out) for _ in range(depth - 1)],
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class ResNetEmbeddings(nn.Module):
    """The stem: 7x7 stride-2 convolution + frozen batch norm + activation, then a 3x3 stride-2 max pool."""

    def __init__(self, config: ResNetConfig):
        super().__init__()
        self.embedder = ResNetConvLayer(config.num_channels, config.embedding_size, 7, 2, config.hidden_act)
        self.pooler = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.pooler(self.embedder(pixel_values))


class ResNetEncoder(nn.Module):
    """The four stages (``stages``), run by :class:`ResNetBackbone`."""

    def __init__(self, config: ResNetConfig):
        super().__init__()
        widths = [config.embedding_size, *config.hidden_sizes]
        self.stages = nn.ModuleList(
            ResNetStage(config, widths[i], widths[i + 1], 1 if i == 0 else 2, depth)
            for i, depth in enumerate(config.depths)
        )


class ResNetBackbone(nn.Module):
    """transformers' ``ResNetBackbone`` with out_features stage1-4 (inference, frozen batch norm)."""

    def __init__(self, config: ResNetConfig):
        super().__init__()
        self.embedder = ResNetEmbeddings(config)
        self.encoder = ResNetEncoder(config)
        self.channels = config.stage_channels

    def forward(self, pixel_values: Tensor) -> list[Tensor]:
        """[B, 3, H, W] -> four feature maps [B, C_i, H/2^(i+2), W/2^(i+2)], i = 0..3 (sizes rounded up)."""
        x = self.embedder(pixel_values)
        features = []
        for stage in self.encoder.stages:
            x = stage(x)
            features.append(x)
        return features
