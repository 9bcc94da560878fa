"""Where TensorRT 10 and 11 differ, in one place (no TensorRT import here: callers pass the module in).

TensorRT 11 removed weak typing: ``BuilderFlag.FP16 / INT8 / OBEY_PRECISION_CONSTRAINTS`` and
``ILayer.precision / set_output_type`` are gone and every network is strongly typed (the migration guide
"Migrating from TensorRT 10.x to 11.x"); 10.12 already deprecates them. Strongly typed builds (since 10.0) take
fp16 and int8 from the graph itself: our fp16 graph with its fp32 islands, our QDQ graph.

Our choice per version:

- 10.0 .. 10.11 (JetPack 6 ships 10.3): weakly typed. ``--fp16`` / ``--int8`` set the builder flags, and the
  layers of :func:`~m2f_deploy.export.precision.tensorrt_fp32_layer` are pinned to float32 under
  ``precision_constraints="obey"``.
- 10.12 and newer 10.x, and 11.x: strongly typed. No precision flags, no pinning: the graph's types are obeyed.
  An fp16 engine needs the fp16 graph (``m2f-export --fp16``), an int8 engine the QDQ graph.
"""

from __future__ import annotations

import re
from typing import Any

STRONG_TYPING_FROM = (10, 12)  # weak-typing APIs deprecated from here, removed in 11


def version(trt: Any) -> tuple[int, int]:
    """``"10.3.0.26"`` -> (10, 3)."""
    match = re.match(r"(\d+)\.(\d+)", str(trt.__version__))
    if not match:
        raise ValueError(f"cannot read TensorRT's version {trt.__version__!r}")
    return int(match.group(1)), int(match.group(2))


def has_weak_typing(trt: Any) -> bool:
    """Whether this TensorRT still has the precision builder flags (10.x yes, 11.x no)."""
    flags = getattr(trt, "BuilderFlag", None)
    return flags is not None and hasattr(flags, "FP16") and hasattr(flags, "OBEY_PRECISION_CONSTRAINTS")


def strongly_typed(trt: Any) -> bool:
    """Whether m2f-deploy builds strongly typed networks on this TensorRT (see the module docstring)."""
    return version(trt) >= STRONG_TYPING_FROM or not has_weak_typing(trt)


def strongly_typed_network_flag(trt: Any) -> bool:
    """Whether the network must be asked for as strongly typed (10.x: the creation flag; 11.x: always, and the
    flag may be gone). Goes to Polygraphy's ``NetworkFromOnnxPath(strongly_typed=...)``."""
    creation = getattr(trt, "NetworkDefinitionCreationFlag", None)
    return strongly_typed(trt) and creation is not None and hasattr(creation, "STRONGLY_TYPED")


def can_pin_layers(trt: Any) -> bool:
    """``ILayer.precision`` and ``set_output_type`` exist (removed in 11)."""
    layer = getattr(trt, "ILayer", None)
    return has_weak_typing(trt) and (layer is None or hasattr(layer, "set_output_type"))


def numpy_dtype(trt: Any, dtype: Any) -> Any:
    """A TensorRT ``DataType`` as a numpy dtype, through Polygraphy's table (it follows TensorRT's versions)."""
    import numpy as np

    try:
        from polygraphy.datatype import DataType

        return np.dtype(DataType.from_dtype(dtype, source_module="tensorrt").numpy())
    except Exception:  # Polygraphy older than its DataType table, or a type it does not know
        return np.dtype(trt.nptype(dtype))


def profile_shapes(engine: Any, name: str, recorded: dict[str, Any]) -> tuple[tuple[int, ...], ...]:
    """(min, opt, max) of input ``name`` in profile 0: from the engine, else as the sidecar recorded it."""
    try:
        shapes = engine.get_tensor_profile_shape(name, 0)
    except AttributeError:
        shapes = [recorded[k] for k in ("min", "opt", "max")]
    return tuple(tuple(int(d) for d in s) for s in shapes)
