"""A CPU stand-in for TensorRT's ``MultiscaleDeformableAttnPlugin_TRT``, to run and check a
``msda="trt_plugin"`` graph in onnxruntime without TensorRT.

onnxruntime has no kernel for the plugin node, so :func:`standin_session` rewrites every such node
into an onnxruntime-extensions Python custom op (domain ``ai.onnx.contrib``) that calls
:func:`msda_numpy`, and returns an ordinary :class:`onnxruntime.InferenceSession`. Two limits of
that mechanism shape the rewrite:

- Python custom ops take no float16 tensors (the process aborts), so the kernel is registered for
  float32 only, with ``Cast`` to float32 before it and ``CastLike`` back to value's type after it.
  The node's output is then :func:`msda_numpy` of what it receives: float32 math, one rounding at
  the end. (onnxruntime's CPU provider runs many float16 ops in float32 and may skip the rounding
  between them, so what it receives can differ from true float16 execution in the last bit.)
  ``CastLike`` needs default-domain opset >= 15.
- A Python exception in a custom op aborts the process, so the kernel never raises: it records
  the error under the session's key and returns an empty tensor, and the session's ``run``
  raises the recorded error (``InputError`` for inconsistent shapes).

onnxruntime-extensions is imported only when a stand-in session is requested.

Shapes (the plugin's):
    value:               [N, S, M, D]        float32 or float16; S = rows of all levels
    spatial_shapes:      [L, 2]  int32       rows (H_l, W_l)
    level_start_index:   [L]     int32       where level l starts along S
    sampling_locations:  [N, Lq, M, L, P, 2] (x, y) normalised to [0, 1]; outside is allowed
    attention_weights:   [N, Lq, M, L, P]
    output:              [N, Lq, M, D]       value's type
"""

from __future__ import annotations

import functools
import os
import uuid
import weakref
from collections.abc import Iterator, Sequence

import numpy as np
import onnx
import onnx.external_data_helper
import onnx.inliner
import onnxruntime
from onnx import TensorProto, helper

from m2f_deploy.errors import InputError, M2FError

PLUGIN_OP_TYPE = "MultiscaleDeformableAttnPlugin_TRT"
STANDIN_DOMAIN = "ai.onnx.contrib"  # onnxruntime-extensions' domain for Python custom ops
STANDIN_OP_TYPE = "M2FMultiscaleDeformableAttnStandin"
_CASTLIKE_OPSET = 15

# errors recorded by the kernel, by session key, until that session's run() raises them
_kernel_failures: dict[str, Exception] = {}
# SessionOptions that already carry the extensions library (registering it twice fails)
_options_with_library: weakref.WeakSet[onnxruntime.SessionOptions] = weakref.WeakSet()


