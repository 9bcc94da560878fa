"""The three MSDA flavours an exported graph can carry, each scoped to one export call.

- ``grid_sample``: the reference math; every level becomes one standard ONNX ``GridSample``.
- ``gather``: bilinear sampling written as index arithmetic, one ``Gather`` and one ``MatMul``
  per level, no ``GridSample`` (TensorRT releases since 10.14 miscompile GridSample-based
  deformable attention).
- ``trt_plugin``: one ``MultiscaleDeformableAttnPlugin_TRT`` node per call (TensorRT's plugin
  library), with int32 ``spatial_shapes`` / ``level_start_index`` in the plugin's input order.

The first two are plain PyTorch, so both exporters turn them into standard ONNX ops by
themselves. The plugin has no PyTorch equivalent: it is a custom op, defined only while an export
runs (:func:`flavour`), with a TorchScript symbolic and an onnxscript translation for the dynamo
exporter.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager

import torch
from torch import Tensor

from m2f_deploy.errors import InputError
from m2f_deploy.modeling.layers import size_tensor
from m2f_deploy.modeling.ms_deform_attn import msda_grid_sample, msda_implementation
from m2f_deploy.utils import did_you_mean

FLAVOURS = ("grid_sample", "gather", "trt_plugin")
PLUGIN_OP = "MultiscaleDeformableAttnPlugin_TRT"
PLUGIN_DOMAIN = "trt.plugins"
_NAMESPACE, _OP = "m2f_deploy", "msda_trt_plugin"
_QUALNAME = f"{_NAMESPACE}::{_OP}"


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


def _plugin_symbolic(g, value, shapes, starts, locations, weights):
    out = g.op(
        f"{PLUGIN_DOMAIN}::{PLUGIN_OP}", value, shapes, starts, locations, weights,
        plugin_version_s="1", plugin_namespace_s="",
    )  # fmt: skip
    out.setType(value.type())
    return out


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


def _plugin_translation(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """The dynamo exporter's translation of the custom op (the schema is registered meanwhile)."""
    import onnxscript

    plugins = onnxscript.values.Opset(PLUGIN_DOMAIN, 1)
    return getattr(plugins, PLUGIN_OP)(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
        plugin_version="1", plugin_namespace="",
    )  # fmt: skip


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
def _plugin_op(opset: int) -> Iterator[dict]:
    """Define the plugin custom op and its symbolic for the duration of one export."""
    lib = torch.library.Library(_NAMESPACE, "FRAGMENT")
    lib.define(
        f"{_OP}(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
        "Tensor sampling_locations, Tensor attention_weights) -> Tensor"
    )
    lib.impl(_OP, _plugin_eager, "CompositeExplicitAutograd")
    lib.impl(_OP, _plugin_fake, "Meta")
    torch.onnx.register_custom_op_symbolic(_QUALNAME, _plugin_symbolic, opset)
    from onnx import defs

    registered = not defs.has(PLUGIN_OP, PLUGIN_DOMAIN)
    if registered:  # onnxscript builds nodes only for ops with a schema
        defs.register_schema(_plugin_schema())
    try:
        yield {getattr(getattr(torch.ops, _NAMESPACE), _OP).default: _plugin_translation}
    finally:
        if registered:
            defs.deregister_schema(PLUGIN_OP, 1, PLUGIN_DOMAIN)
        torch.onnx.unregister_custom_op_symbolic(_QUALNAME, opset)
        lib._destroy()


def check_flavour(name: str) -> None:
    if name not in FLAVOURS:
        raise InputError(f"unknown MSDA flavour {name!r}{did_you_mean(name, FLAVOURS)}; choose one of {', '.join(FLAVOURS)}")


@contextmanager
def flavour(name: str, opset: int) -> Iterator[dict]:
    """Swap the model's MSDA for ``name`` inside the block; yields the dynamo translation table."""
    check_flavour(name)
    with ExitStack() as stack:
        table: dict = {}
        if name == "trt_plugin":
            table = stack.enter_context(_plugin_op(opset))
        impl = {"grid_sample": msda_grid_sample, "gather": msda_gather, "trt_plugin": msda_trt_plugin}[name]
        stack.enter_context(msda_implementation(impl))
        yield table
