"""Static TensorRT compatibility check of an ONNX graph: no TensorRT, no GPU, no torch (only ``onnx``).

Every node is checked against onnx-tensorrt's documented operator support matrix (``docs/operators.md`` of
github.com/onnx/onnx-tensorrt) for the TensorRT versions we target, and against the documented restrictions that
can be read off a graph: the op is imported at all (and since which release), the data types of its tensors (from
ONNX type inference), attribute values and constant inputs the parser requires, the opset range, and the
``MultiscaleDeformableAttnPlugin_TRT`` plugin node (input types, attribute types, plugin version). An op that is
neither in the matrix nor a known plugin is a finding, not a pass.

Sources, read for this table (the release each rule starts or stops at is noted beside it):
- ``docs/operators.md`` at release/10.1-GA (header: opset 9 to 20) and at the 10.15 release (opset 9 to 24);
  the op list and types below are the 10.15 table; ops and restrictions that changed in between are dated from
  onnx-tensorrt's ``docs/Changelog.md`` (10.1 DeformConv; 10.3 tensor ``axes`` for Slice; 10.4 tensor ``axes``
  for Pad, the window ops; 10.5 STFT; 10.7 dynamic ``axes`` for Squeeze/Unsqueeze; 10.8 dynamic ``axis`` for
  CumSum, integer exponents for Pow; 10.12 integer bases for Pow, ellipsis/diagonal/broadcast in Einsum; 10.14
  Attention; 10.15 RotaryEmbedding, RMSNormalization, TensorScatter).
- onnx-tensorrt's DeformConv importer (release/10.1-GA ``importerUtils.cpp``): 1-D or 2-D spatial input, every
  input FP32 or every input FP16, begin and end pads equal per spatial axis (imported as the
  ``ModulatedDeformConv2d`` plugin). The ONNX spec: pads are non-negative.
- TensorRT 10.11 release notes: ``MultiscaleDeformableAttnPlugin_TRT`` version 2 (IPluginV3) from 10.11, version 1
  kept for backward compatibility (deprecated; TensorRT 11 still ships it).
- TensorRT 11.x: the ONNX opset guide (maximum opset 25 from 11.5, 24 before); 11.0 parser notes (adds Swish);
  11.2.1 notes (GridSample on 5-D input).
Where our knowledge of a release between two documented ones is missing, the earlier (stricter) entry applies.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from typing import TYPE_CHECKING, Any

from m2f_deploy.errors import BackendError, InputError

log = logging.getLogger("m2f_deploy.export")

if TYPE_CHECKING:
    import onnx

Version = tuple[int, int]

# The versions a check covers unless told otherwise: JetPack 6's TensorRT, the newest 10.x, every 11.x.
DEFAULT_TARGETS: dict[str, Version] = {"10.3": (10, 3), "10.16": (10, 16), "11.x": (11, 0)}
MIN_VERSION, MAX_MAJOR = (10, 0), 11
OPSET_MIN = 9
OPSET_MAX = {(10, 0): 20, (10, 15): 24, (11, 0): 24, (11, 5): 25}  # the value at the latest entry <= version applies

PLUGIN_OP = "MultiscaleDeformableAttnPlugin_TRT"
PLUGIN_VERSIONS = {"1": (10, 0), "2": (10, 11)}  # plugin version -> first TensorRT release that has it
PLUGIN_V1_DEPRECATED = (10, 11)

# ONNX's TensorProto.DataType numbers (fixed by the ONNX spec; written out so that importing this module needs no onnx)
TYPE_NAMES = {
    1: "FP32", 2: "UINT8", 3: "INT8", 4: "UINT16", 5: "INT16", 6: "INT32", 7: "INT64", 8: "STRING", 9: "BOOL",
    10: "FP16", 11: "DOUBLE", 12: "UINT32", 13: "UINT64", 14: "COMPLEX64", 15: "COMPLEX128", 16: "BF16",
    17: "FP8", 18: "FP8E4M3FNUZ", 19: "FP8E5M2", 20: "FP8E5M2FNUZ", 21: "UINT4", 22: "INT4", 23: "FP4",
}  # fmt: skip
# Types TensorRT takes at all ("TensorRT supports the following ONNX data types"); UINT8 only as network I/O.
TRT_TYPES = {"DOUBLE", "FP32", "FP16", "BF16", "FP8", "FP4", "INT32", "INT64", "INT8", "INT4", "UINT8", "BOOL"}

_F, _I, _B = ("FP32", "FP16", "BF16"), ("INT32", "INT64"), ("BOOL",)


@dataclass(frozen=True)
class OpSupport:
    """One row of the matrix: the types of the op's data tensor, the first release importing it, rules."""

    types: tuple[str, ...]
    since: Version = MIN_VERSION
    typed: tuple[str, ...] = ("in0",)  # which tensors the types are about: in<i> / out<i> / "all_in"


