"""The three MSDA flavours an exported graph can carry, each scoped to one export call.

- ``grid_sample``: the reference math; every level becomes one standard ONNX ``GridSample``.
- ``gather``: bilinear sampling written as index arithmetic, one ``Gather`` and one ``MatMul``
  per level, no ``GridSample`` (TensorRT releases since 10.14 miscompile GridSample-based
  deformable attention).
- ``trt_plugin``: one ``MultiscaleDeformableAttnPlugin_TRT`` node per call (TensorRT's plugin
  library), with int32 ``spatial_shapes`` / ``level_start_index`` in the plugin's input order.
- ``deform_conv``: one standard ONNX ``DeformConv`` (opset 19) per level, the fastest on onnxruntime
  CPU: the modulated deformable convolution samples every head's channels from one bilinear plan
  and applies the attention weights as its mask (:func:`msda_deform_conv`). Static sizes only: the
  sampling geometry becomes the node's pads.

The first two are plain PyTorch, so both exporters turn them into standard ONNX ops by
themselves. The plugin and DeformConv have no PyTorch equivalent here (torchvision is not a
dependency): each is a custom op, defined only while an export runs (:func:`flavour`), with a
TorchScript symbolic and an onnxscript translation for the dynamo exporter.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor

from m2f_deploy.errors import InputError
from m2f_deploy.modeling.layers import size_tensor
from m2f_deploy.modeling.ms_deform_attn import msda_grid_sample, msda_implementation
from m2f_deploy.utils import did_you_mean

FLAVOURS = ("grid_sample", "gather", "trt_plugin", "deform_conv")
STATIC_SIZE_FLAVOURS = ("deform_conv",)
MIN_OPSET = {"deform_conv": 19}  # DeformConv's first opset; the others need GridSample's 16 at most
PLUGIN_OP = "MultiscaleDeformableAttnPlugin_TRT"
PLUGIN_DOMAIN = "trt.plugins"
# The plugin's versions, same inputs and outputs: 1 (IPluginV2) in every TensorRT 10 and 11 (deprecated from 10.11),
# 2 (IPluginV3) from TensorRT 10.11. The default runs on JetPack 6 (TensorRT 10.3).
PLUGIN_VERSIONS = (1, 2)
DEFAULT_PLUGIN_VERSION = 1
_NAMESPACE, _OP = "m2f_deploy", "msda_trt_plugin"
_QUALNAME = f"{_NAMESPACE}::{_OP}"
_DEFORM_OP = "deform_sample"
_DEFORM_QUALNAME = f"{_NAMESPACE}::{_DEFORM_OP}"


def msda_gather(
    value: Tensor, spatial_shapes: Sequence[tuple], sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    """Bilinear sampling (zeros padding, ``align_corners=False``) as Gather + MatMul.

    value [N, S, M, D]; sampling_locations [N, Lq, M, L, P, 2]; attention_weights [N, Lq, M, L, P]
    -> [N, Lq, M*D]. Out-of-map taps get weight 0 and a harmless index.
    """
    n, s, m, d = value.shape
    lq = sampling_locations.shape[1]
    rows = value.permute(0, 2, 1, 3).reshape(-1, d)  # [N*M*S, D]; row (n*M + m)*S + position
    head_offset = (torch.arange(n * m, device=value.device) * s).view(n, 1, m, 1)
    out = None
    start = 0
    for level, (h, w) in enumerate(spatial_shapes):
        loc = sampling_locations[:, :, :, level]  # [N, Lq, M, P, 2]
        x = loc[..., 0] * w - 0.5
        y = loc[..., 1] * h - 0.5
        x0, y0 = x.floor(), y.floor()
        fx, fy = x - x0, y - y0
        taps_x = torch.stack([x0, x0 + 1, x0, x0 + 1], -1)  # [N, Lq, M, P, 4]
        taps_y = torch.stack([y0, y0, y0 + 1, y0 + 1], -1)
        bilinear = torch.stack([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy], -1)
        inside = (taps_x >= 0) & (taps_x <= w - 1) & (taps_y >= 0) & (taps_y <= h - 1)
        weight = bilinear * inside.to(bilinear.dtype) * attention_weights[:, :, :, level, :, None]
        index = torch.where(inside, taps_y * w + taps_x, torch.zeros_like(taps_x)).to(torch.int64)
        index = (index + start).flatten(-2) + head_offset  # [N, Lq, M, 4P]
        sampled = rows[index]  # [N, Lq, M, 4P, D]
        term = torch.matmul(weight.flatten(-2).unsqueeze(-2), sampled).squeeze(-2)  # [N, Lq, M, D]
        out = term if out is None else out + term
        start = start + h * w
    return out.reshape(n, lq, m * d)


def _plugin_eager(value: Tensor, shapes: Tensor, starts: Tensor, locations: Tensor, weights: Tensor) -> Tensor:
    n, lq, m = locations.shape[:3]
    out = msda_grid_sample(value, [tuple(hw) for hw in shapes.tolist()], locations, weights)
    return out.view(n, lq, m, value.shape[-1])


def _plugin_fake(value: Tensor, shapes: Tensor, starts: Tensor, locations: Tensor, weights: Tensor) -> Tensor:
    n, lq, m = locations.shape[:3]
    return value.new_empty((n, lq, m, value.shape[-1]))


def _plugin_symbolic(version: int):
    def symbolic(g, value, shapes, starts, locations, weights):
        out = g.op(
            f"{PLUGIN_DOMAIN}::{PLUGIN_OP}", value, shapes, starts, locations, weights,
            plugin_version_s=str(version), plugin_namespace_s="",
        )  # fmt: skip
        out.setType(value.type())
        return out

    return symbolic


def _plugin_schema():
    from onnx import defs

    param = defs.OpSchema.FormalParameter
    return defs.OpSchema(
        PLUGIN_OP, PLUGIN_DOMAIN, 1,
        inputs=[
            param("value", "T"), param("spatial_shapes", "I"), param("level_start_index", "I"),
            param("sampling_locations", "T"), param("attention_weights", "T"),
        ],
        outputs=[param("output", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], ""), ("I", ["tensor(int32)"], "")],
        attributes=[
            defs.OpSchema.Attribute("plugin_version", defs.OpSchema.AttrType.STRING, ""),
            defs.OpSchema.Attribute("plugin_namespace", defs.OpSchema.AttrType.STRING, ""),
        ],
    )  # fmt: skip


def _plugin_translation(version: int):
    def translation(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        """The dynamo exporter's translation of the custom op (the schema is registered meanwhile)."""
        import onnxscript

        plugins = onnxscript.values.Opset(PLUGIN_DOMAIN, 1)
        return getattr(plugins, PLUGIN_OP)(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
            plugin_version=str(version), plugin_namespace="",
        )  # fmt: skip

    return translation