def msda_numpy(
    value: np.ndarray,
    spatial_shapes: np.ndarray,
    level_start_index: np.ndarray,
    sampling_locations: np.ndarray,
    attention_weights: np.ndarray,
) -> np.ndarray:
    """Multi-scale deformable attention as the plugin computes it, in float32.

    Per level, value[:, start_l : start_l + H_l * W_l] is an [H_l, W_l] map per (n, head,
    channel), sampled bilinearly at pixel (x * W_l - 0.5, y * H_l - 0.5); neighbours outside the
    map count as zero (grid_sample with zeros padding and align_corners=False). The samples are
    weighted by attention_weights and summed over levels and points.

    Args:
        value: [N, S, M, D] float32 or float16.
        spatial_shapes: [L, 2] integer, rows (H_l, W_l).
        level_start_index: [L] integer.
        sampling_locations: [N, Lq, M, L, P, 2] float, (x, y) in [0, 1] (outside allowed).
        attention_weights: [N, Lq, M, L, P] float.

    Returns:
        [N, Lq, M, D] in value's dtype.
    """
    _check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    n, s, m, d = value.shape
    lq, p = sampling_locations.shape[1], sampling_locations.shape[4]
    # one row of D channels per (n, head, position): [N * M * S, D]
    rows = np.ascontiguousarray(value.transpose(0, 2, 1, 3), dtype=np.float32).reshape(n * m * s, d)
    # first row of each (n, head), against [N, Lq, M, P, 2 (y), 2 (x)]
    head_start = ((np.arange(n)[:, None] * m + np.arange(m)) * s).reshape(n, 1, m, 1, 1, 1)
    locations = sampling_locations.astype(np.float32, copy=False)
    weights = attention_weights.astype(np.float32, copy=False)
    out = np.zeros((n, lq, m, d), np.float32)
    for level, ((h, w), start) in enumerate(zip(spatial_shapes.tolist(), level_start_index.tolist())):
        x_taps, x_weights = _bilinear_taps(locations[:, :, :, level, :, 0] * w - 0.5, w)  # [N, Lq, M, P, 2]
        y_taps, y_weights = _bilinear_taps(locations[:, :, :, level, :, 1] * h - 0.5, h)
        index = head_start + start + y_taps[..., :, None] * w + x_taps[..., None, :]  # [N, Lq, M, P, 2, 2]
        tap_weights = y_weights[..., :, None] * x_weights[..., None, :] * weights[:, :, :, level, :, None, None]
        samples = np.take(rows, index.reshape(n, lq, m, 4 * p), axis=0)  # [N, Lq, M, 4P, D]
        out += (tap_weights.reshape(n, lq, m, 1, 4 * p) @ samples)[..., 0, :]
    return out.astype(value.dtype, copy=False)