def _rows(names: str, types: tuple[str, ...], **kw) -> dict[str, OpSupport]:
    return {name: OpSupport(types, **kw) for name in names.split()}


# onnx-tensorrt docs/operators.md (10.15), supported ("Y") rows, grouped by their Supported Types column.
SUPPORTED: dict[str, OpSupport] = {
    **_rows("Acos Acosh Asin Asinh Atan Atanh AveragePool BatchNormalization Ceil Celu Clip Conv ConvTranspose Cos "
            "Cosh CumSum Dropout Einsum Elu Erf Exp Floor Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool "
            "GroupNormalization GRU HardSigmoid HardSwish Hardmax ImageScaler InstanceNormalization IsInf "
            "LayerNormalization LeakyRelu Log LogSoftmax LRN LSTM LpNormalization LpPool MatMul MaxPool "
            "MeanVarianceNormalization ParametricSoftplus PRelu QuantizeLinear RandomNormal RandomNormalLike "
            "RandomUniform RandomUniformLike Reciprocal Resize RNN Round ScaledTanh Scan Selu Sigmoid Sin Sinh "
            "Softmax Softplus Softsign Sqrt Tan Tanh ThresholdedRelu Upsample", _F),
    **_rows("Abs Add ArgMax ArgMin DepthToSpace Div Equal Greater GreaterOrEqual IsNaN Less LessOrEqual Max Min Mod "
            "Mul Neg Pad Range ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin "
            "ReduceProd ReduceSum ReduceSumSquare Relu Scatter ScatterElements ScatterND Shrink Sign SpaceToDepth "
            "Sub Sum TopK", _F + _I),
    **_rows("Concat Expand EyeLike Flatten Gather GatherElements GatherND Identity If Loop OneHot Reshape "
            "ReverseSequence Shape Size Slice Split Squeeze Tile Transpose Trilu Unsqueeze", _F + _I + _B),
    "Where": OpSupport(_F + _I + _B, typed=("in1",)),
    **_rows("And Not Or Xor", _B),
    "Cast": OpSupport(_F + _I + ("UINT8",) + _B, typed=("in0", "out0")),
    "CastLike": OpSupport(_F + _I + ("UINT8",) + _B, typed=("in0", "in1")),
    **_rows("Constant ConstantOfShape", _F + ("FP8", "FP4", "INT4") + _I + _B, typed=("out0",)),
    "DequantizeLinear": OpSupport(("INT8", "FP8", "FP4", "INT4")),
    "Gelu": OpSupport(_F + ("INT8",) + _I),
    "Mean": OpSupport(_F + ("FP8",) + _I),
    "Pow": OpSupport(_F + _I),  # integer bases from 10.12 only: see _pow
    **_rows("GridSample Mish NonMaxSuppression NonZero RoiAlign", ("FP32", "FP16")),
    "DeformConv": OpSupport(("FP32", "FP16"), since=(10, 1), typed=("all_in",)),
    **_rows("BlackmanWindow HammingWindow HannWindow", ("FP32", "FP16"), since=(10, 4), typed=("out0",)),
    "STFT": OpSupport(("FP32",), since=(10, 5)),
    "Attention": OpSupport(_F + ("INT8", "FP8"), since=(10, 14)),
    **_rows("RotaryEmbedding RMSNormalization", _F, since=(10, 15)),
    "TensorScatter": OpSupport(_F + ("INT32",), since=(10, 15)),
    "Swish": OpSupport(_F, since=(11, 0)),
}  # fmt: skip