def msda_trt_plugin(
    value: Tensor, spatial_shapes: Sequence[tuple], sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    """One plugin node; eager execution (tracing, checks) runs the reference math."""
    n, lq, m = sampling_locations.shape[:3]
    as_int32 = torch.empty(0, dtype=torch.int32, device=value.device)
    shapes = size_tensor([s for hw in spatial_shapes for s in hw], as_int32).view(-1, 2)
    starts = [0]
    for h, w in spatial_shapes[:-1]:
        starts.append(starts[-1] + h * w)
    out = getattr(getattr(torch.ops, _NAMESPACE), _OP)(
        value, shapes, size_tensor(starts, as_int32), sampling_locations, attention_weights
    )
    return out.reshape(n, lq, m * value.shape[-1])


@contextmanager
def _plugin_op(opset: int, version: int) -> Iterator[dict]:
    """Define the plugin custom op and its symbolic (plugin ``version``) for the duration of one export."""
    lib = torch.library.Library(_NAMESPACE, "FRAGMENT")
    lib.define(
        f"{_OP}(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
        "Tensor sampling_locations, Tensor attention_weights) -> Tensor"
    )
    lib.impl(_OP, _plugin_eager, "CompositeExplicitAutograd")
    lib.impl(_OP, _plugin_fake, "Meta")
    torch.onnx.register_custom_op_symbolic(_QUALNAME, _plugin_symbolic(version), opset)
    from onnx import defs

    registered = not defs.has(PLUGIN_OP, PLUGIN_DOMAIN)
    if registered:  # onnxscript builds nodes only for ops with a schema
        defs.register_schema(_plugin_schema())
    try:
        yield {getattr(getattr(torch.ops, _NAMESPACE), _OP).default: _plugin_translation(version)}
    finally:
        if registered:
            defs.deregister_schema(PLUGIN_OP, 1, PLUGIN_DOMAIN)
        torch.onnx.unregister_custom_op_symbolic(_QUALNAME, opset)
        lib._destroy()


def sampling_canvas(num_queries: int, spatial_shapes: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The DeformConv output grid (OH, OW) that holds ``num_queries`` queries, at least as large as every level.

    The queries sit on a near-square grid centred on each level by the pads, so that the base positions the
    convolution adds back to the offsets stay small (|base| <~ 64 px): along a 1 x S row they would reach S,
    and the float32 round trip ``(location - base) + base`` would lose ~1e-4 px at S = 3024. A grid that the
    queries fill exactly (OH * OW = queries, sides within 2x of each other) is preferred: the graph then pads
    no query and slices none off (3024 queries: 54 x 56).
    """
    least_h, least_w = max(h for h, _ in spatial_shapes), max(w for _, w in spatial_shapes)
    side = max(math.isqrt(num_queries - 1) + 1, least_h)
    for oh in range(side, least_h - 1, -1):
        ow = num_queries // oh
        if oh * ow == num_queries and ow >= least_w and max(oh, ow) <= 2 * min(oh, ow):
            return oh, ow
    return side, max(-(-num_queries // side), least_w)


def _deform_geometry(h: int, w: int, oh: int, ow: int, points: int) -> tuple[int, int, list[int]]:
    """How an (h, w) level map gives an (oh, ow) DeformConv output, kernel 1 x P: (extra rows, extra columns, pads
    [top, left, bottom, right]).

    TensorRT imports DeformConv only with equal begin and end pads per axis. Where the margin is odd, the map gets
    one zero row (column) at its far end and the pads are equal: bilinear sampling reads zeros there anyway, and
    the begin pads, which the base positions follow, are those of the odd margin rounded down. The same numbers.
    """
    extra_h, extra_w = (oh - h) % 2, (ow - w + points - 1) % 2
    top, left = (oh - h - extra_h) // 2, (ow - w - extra_w + points - 1) // 2
    return extra_h, extra_w, [top, left, top, left]


def _base_positions(oh: int, ow: int, points: int, pads: Sequence[int], dtype: torch.dtype) -> Tensor:
    """[P, 2 (y, x), OH*OW]: where DeformConv puts tap ``k`` of output ``o`` before adding the offsets."""
    o = torch.arange(oh * ow)
    y = (o // ow - pads[0]).expand(points, -1)
    x = o % ow - pads[1] + torch.arange(points)[:, None]
    return torch.stack([y, x], 1).to(dtype)


def msda_deform_conv(
    value: Tensor, spatial_shapes: Sequence[tuple], sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    """MSDA as one modulated ``DeformConv`` per level: kernel 1 x P (one tap per sampling point), weights 1,
    ``group`` = channels (each channel its own sum), ``offset_group`` = heads (a head's channels share the
    offsets), the attention weights as the modulation mask.

    Output position ``o`` of the (OH, OW) canvas is query ``o``; its tap ``k`` sits at the base position
    ``(oy - top, ox - left + k)``, and the offsets move it to the sampling location in pixels, ``loc * size -
    0.5`` (``align_corners=False``). DeformConv's bilinear sampling reads zeros outside the map, as
    ``grid_sample(padding_mode="zeros")`` does. Sizes must be static (they become the pads).
    """
    m, d = int(value.shape[2]), int(value.shape[3])  # static: they become attributes and constant shapes
    shapes = [(int(h), int(w)) for h, w in spatial_shapes]
    lq, points = int(sampling_locations.shape[1]), int(sampling_locations.shape[4])
    oh, ow = sampling_canvas(lq, shapes)
    extra = oh * ow - lq
    levels = len(shapes)
    # [N, Lq, M, L, P, 2 (x, y)] -> [N, L, M, P, 2 (y, x), OH*OW], padded queries get weight 0. Two transposes
    # (queries last, then whole blocks of them) cost onnxruntime a tenth of the one 6-D permutation.
    locations = sampling_locations.reshape(-1, lq, m * levels * points * 2).transpose(1, 2)
    locations = locations.reshape(-1, m, levels, points, 2, lq).transpose(1, 2).flip(4)
    weights = attention_weights.reshape(-1, lq, m * levels * points).transpose(1, 2)
    weights = weights.reshape(-1, m, levels, points, lq).transpose(1, 2)  # [N, L, M, P, OH*OW]
    if extra:
        locations, weights = F.pad(locations, (0, extra)), F.pad(weights, (0, extra))
    out = None
    start = 0
    for level, (h, w) in enumerate(shapes):
        extra_h, extra_w, pads = _deform_geometry(h, w, oh, ow, points)
        base = _base_positions(oh, ow, points, pads, value.dtype)
        to_pixels = torch.tensor([[h], [w]], dtype=value.dtype)  # (y, x) rows
        offsets = locations[:, level] * to_pixels - (base + 0.5)  # [N, M, P, 2, OH*OW]
        maps = value[:, start : start + h * w].reshape(-1, h, w, m * d).permute(0, 3, 1, 2)
        if extra_h or extra_w:
            maps = F.pad(maps, (0, extra_w, 0, extra_h))
        sampled = deform_sample(
            maps, offsets.reshape(-1, m * points * 2, oh, ow), weights[:, level].reshape(-1, m * points, oh, ow),
            pads, m,
        )  # fmt: skip
        out = sampled if out is None else out + sampled
        start += h * w
    out = out.flatten(2)
    return (out[:, :, :lq] if extra else out).transpose(1, 2)


def deform_sample(maps: Tensor, offsets: Tensor, mask: Tensor, pads: list[int], offset_group: int) -> Tensor:
    """ONNX ``DeformConv`` with unit weights, kernel 1 x P, one group per channel (the custom op during export).

    maps [N, C, h, w]; offsets [N, G*P*2, OH, OW] ((dy, dx) per group and tap); mask [N, G*P, OH, OW]
    -> [N, C, OH, OW]: per channel, the mask-weighted sum of its P bilinear taps. C and P are passed on as
    integers: the symbolic cannot always read them off the traced shapes.
    """
    channels, points = int(maps.shape[1]), int(mask.shape[1]) // offset_group
    return getattr(getattr(torch.ops, _NAMESPACE), _DEFORM_OP)(maps, offsets, mask, pads, offset_group, channels,
                                                               points)  # fmt: skip


def _deform_eager(
    maps: Tensor, offsets: Tensor, mask: Tensor, pads: list[int], offset_group: int, channels: int, points: int
) -> Tensor:
    """DeformConv's math through ``grid_sample`` (tracing runs it; tests compare it with onnxruntime's kernel)."""
    n, c, h, w = maps.shape
    oh, ow = offsets.shape[-2:]
    g = offset_group
    positions = offsets.reshape(n, g, points, 2, oh * ow) + _base_positions(oh, ow, points, pads, maps.dtype)
    y, x = positions[:, :, :, 0], positions[:, :, :, 1]  # [N, G, P, OH*OW], pixels
    grid = torch.stack([(2 * x + 1) / w - 1, (2 * y + 1) / h - 1], -1).transpose(2, 3)  # [N, G, OH*OW, P, 2]
    sampled = F.grid_sample(
        maps.reshape(n * g, c // g, h, w), grid.reshape(n * g, oh * ow, points, 2),
        mode="bilinear", padding_mode="zeros", align_corners=False,
    )  # fmt: skip  [N*G, C/G, OH*OW, P]
    weights = mask.reshape(n * g, 1, points, oh * ow).transpose(2, 3)
    return (sampled * weights).sum(-1).reshape(n, c, oh, ow)


def _deform_fake(
    maps: Tensor, offsets: Tensor, mask: Tensor, pads: list[int], offset_group: int, channels: int, points: int
) -> Tensor:
    return maps.new_empty((maps.shape[0], maps.shape[1], *offsets.shape[-2:]))


def _deform_attributes(channels: int, points: int, pads: Sequence[int], offset_group: int) -> dict:
    return {"kernel_shape": [1, points], "strides": [1, 1], "dilations": [1, 1], "pads": list(pads),
            "group": channels, "offset_group": offset_group}  # fmt: skip


def _deform_symbolic(g, maps, offsets, mask, pads, offset_group, channels, points):
    from torch.onnx import symbolic_helper

    pads = symbolic_helper._maybe_get_const(pads, "is")
    offset_group, channels, points = (
        symbolic_helper._maybe_get_const(v, "i") for v in (offset_group, channels, points)
    )
    attrs = _deform_attributes(channels, points, pads, offset_group)
    out = g.op(
        "DeformConv", maps, g.op("Constant", value_t=torch.ones(channels, 1, 1, points)), offsets,
        g.op("Constant", value_t=torch.zeros(channels)), mask,
        **{f"{k}_i": v for k, v in attrs.items()},
    )  # fmt: skip
    out.setType(maps.type().with_sizes([None, channels, None, None]))
    return out


def _deform_translation(maps, offsets, mask, pads, offset_group, channels, points):
    """The dynamo exporter's translation: ONNX DeformConv (opset 19)."""
    import numpy as np
    from onnxscript import opset19 as op

    weight = op.Constant(value=np.ones((channels, 1, 1, points), np.float32))
    bias = op.Constant(value=np.zeros((channels,), np.float32))
    return op.DeformConv(maps, weight, offsets, bias, mask, **_deform_attributes(channels, points, pads, offset_group))


@contextmanager
def _deform_op(opset: int) -> Iterator[dict]:
    """Define the DeformConv custom op and its symbolic for the duration of one export."""
    lib = torch.library.Library(_NAMESPACE, "FRAGMENT")
    lib.define(f"{_DEFORM_OP}(Tensor maps, Tensor offsets, Tensor mask, int[] pads, int offset_group, int channels, "
               "int points) -> Tensor")  # fmt: skip
    lib.impl(_DEFORM_OP, _deform_eager, "CompositeExplicitAutograd")
    lib.impl(_DEFORM_OP, _deform_fake, "Meta")
    torch.onnx.register_custom_op_symbolic(_DEFORM_QUALNAME, _deform_symbolic, opset)
    try:
        yield {getattr(getattr(torch.ops, _NAMESPACE), _DEFORM_OP).default: _deform_translation}
    finally:
        torch.onnx.unregister_custom_op_symbolic(_DEFORM_QUALNAME, opset)
        lib._destroy()


def check_flavour(name: str) -> None:
    if name not in FLAVOURS:
        raise InputError(f"unknown MSDA flavour {name!r}{did_you_mean(name, FLAVOURS)}; choose one of {', '.join(FLAVOURS)}")


def check_plugin_version(version: int) -> None:
    if version not in PLUGIN_VERSIONS:
        raise InputError(f"TensorRT plugin version {version!r}: {PLUGIN_OP} has versions 1 (TensorRT 10 and 11; "
                         "the default, for JetPack 6's 10.3) and 2 (TensorRT >= 10.11)")  # fmt: skip


@contextmanager
def flavour(name: str, opset: int, plugin_version: int = DEFAULT_PLUGIN_VERSION) -> Iterator[dict]:
    """Swap the model's MSDA for ``name`` inside the block; yields the dynamo translation table.
    ``plugin_version``: the ``MultiscaleDeformableAttnPlugin_TRT`` version the ``trt_plugin`` nodes ask for."""
    check_flavour(name)
    check_plugin_version(plugin_version)
    with ExitStack() as stack:
        table: dict = {}
        if name == "trt_plugin":
            table = stack.enter_context(_plugin_op(opset, plugin_version))
        elif name == "deform_conv":
            table = stack.enter_context(_deform_op(opset))
        impl = {"grid_sample": msda_grid_sample, "gather": msda_gather, "trt_plugin": msda_trt_plugin,
                "deform_conv": msda_deform_conv}[name]  # fmt: skip
        stack.enter_context(msda_implementation(impl))
        yield table