def _bilinear_taps(coord: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The two neighbours of each pixel coordinate along one axis, and their bilinear weights.

    coord: [...] float32. Returns taps [..., 2] int64 and weights [..., 2] float32; a tap outside
    [0, size) (or a NaN coordinate) gets index 0 and weight 0.
    """
    low = np.floor(coord)
    taps = low[..., None] + np.array([0, 1], np.float32)
    weights = np.stack([low + 1 - coord, coord - low], axis=-1)
    inside = (taps >= 0) & (taps < size)
    return np.where(inside, taps, 0).astype(np.int64), np.where(inside, weights, 0)


def _check_inputs(
    value: np.ndarray,
    spatial_shapes: np.ndarray,
    level_start_index: np.ndarray,
    sampling_locations: np.ndarray,
    attention_weights: np.ndarray,
) -> None:
    """Raise InputError unless the five inputs have the plugin's dtypes and consistent shapes."""
    if value.dtype not in (np.float32, np.float16) or value.ndim != 4:
        raise InputError(f"value must be float32/float16 [N, S, M, D], got {value.dtype} {list(value.shape)}")
    n, s, m, _ = value.shape
    loc = sampling_locations.shape
    if sampling_locations.ndim != 6 or loc[0] != n or loc[2] != m or loc[5] != 2:
        raise InputError(f"sampling_locations must be [N={n}, Lq, M={m}, L, P, 2], got {list(loc)}")
    if attention_weights.shape != loc[:5]:
        raise InputError(f"attention_weights must be {list(loc[:5])}, got {list(attention_weights.shape)}")
    for name, array in (("sampling_locations", sampling_locations), ("attention_weights", attention_weights)):
        if not np.issubdtype(array.dtype, np.floating):
            raise InputError(f"{name} must be float, got {array.dtype}")
    levels = loc[3]
    if spatial_shapes.shape != (levels, 2) or level_start_index.shape != (levels,):
        raise InputError(
            f"spatial_shapes must be [L={levels}, 2] and level_start_index [{levels}], "
            f"got {list(spatial_shapes.shape)} and {list(level_start_index.shape)}"
        )
    for name, array in (("spatial_shapes", spatial_shapes), ("level_start_index", level_start_index)):
        if not np.issubdtype(array.dtype, np.integer):
            raise InputError(f"{name} must be integer, got {array.dtype}")
    for (h, w), start in zip(spatial_shapes.tolist(), level_start_index.tolist()):
        if h < 1 or w < 1 or start < 0 or start + h * w > s:
            raise InputError(f"level {h}x{w} starting at {start} does not fit in value's S={s} rows")


def count_plugin_nodes(model: str | os.PathLike | onnx.ModelProto) -> int:
    """Number of MultiscaleDeformableAttnPlugin_TRT nodes in the graph, its subgraphs and local functions."""
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(os.fspath(model), load_external_data=False)
    return sum(node.op_type == PLUGIN_OP_TYPE for owner in _node_owners(proto) for node in owner.node)


def standin_session(
    model: str | os.PathLike | onnx.ModelProto,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    sess_options: onnxruntime.SessionOptions | None = None,
) -> onnxruntime.InferenceSession:
    """An onnxruntime session of ``model`` with every plugin node computed by :func:`msda_numpy`.

    ``model`` (a path, with its external data, or a ModelProto with its data loaded) is not
    modified. The extensions library is registered on ``sess_options`` (once per options
    object; do not register it there yourself). The stand-in always runs on CPU, whatever
    ``providers`` says for the rest of the graph. A stand-in failure, such as spatial shapes
    that do not fit value, is raised by the session's ``run``.

    Raises:
        M2FError: onnxruntime-extensions is not installed.
        InputError: a plugin node without 5 inputs and 1 output, default-domain opset < 15,
            or a ModelProto whose external data is not loaded.
    """
    library = _custom_ops_library()
    session_key = uuid.uuid4().hex
    proto = _standin_model(_load(model), session_key)
    options = onnxruntime.SessionOptions() if sess_options is None else sess_options
    if options not in _options_with_library:
        options.register_custom_ops_library(library)
        _options_with_library.add(options)
    return _StandinSession(proto.SerializeToString(), session_key, options, list(providers))


class _StandinSession(onnxruntime.InferenceSession):
    """An InferenceSession whose run() raises what the stand-in kernel recorded during the run."""

    def __init__(
        self, model: bytes, session_key: str, sess_options: onnxruntime.SessionOptions, providers: list[str]
    ) -> None:
        self._session_key = session_key
        super().__init__(model, sess_options=sess_options, providers=providers)

    def run(
        self,
        output_names: Sequence[str] | None,
        input_feed: dict[str, np.ndarray],
        run_options: onnxruntime.RunOptions | None = None,
    ) -> list[np.ndarray]:
        try:
            return super().run(output_names, input_feed, run_options)
        finally:
            failure = _kernel_failures.pop(self._session_key, None)
            if failure is not None:
                raise failure


def _custom_ops_library() -> str:
    """Path of onnxruntime-extensions' custom-ops library, with the stand-in kernel registered."""
    try:
        import onnxruntime_extensions  # noqa: F401
    except ImportError as exc:
        raise M2FError(
            f"running {PLUGIN_OP_TYPE} nodes without TensorRT needs onnxruntime-extensions: "
            "pip install onnxruntime-extensions"
        ) from exc
    return _register_kernel()


@functools.cache
def _register_kernel() -> str:
    """Register the float32 stand-in kernel with onnxruntime-extensions, once per process."""
    import onnxruntime_extensions as ortx

    dt = ortx.PyCustomOpDef
    ortx.onnx_op(
        op_type=STANDIN_OP_TYPE,
        inputs=[dt.dt_float, dt.dt_int32, dt.dt_int32, dt.dt_float, dt.dt_float],
        outputs=[dt.dt_float],
        attrs={"session_key": dt.dt_string, "node_name": dt.dt_string},
    )(_kernel)
    return ortx.get_library_path()


def _kernel(
    value: np.ndarray,
    spatial_shapes: np.ndarray,
    level_start_index: np.ndarray,
    sampling_locations: np.ndarray,
    attention_weights: np.ndarray,
    session_key: str,
    node_name: str,
) -> np.ndarray:
    """msda_numpy for onnxruntime-extensions; never raises (that would abort the process): a
    failure is handed to the session's run(), and the node's output is an empty tensor."""
    try:
        return msda_numpy(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    except InputError as exc:
        failure: Exception = InputError(f"{PLUGIN_OP_TYPE} node {node_name!r}: {exc}")
    except Exception as exc:
        failure = exc
    _kernel_failures.setdefault(session_key, failure)
    return np.zeros(0, np.float32)


def _load(model: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto:
    """A private copy of the model, external data included."""
    if not isinstance(model, onnx.ModelProto):
        return onnx.load(os.fspath(model))
    if any(onnx.external_data_helper.uses_external_data(t) for t in model.graph.initializer):
        raise InputError("the ModelProto's external data is not loaded: pass its path or load it with onnx.load(path)")
    proto = onnx.ModelProto()
    proto.CopyFrom(model)
    return proto


def _standin_model(model: onnx.ModelProto, session_key: str) -> onnx.ModelProto:
    """``model`` (modified in place) with each plugin node replaced by Cast -> stand-in -> CastLike."""
    if model.functions:
        model = onnx.inliner.inline_local_functions(model)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < _CASTLIKE_OPSET:
        raise InputError(f"the {PLUGIN_OP_TYPE} stand-in needs default-domain opset >= 15, the model has {opset}")
    if all(o.domain != STANDIN_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(STANDIN_DOMAIN, 1))
    # subgraphs before the graphs that hold them: a graph's rewrite copies its nodes, subgraphs included
    for graph in reversed(list(_node_owners(model))):
        nodes = [new for node in graph.node for new in _standin_nodes(node, session_key)]
        del graph.node[:]
        graph.node.extend(nodes)
    return model


def _standin_nodes(node: onnx.NodeProto, session_key: str) -> list[onnx.NodeProto]:
    """The node itself, or for a plugin node its replacement: float32 casts, the kernel, CastLike."""
    if node.op_type != PLUGIN_OP_TYPE:
        return [node]
    if len(node.input) != 5 or not all(node.input) or len(node.output) != 1:
        raise InputError(
            f"{PLUGIN_OP_TYPE} node {node.name!r} must have 5 inputs and 1 output, "
            f"has {list(node.input)} -> {list(node.output)}"
        )
    value, spatial_shapes, level_start_index, locations, weights = node.input
    output = node.output[0]
    name = node.name or output
    casts = [
        helper.make_node(
            "Cast", [x], [f"{output}/standin/{role}"], name=f"{name}/standin/cast_{role}", to=TensorProto.FLOAT
        )
        for role, x in (("value", value), ("locations", locations), ("weights", weights))
    ]
    kernel = helper.make_node(
        STANDIN_OP_TYPE,
        [casts[0].output[0], spatial_shapes, level_start_index, casts[1].output[0], casts[2].output[0]],
        [f"{output}/standin/output"],
        name=f"{name}/standin",
        domain=STANDIN_DOMAIN,
        session_key=session_key,
        node_name=node.name,
    )
    cast_back = helper.make_node("CastLike", [kernel.output[0], value], [output], name=f"{name}/standin/cast_back")
    return [*casts, kernel, cast_back]


def _node_owners(model: onnx.ModelProto) -> Iterator[onnx.GraphProto | onnx.FunctionProto]:
    """The main graph, local functions and every subgraph under them, each before its subgraphs."""
    pending: list[onnx.GraphProto | onnx.FunctionProto] = [model.graph, *model.functions]
    while pending:
        owner = pending.pop()
        yield owner
        for node in owner.node:
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    pending.append(attribute.g)
                elif attribute.type == onnx.AttributeProto.GRAPHS:
                    pending.extend(attribute.graphs)