# Rows marked "N" (not supported) in the same table.
UNSUPPORTED = set(
    "AffineGrid Bernoulli BitShift BitwiseAnd BitwiseNot BitwiseOr BitwiseXor Col2Im CenterCropPad Compress "
    "ConcatFromSequence ConvInteger DFT Det DynamicQuantizeLinear ImageDecoder MatMulInteger MaxRoiPool MaxUnpool "
    "MelWeightMatrix Multinomial NegativeLogLikelihoodLoss Optional OptionalGetElement OptionalHasElement QLinearConv "
    "QLinearMatMul RegexFullMatch SequenceAt SequenceConstruct SequenceEmpty SequenceErase SequenceInsert "
    "SequenceLength SequenceMap SoftmaxCrossEntropyLoss SplitToSequence StringConcat StringNormalizer StringSplit "
    "TfIdfVectorizer Unique".split()
)


class TensorRTSupportError(InputError):
    """A graph that TensorRT's ONNX parser would refuse, by its documented operator support."""


@dataclass(frozen=True)
class Finding:
    node: str
    op: str
    rule: str
    versions: tuple[str, ...]
    # "error" (the parser refuses it), "deprecated" (imported, but going away) or "plugin" (an op the parser has no
    # importer for, left to the plugin libraries given: its fallback importer looks for a plugin of the op's name)
    severity: str = "error"

    def __str__(self) -> str:
        note = {"deprecated": " (deprecated)", "plugin": " (left to the plugin libraries)"}.get(self.severity, "")
        return f"node {self.node!r} ({self.op}): {self.rule}{note} [TensorRT {', '.join(self.versions)}]"


@dataclass
class SupportReport:
    path: str
    targets: tuple[str, ...]
    findings: list[Finding] = field(default_factory=list)  # errors and deprecations

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def format(self) -> str:
        if not self.findings:
            return f"{self.path}: passes for TensorRT {', '.join(self.targets)}"
        head = (f"{self.path}: passes for TensorRT {', '.join(self.targets)}, with notes" if self.ok else
                f"{self.path}: {len(self.errors)} finding(s) against TensorRT's ONNX support")  # fmt: skip
        return "\n".join([head, *(f"  {f}" for f in self.findings)])

    def raise_if_failed(self) -> None:
        if not self.ok:
            first = self.errors[0]
            extra = len(self.errors) - 1
            more = f" (and {extra} more: m2f-export {self.path} --check-tensorrt)" if extra else ""
            raise TensorRTSupportError(f"{self.path}: TensorRT would refuse {first}{more}")


def parse_trt_version(text: str) -> tuple[str, Version]:
    """``"10.3"`` -> ("10.3", (10, 3)); ``"11"`` / ``"11.x"`` -> ("11.x", (11, 0)). Only 10.x and 11.x are known."""
    label = text.strip()
    major, _, minor = label.partition(".")
    if minor in ("", "x"):
        minor, label = "0", f"{major}.x"
    if not (major.isdigit() and minor.isdigit()):
        raise InputError(f"--trt-version {text!r}: expected MAJOR.MINOR, e.g. 10.3 (JetPack 6) or 11.x")
    version = (int(major), int(minor))
    if version < MIN_VERSION or version[0] > MAX_MAJOR:
        raise InputError(f"--trt-version {text}: the support table covers TensorRT 10.0 to 11.x")
    return label, version


def _targets(trt_version: str | Sequence[str] | None) -> dict[str, Version]:
    if trt_version is None:
        return dict(DEFAULT_TARGETS)
    texts = [trt_version] if isinstance(trt_version, str) else list(trt_version)
    return dict(parse_trt_version(t) for t in texts)


# -- the graph, with what the rules need to know about its tensors -----------------------------------------------


class _Graph:
    def __init__(self, model: onnx.ModelProto, base_dir: str = ""):
        import onnx

        self.base_dir = base_dir  # where external data lives (it is read only for the few constants a rule reads)
        if model.functions:
            import onnx.inliner

            model = onnx.inliner.inline_local_functions(model)
        fresh = onnx.ModelProto()
        fresh.CopyFrom(model)
        del fresh.graph.value_info[:]  # inferred afresh: converters (fp16) may leave stale entries that contradict it
        try:  # types of every tensor; the plugin's output stays unknown (no schema), and so may what follows it
            inferred = onnx.shape_inference.infer_shapes(fresh, strict_mode=False)
        except Exception as e:  # noqa: BLE001  (a graph onnx cannot infer still gets its op and attribute checks)
            log.warning("ONNX type inference failed (%s): tensor types are checked where the graph declares them", e)
            inferred = model
        self.model = model
        g = inferred.graph
        self.types: dict[str, int] = {}
        for v in [*g.input, *g.output, *g.value_info]:
            if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type:
                self.types[v.name] = v.type.tensor_type.elem_type
        self.ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in [*g.input, *g.output, *g.value_info]
                      if v.type.tensor_type.HasField("shape")}  # fmt: skip
        self.constants: dict[str, Any] = {}  # name -> TensorProto
        for t in model.graph.initializer:
            self.constants[t.name] = t
            self.types[t.name] = t.data_type
        for node in _all_nodes(model.graph):
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                for a in node.attribute:
                    if a.name == "value":
                        self.constants[node.output[0]] = a.t
                        self.types[node.output[0]] = a.t.data_type
        self.io = {v.name for v in [*model.graph.input, *model.graph.output]}
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)

    def type_name(self, tensor: str) -> str | None:
        t = self.types.get(tensor)
        return TYPE_NAMES.get(t, f"type {t}") if t else None

    def value(self, tensor: str):
        import onnx.numpy_helper

        t = self.constants.get(tensor)
        return None if t is None else onnx.numpy_helper.to_array(t, base_dir=self.base_dir)


def _all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for a in node.attribute:
            for sub in [a.g] if a.type == _ATTR_GRAPH else list(a.graphs):
                yield from _all_nodes(sub)


_ATTR_GRAPH, _ATTR_STRING = 5, 3  # AttributeProto.GRAPH, .STRING


def _attr(node: onnx.NodeProto, name: str, default=None):
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _input(node: onnx.NodeProto, i: int) -> str:
    return node.input[i] if len(node.input) > i else ""


# -- rules: each yields (rule text, applies to version?) -----------------------------------------------------------

Rule = Callable[[Any, _Graph], Iterator[tuple[str, Callable[[Version], bool]]]]
ALWAYS: Callable[[Version], bool] = lambda v: True  # noqa: E731


def _before(version: Version) -> Callable[[Version], bool]:
    return lambda v: v < version


def _constant_input(index: int, what: str, until: Version | None = None) -> Rule:
    def rule(node, g):
        name = _input(node, index)
        if name and name not in g.constants:
            yield f"{what} must be a constant (an initializer)", _before(until) if until else ALWAYS

    return rule


def _deform_conv(node, g):
    pads = list(_attr(node, "pads", []))
    spatial = len(pads) // 2
    rank = g.ranks.get(node.input[0])
    if rank is not None and rank not in (3, 4):
        yield f"input must have 1 or 2 spatial dimensions, has {rank - 2}", ALWAYS
    if any(p < 0 for p in pads):
        yield f"pads must be non-negative (ONNX), got {pads}", ALWAYS
    if pads[:spatial] != pads[spatial:]:
        yield f"begin and end pads must be equal per spatial axis, got pads={pads}", ALWAYS
    types = {g.type_name(x) for x in node.input if x}
    if len(types - {None}) > 1:
        yield f"inputs must be all FP32 or all FP16, got {sorted(types - {None})}", ALWAYS


_RESIZE_COORDS = {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"}
_RESIZE_NEAREST = {"floor", "ceil", "round_prefer_floor", "round_prefer_ceil"}


def _resize(node, g):
    mode = _attr(node, "mode", b"nearest").decode()
    coords = _attr(node, "coordinate_transformation_mode", b"half_pixel").decode()
    nearest = _attr(node, "nearest_mode", b"round_prefer_floor").decode()
    if mode not in ("nearest", "linear"):
        yield f"mode {mode!r} is not supported (nearest, linear)", ALWAYS
    if coords not in _RESIZE_COORDS:
        yield f"coordinate_transformation_mode {coords!r} is not supported", ALWAYS
    if mode == "nearest" and nearest not in _RESIZE_NEAREST:
        yield f"nearest_mode {nearest!r} is not supported", ALWAYS
    if _attr(node, "antialias", 0):
        yield "antialiasing is not supported", ALWAYS
    if _attr(node, "keep_aspect_ratio_policy", b"stretch").decode() != "stretch":
        yield "only keep_aspect_ratio_policy 'stretch' is supported", ALWAYS
    axes = _attr(node, "axes")
    rank = g.ranks.get(node.input[0])
    if axes is not None and _input(node, 2) and rank is not None and list(axes) != list(range(rank)):
        yield f"with a scales input, axes must be 0..rank-1, got {list(axes)}", ALWAYS


def _grid_sample(node, g):
    rank = g.ranks.get(node.input[0])
    if rank is not None and rank != 4:
        if rank == 5:
            # 11.2.1's release notes add it; versions here are MAJOR.MINOR, so 11.2 (maybe 11.2.0) is not trusted
            yield "input must be 4-D (5-D from TensorRT 11.2.1: checked as 11.3)", _before((11, 3))
        else:
            yield f"input must be 4-D, is {rank}-D", ALWAYS


def _zero_point(index: int, name: str) -> Rule:
    def rule(node, g):
        zp = _input(node, index)
        if not zp:
            return
        value = g.value(zp)
        if value is None:
            yield f"{name} must be a constant zero", ALWAYS
        elif value.any():
            yield f"{name} must be zero", ALWAYS

    return rule


def _topk(node, g):
    if _attr(node, "sorted", 1) != 1:
        yield "sorted must be 1", ALWAYS
    k = g.value(_input(node, 1))
    if k is not None and int(k.reshape(-1)[0]) >= 3840:
        yield f"K must be less than 3840, is {int(k.reshape(-1)[0])}", ALWAYS


def _scatter_nd(node, g):
    if _attr(node, "reduction", b"none").decode() != "none":
        yield "reduction other than 'none' is not supported", ALWAYS


def _first_output_only(what: str) -> Rule:
    def rule(node, g):
        if any(node.output[1:]):
            yield f"only the first output is supported ({what})", ALWAYS

    return rule


def _pool(node, g):
    kernel = _attr(node, "kernel_shape", [])
    if len(kernel) not in (2, 3):
        yield f"2-D or 3-D pooling only, kernel_shape {list(kernel)}", ALWAYS
    if any(d != 1 for d in _attr(node, "dilations", [])):
        yield "dilations must be empty or all ones", ALWAYS


def _einsum(node, g):
    terms = _attr(node, "equation", b"").decode().replace(" ", "").split("->")[0].split(",")
    if any("..." in t for t in terms):
        yield "ellipsis is not supported (from TensorRT 10.12)", _before((10, 12))
    if any(len(set(t)) != len(t) for t in terms if "..." not in t):
        yield "diagonal operations are not supported (from TensorRT 10.12)", _before((10, 12))


def _pow(node, g):
    base = g.type_name(node.input[0])
    if base in _I:
        yield f"integer base ({base}) is supported from TensorRT 10.12", _before((10, 12))


def _constant(node, g):
    for name in ("sparse_value", "value_string", "value_strings"):
        if _attr(node, name) is not None:
            yield f"attribute {name} is not supported", ALWAYS


RULES: dict[str, list[Rule]] = {
    "DeformConv": [_deform_conv],
    "Resize": [_resize],
    "GridSample": [_grid_sample],
    "QuantizeLinear": [_zero_point(2, "y_zero_point")],
    "DequantizeLinear": [_zero_point(2, "x_zero_point")],
    "TopK": [_topk],
    "ScatterND": [_scatter_nd],
    "LayerNormalization": [_first_output_only("Y; Mean and InvStdDev are not")],
    "MaxPool": [_pool, _first_output_only("Indices is not")],
    "AveragePool": [_pool],
    "Einsum": [_einsum],
    "Pow": [_pow],
    "Constant": [_constant],
    "Slice": [_constant_input(3, "axes", until=(10, 3))],
    "Pad": [_constant_input(3, "axes", until=(10, 4))],
    "Squeeze": [_constant_input(1, "axes", until=(10, 7))],
    "Unsqueeze": [_constant_input(1, "axes", until=(10, 7))],
    "CumSum": [_constant_input(1, "axis", until=(10, 8))],
    **{op: [_constant_input(1, "axes")] for op in (
        "ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum "
        "ReduceSumSquare").split()},
}  # fmt: skip


def _types_rule(node: onnx.NodeProto, g: _Graph, support: OpSupport) -> Iterator[tuple[str, Callable]]:
    tensors: list[str] = []
    for where in support.typed:
        if where == "all_in":
            tensors += [x for x in node.input if x]
        else:
            seq = node.input if where.startswith("in") else node.output
            i = int(where[-1])
            if len(seq) > i and seq[i]:
                tensors.append(seq[i])
    for tensor in tensors:
        name = g.type_name(tensor)
        if name is not None and name not in support.types:
            yield f"type {name} of {tensor!r} is not supported ({', '.join(support.types)})", ALWAYS


def _plugin(node: onnx.NodeProto, g: _Graph) -> Iterator[tuple[str, Callable, str]]:
    """MultiscaleDeformableAttnPlugin_TRT: 5 inputs (value, spatial_shapes, level_start_index, locations, weights)."""
    if len(node.input) != 5 or len(node.output) != 1:
        yield f"needs 5 inputs and 1 output, has {len(node.input)} and {len(node.output)}", ALWAYS, "error"
    else:
        value = g.type_name(node.input[0])
        if value is not None and value not in ("FP32", "FP16"):
            yield f"value must be FP32 or FP16, is {value}", ALWAYS, "error"
        for i, role in ((1, "spatial_shapes"), (2, "level_start_index")):
            t = g.type_name(node.input[i])
            if t is not None and t != "INT32":
                yield f"{role} must be INT32 (the plugin's type), is {t}", ALWAYS, "error"
        for i, role in ((3, "sampling_locations"), (4, "attention_weights")):
            t = g.type_name(node.input[i])
            if t is not None and value is not None and t != value:
                yield f"{role} must have value's type {value}, is {t}", ALWAYS, "error"
    kinds = {a.name: a.type for a in node.attribute}
    for name in ("plugin_version", "plugin_namespace"):
        if name in kinds and kinds[name] != _ATTR_STRING:
            yield f"attribute {name} must be a string", ALWAYS, "error"
    version = _attr(node, "plugin_version", b"1")
    version = version.decode() if isinstance(version, bytes) else str(version)
    namespace = _attr(node, "plugin_namespace", b"")
    if isinstance(namespace, bytes) and namespace.decode() != "":
        yield f"plugin_namespace must be '' (libnvinfer_plugin's), is {namespace.decode()!r}", ALWAYS, "error"
    if version not in PLUGIN_VERSIONS:
        yield f"plugin_version {version!r} does not exist (1, 2)", ALWAYS, "error"
    else:
        since = PLUGIN_VERSIONS[version]
        yield f"plugin_version {version} exists from TensorRT {since[0]}.{since[1]}", _before(since), "error"
        if version == "1":
            deprecated = "plugin_version 1 (IPluginV2) is deprecated from TensorRT 10.11: export with " \
                "--trt-plugin-version 2 for TensorRT >= 10.11"
            yield deprecated, lambda v: v >= PLUGIN_V1_DEPRECATED, "deprecated"


UNKNOWN = "unknown"  # no importer for the op: an error, or a "plugin" note when plugin libraries are loaded


def _node_checks(node: onnx.NodeProto, g: _Graph) -> Iterator[tuple[str, Callable, str]]:
    if node.op_type == PLUGIN_OP and node.domain not in ("", "ai.onnx"):
        yield from _plugin(node, g)
        return
    if node.domain not in ("", "ai.onnx"):
        yield (f"op of domain {node.domain!r} is neither an ONNX op TensorRT imports nor a known plugin",
               ALWAYS, UNKNOWN)  # fmt: skip
        return
    if node.op_type in UNSUPPORTED:
        yield "not supported by TensorRT's ONNX parser", ALWAYS, UNKNOWN
        return
    support = SUPPORTED.get(node.op_type)
    if support is None:
        yield "not in TensorRT's ONNX operator support matrix (unknown op)", ALWAYS, UNKNOWN
        return
    if support.since > MIN_VERSION:
        yield f"imported from TensorRT {support.since[0]}.{support.since[1]}", _before(support.since), "error"
    for text, applies in _types_rule(node, g, support):
        yield text, applies, "error"
    for rule in RULES.get(node.op_type, []):
        for text, applies in rule(node, g):
            yield text, applies, "error"


def _graph_checks(g: _Graph) -> Iterator[tuple[str, str, str, Callable]]:
    """(node, op, rule, applies) for the model as a whole: opset range, tensor types TensorRT has no use for."""
    if g.opset is not None:
        if g.opset < OPSET_MIN:
            yield "<model>", "opset", f"opset {g.opset} is older than {OPSET_MIN}", ALWAYS
        yield ("<model>", "opset", f"opset {g.opset} is newer than this release supports",
               lambda v: g.opset > _opset_max(v))  # fmt: skip
    seen: set[str] = set()
    for node in _all_nodes(g.model.graph):
        for tensor in [*node.input, *node.output]:
            name = g.type_name(tensor) if tensor else None
            if name is None or tensor in seen:
                continue
            seen.add(tensor)
            if name == "UINT8" and tensor not in g.io:
                yield (node.name or tensor, node.op_type,
                       f"UINT8 tensor {tensor!r}: TensorRT takes UINT8 only as network input or output (an INT8 graph "
                       "for TensorRT has int8 activations: --int8-target tensorrt)", ALWAYS)  # fmt: skip
            elif name not in TRT_TYPES:
                rule = f"tensor {tensor!r} of type {name}: not a TensorRT type"
                yield node.name or tensor, node.op_type, rule, ALWAYS


def _opset_max(version: Version) -> int:
    return OPSET_MAX[max(k for k in OPSET_MAX if k <= version)]


def check_tensorrt_support(
    model: str | os.PathLike | onnx.ModelProto, trt_version: str | Sequence[str] | None = None, *,
    plugins: bool = False,
) -> SupportReport:
    """Check every node of ``model`` against TensorRT's documented ONNX support for ``trt_version`` (e.g. "10.3";
    several allowed; default :data:`DEFAULT_TARGETS`). Returns the report; nothing is raised for findings.
    plugins: plugin libraries will be loaded (``--plugin-lib``): ops without an importer are notes, not errors."""
    targets = _targets(trt_version)
    try:
        import onnx
    except ImportError:
        raise BackendError("the static TensorRT check (run before every engine build) needs the onnx package: "
                           "pip install onnx") from None
    if isinstance(model, onnx.ModelProto):
        path, proto = "<model>", model
    else:
        path = str(model)
        if not Path(path).is_file():
            raise InputError(f"{path}: no such ONNX file")
        try:  # without the weights: types, attributes and small constants are all a rule reads
            proto = onnx.load(path, load_external_data=False)
        except Exception as e:  # noqa: BLE001  (protobuf's DecodeError and friends)
            raise InputError(f"{path}: not an ONNX model ({type(e).__name__})") from None
    g = _Graph(proto, os.path.dirname(os.path.abspath(path)) if path != "<model>" else "")
    found: dict[tuple[str, str, str, str], list[str]] = {}

    def record(node: str, op: str, rule: str, applies: Callable, severity: str) -> None:
        for label, version in targets.items():
            if applies(version):
                found.setdefault((node, op, rule, severity), []).append(label)

    for node, op, rule, applies in _graph_checks(g):
        record(node, op, rule, applies, "error")
    for i, node in enumerate(_all_nodes(g.model.graph)):
        for rule, applies, severity in _node_checks(node, g):
            if severity == UNKNOWN:
                severity = "plugin" if plugins else "error"
            record(node.name or f"#{i}", node.op_type, rule, applies, severity)
    findings = [Finding(n, op, rule, tuple(v), severity) for (n, op, rule, severity), v in found.items()]
    return SupportReport(path, tuple(targets), findings)


def require_tensorrt_support(
    model: str | os.PathLike | onnx.ModelProto, trt_version: str | Sequence[str] | None = None, *,
    plugins: bool = False,
) -> SupportReport:
    """:func:`check_tensorrt_support`, raising :class:`TensorRTSupportError` (naming the node and the rule) on a
    finding. Called first thing by every engine build, before TensorRT is looked for. Without ``trt_version``:
    the installed TensorRT's version (:func:`installed_tensorrt_version`), else :data:`DEFAULT_TARGETS`.
    """
    if trt_version is None:
        installed = installed_tensorrt_version()
        if installed is not None and MIN_VERSION <= tuple(map(int, installed.split("."))) < (MAX_MAJOR + 1, 0):
            trt_version = installed
    report = check_tensorrt_support(model, trt_version, plugins=plugins)
    report.raise_if_failed()
    return report


def installed_tensorrt_version() -> str | None:
    """The installed TensorRT's MAJOR.MINOR: from package metadata; without any (a system install, e.g. JetPack's
    python3-libnvinfer), from the module's ``__version__`` (imported only when it is there: the build imports it
    next anyway). None when TensorRT is not installed or its version cannot be read."""
    import importlib.util
    from importlib import metadata

    versions = []
    for dist in ("tensorrt", "tensorrt-cu12", "tensorrt-cu13", "tensorrt_lean", "tensorrt-libs"):
        try:
            versions.append(metadata.version(dist))
        except metadata.PackageNotFoundError:
            continue
    if not versions:
        try:
            module = sys.modules.get("tensorrt")
            if module is None and importlib.util.find_spec("tensorrt") is not None:
                import tensorrt as module
            if module is not None:
                versions.append(str(module.__version__))
        except Exception:  # noqa: BLE001  (a broken install: the build's own import says what is wrong)
            return None
    for version in versions:
        parts = version.split(".")
        if len(parts) >= 2 and parts[0].isdigit() and parts[1].isdigit():
            return f"{parts[0]}.{parts[1]}"
    return None
