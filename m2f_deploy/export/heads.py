"""In-graph heads: the post-processing appended to the exported graph, so that it returns segmentations.

``m2f-export --heads semantic|instance|panoptic`` exports the logits graph as always (validated against PyTorch),
then appends one of the heads below and checks the fused graph against our numpy post-processing of the logits
graph's outputs on the same inputs (:func:`m2f_deploy.export.validate.validate_head`).

How: each head is a small torch module over the two logits, exported on its own (TorchScript, same opset) and
joined to the logits graph with ``onnx.compose.merge_models`` (the library's graph merge: the logits become
internal tensors). A torch module keeps HF's rule readable next to its reference; the ONNX it gives is plain
(Softmax, Resize, MatMul, TopK, ArgMax, Gather, GatherElements, CumSum, ReduceSum, Where, Equal, Cast), all in
TensorRT's ONNX support (``m2f-export X.onnx --check-tensorrt`` passes on the fused graphs, tested).

The heads follow HF's post-processes with ``target_sizes`` = the head's output size (the input canvas unless
``--head-size`` asks for another), on the working grid HF uses (mask logits resized bilinearly to 384 x 384 first):

``semantic``  outputs ``semantic_map`` ``[B, H, W]`` int32: class ids (softmax without "no object", sigmoid masks,
              class x mask product, bilinear resize, argmax).
``instance``  inputs ``threshold`` ``[B]`` float32. Outputs, K = the query count, ordered by score descending:
              ``instance_scores`` ``[B, K]`` float32 (class probability x mean mask probability, HF's product),
              ``instance_labels`` ``[B, K]`` int32, ``instance_valid`` ``[B, K]`` bool (score >= threshold and the
              mask not empty: HF's segments), ``instance_masks`` ``[B, K, H, W]`` bool (HF's binary masks, nearest
              resize) and ``instance_map`` ``[B, H, W]`` int32 (the rank among valid ones of the best-scoring valid
              instance covering each pixel, -1 for none: HF's ``segmentation``).
``panoptic``  inputs ``threshold``, ``mask_threshold``, ``overlap_threshold`` ``[B]`` float32 and ``fuse_labels``
              ``[B, C]`` bool (HF's ``label_ids_to_fuse`` as a mask over labels). Outputs: ``panoptic_map``
              ``[B, H, W]`` int32 segment ids (0: none), and per query (K = query count, query order):
              ``panoptic_segment_ids`` ``[B, K]`` int32 (0: no segment), ``panoptic_labels`` ``[B, K]`` int32 (-1:
              the query is not kept: "no object" or score <= threshold), ``panoptic_scores`` ``[B, K]`` float32,
              ``panoptic_areas`` ``[B, K]`` int32 (pixels of the segment in the map).

The one step of HF that is not expressed as HF writes it: HF numbers panoptic segments in a loop whose counter is
*set back* to a fused label's earlier id when that label repeats, so a new segment after such a repeat can receive
the id of an earlier, different segment (two segments, one id). The graph gives every new segment its own id
(fused repeats share the first one's). The two numberings differ only in the ids after such a repeat; each graph
id maps to exactly one HF id, and the runtime (:mod:`m2f_deploy.runtime.heads`) renumbers with that map, so
``Segmenter.predict`` gives HF's ids exactly. Everything else (which queries form segments, their labels, scores,
pixels) is computed in parallel exactly as HF's sequential loop decides it: the per-query decisions do not depend
on each other. Float differences (onnxruntime's Resize against torch's interpolate) can move a pixel whose two
best classes or queries tie within float error; the gate measures it.

Thresholds are graph inputs with their defaults in the metadata (``heads.inputs``): they change per call without
a new graph or engine. Every input and output has the batch axis first (Triton's rule for batched models).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from m2f_deploy.artifact import OUTPUT_NAMES
from m2f_deploy.errors import InputError
from m2f_deploy.processing.postprocess.common import WORKING_SIZE
from m2f_deploy.processing.postprocess.resample import nearest

HEADS = ("raw", "semantic", "instance", "panoptic")
"""``--heads`` choices; ``raw`` is the logits graph."""

HEAD_INPUTS: dict[str, dict[str, dict[str, Any]]] = {
    "semantic": {},
    "instance": {"threshold": {"dtype": "float32", "shape": ["batch"], "default": 0.5}},
    "panoptic": {
        "threshold": {"dtype": "float32", "shape": ["batch"], "default": 0.5},
        "mask_threshold": {"dtype": "float32", "shape": ["batch"], "default": 0.5},
        "overlap_threshold": {"dtype": "float32", "shape": ["batch"], "default": 0.8},
        "fuse_labels": {"dtype": "bool", "shape": ["batch", "num_labels"], "default": False},
    },
}
"""Each head's extra graph inputs: dtype, shape (symbolic) and the default the runtime feeds when not told."""


def head_outputs(head: str, num_queries: int, size: tuple[int, int]) -> dict[str, dict[str, Any]]:
    """The fused graph's outputs by name: dtype and shape (``batch`` symbolic), in graph order."""
    h, w = size
    k = num_queries
    table = {
        "semantic": {"semantic_map": ("int32", ["batch", h, w])},
        "instance": {
            "instance_scores": ("float32", ["batch", k]),
            "instance_labels": ("int32", ["batch", k]),
            "instance_valid": ("bool", ["batch", k]),
            "instance_masks": ("bool", ["batch", k, h, w]),
            "instance_map": ("int32", ["batch", h, w]),
        },
        "panoptic": {
            "panoptic_map": ("int32", ["batch", h, w]),
            "panoptic_segment_ids": ("int32", ["batch", k]),
            "panoptic_labels": ("int32", ["batch", k]),
            "panoptic_scores": ("float32", ["batch", k]),
            "panoptic_areas": ("int32", ["batch", k]),
        },
    }[head]
    return {name: {"dtype": dtype, "shape": shape} for name, (dtype, shape) in table.items()}


def _bilinear(x: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x  # HF resizes to the same size too: bilinear (half-pixel) at scale 1 is the identity
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _working_masks(masks: Tensor) -> Tensor:
    return _bilinear(masks, WORKING_SIZE)


class _Nearest(nn.Module):
    """Nearest resize 384 x 384 -> ``size`` as two Gathers of constant index tables: the very source pixels of our
    numpy post-processing (:func:`~m2f_deploy.processing.postprocess.resample.nearest`, torch's rule), not a
    Resize whose float coordinate arithmetic can pick a neighbour at exact multiples."""

    def __init__(self, size: tuple[int, int]):
        super().__init__()
        self.identity = tuple(size) == WORKING_SIZE
        self.register_buffer("rows", torch.from_numpy(nearest(WORKING_SIZE[0], size[0])), persistent=False)
        self.register_buffer("cols", torch.from_numpy(nearest(WORKING_SIZE[1], size[1])), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.identity:
            return x
        return x.index_select(-2, self.rows).index_select(-1, self.cols)


class SemanticHead(nn.Module):
    def __init__(self, size: tuple[int, int], num_queries: int):
        super().__init__()
        self.size = tuple(size)

    def forward(self, classes: Tensor, masks: Tensor) -> Tensor:
        probs = classes.softmax(-1)[..., :-1]  # [B, Q, C]
        mask_probs = _working_masks(masks).sigmoid()  # [B, Q, 384, 384]
        b = classes.shape[0]
        scores = torch.matmul(probs.transpose(1, 2), mask_probs.flatten(2))  # [B, C, 384*384]
        scores = _bilinear(scores.reshape(b, -1, *WORKING_SIZE), self.size)
        return scores.argmax(1).to(torch.int32)


class InstanceHead(nn.Module):
    def __init__(self, size: tuple[int, int], num_queries: int):
        super().__init__()
        self.size = tuple(size)
        self.nearest = _Nearest(size)
        self.k = num_queries

    def forward(self, classes: Tensor, masks: Tensor, threshold: Tensor) -> tuple[Tensor, ...]:
        b, q, c1 = classes.shape
        c = c1 - 1
        scores = classes.softmax(-1)[..., :-1].flatten(1)  # [B, Q*C]
        top_scores, top = scores.topk(self.k, dim=1)  # sorted: largest first, ties by lower index (ONNX TopK)
        labels = top % c
        query = top // c + torch.arange(b).unsqueeze(1) * q  # into the [B*Q] stack of masks
        picked = masks.flatten(0, 1).index_select(0, query.flatten())  # [B*K, h, w]
        mask_logits = _working_masks(picked.unsqueeze(0)).squeeze(0)  # [B*K, 384, 384]
        binary = (mask_logits > 0).float()
        mask_scores = (mask_logits.sigmoid() * binary).sum((1, 2)) / (binary.sum((1, 2)) + 1e-6)
        pred_scores = top_scores * mask_scores.reshape(b, self.k)
        out_masks = self.nearest(mask_logits).reshape(b, self.k, *self.size) > 0  # [B, K, H, W]
        order_scores, order = pred_scores.topk(self.k, dim=1)  # our segment order: score descending
        flat = (order + torch.arange(b).unsqueeze(1) * self.k).flatten()
        out_masks = out_masks.flatten(0, 1).index_select(0, flat).reshape(b, self.k, *self.size)
        out_labels = labels.flatten().index_select(0, flat).reshape(b, self.k)
        nonempty = out_masks.flatten(2).any(2)
        valid = (order_scores >= threshold.unsqueeze(1)) & nonempty
        covered = (out_masks & valid[:, :, None, None]).to(torch.int32)
        first = covered.argmax(1)  # [B, H, W]: the best-scoring valid mask over each pixel (first maximum)
        rank = valid.float().cumsum(1).to(torch.int32) - 1  # [B, K]: rank among the valid ones (CumSum: float in TRT)
        rank_at = torch.gather(rank, 1, first.flatten(1)).reshape(b, *self.size)
        instance_map = torch.where(covered.amax(1) > 0, rank_at, torch.full_like(rank_at, -1))
        return order_scores, out_labels.to(torch.int32), valid, out_masks, instance_map.to(torch.int32)


class PanopticHead(nn.Module):
    def __init__(self, size: tuple[int, int], num_queries: int):
        super().__init__()
        self.size = tuple(size)
        self.k = num_queries
        self.register_buffer("queries", torch.arange(num_queries), persistent=False)
        self.register_buffer("earlier", torch.ones(num_queries, num_queries).tril(-1).bool(), persistent=False)

    def forward(
        self, classes: Tensor, masks: Tensor, threshold: Tensor, mask_threshold: Tensor, overlap_threshold: Tensor,
        fuse_labels: Tensor,
    ) -> tuple[Tensor, ...]:  # fmt: skip
        b, q, c1 = classes.shape
        probs = classes.softmax(-1)
        scores, labels = probs.max(-1)  # [B, Q]
        keep = (labels != c1 - 1) & (scores > threshold.unsqueeze(1))
        mask_probs = _bilinear(_working_masks(masks).sigmoid(), self.size)  # [B, Q, H, W]
        weighted = mask_probs * scores[:, :, None, None]
        owner = torch.where(keep[:, :, None, None], weighted, torch.full_like(weighted, -1.0)).argmax(1)  # [B, H, W]
        owned = owner.unsqueeze(1) == self.queries[None, :, None, None]  # [B, Q, H, W]
        area = owned.flatten(2).sum(2)  # int64
        original = (weighted >= mask_threshold[:, None, None, None]).flatten(2).sum(2)
        ratio = area.float() / original.float().clamp(min=1.0)
        exists = keep & (area > 0) & (original > 0) & (ratio > overlap_threshold.unsqueeze(1))
        # stuff fusion: a fused label's later segments take its first segment's id
        fuse = torch.cat([fuse_labels, torch.zeros_like(fuse_labels[:, :1])], 1)  # "no object" never fuses
        fused = torch.gather(fuse, 1, labels)  # [B, Q]
        same = (labels.unsqueeze(2) == labels.unsqueeze(1)) & exists.unsqueeze(1)  # [B, k, j]: j exists, same label
        repeat = exists & fused & (same & self.earlier.unsqueeze(0)).any(2)
        new = exists & ~repeat
        counter = new.float().cumsum(1).to(torch.int32)  # [B, Q] (TensorRT's CumSum takes floats only)
        first = same.to(torch.int32).argmax(2)  # the first existing query of k's label
        ids = torch.where(new, counter, torch.where(repeat, torch.gather(counter, 1, first), torch.zeros_like(counter)))
        panoptic_map = torch.gather(ids, 1, owner.flatten(1)).reshape(b, *self.size)
        out_labels = torch.where(keep, labels, torch.full_like(labels, -1))
        return (
            panoptic_map.to(torch.int32), ids.to(torch.int32), out_labels.to(torch.int32), scores,
            torch.where(exists, area, torch.zeros_like(area)).to(torch.int32),
        )  # fmt: skip


MODULES = {"semantic": SemanticHead, "instance": InstanceHead, "panoptic": PanopticHead}


def check_head_args(heads: str, head_size: tuple[int, int] | None, *, dynamic_hw: bool, int8: bool = False) -> None:
    """Bad ``--heads`` / ``--head-size`` combinations, before anything slow."""
    if heads not in HEADS:
        from m2f_deploy.utils import did_you_mean

        raise InputError(f"unknown head {heads!r}{did_you_mean(heads, HEADS)}; choose one of {', '.join(HEADS)}")
    if heads == "raw":
        if head_size is not None:
            raise InputError("--head-size is for --heads semantic|instance|panoptic (the size of their maps)")
        return
    if dynamic_hw:
        raise InputError(f"--heads {heads} needs a static input size (the maps' size is fixed): drop --dynamic-shape")
    if int8:
        raise InputError(f"--heads {heads} with --int8 is not supported yet: export the INT8 graph with --heads raw")
    if head_size is not None and (len(head_size) != 2 or min(head_size) < 1):
        raise InputError(f"--head-size {head_size}: give a positive height and width")


def head_metadata(head: str, num_queries: int, size: tuple[int, int], canvas: tuple[int, int]) -> dict[str, Any]:
    """The ``heads`` metadata entry: what the graph returns and takes beyond ``pixel_values``."""
    return {
        "task": head,
        "output_size": list(size),
        "canvas": list(canvas),
        "working_size": list(WORKING_SIZE),
        "inputs": HEAD_INPUTS[head],
        "outputs": head_outputs(head, num_queries, size),
    }


def append_head(
    graph: Any, head: str, *, num_queries: int, num_labels: int, size: tuple[int, int], opset: int, workdir: Any
) -> Any:
    """``graph`` (the logits graph, an ``onnx.ModelProto``) with ``head`` appended: the fused graph."""
    import onnx
    import onnx.compose

    module = MODULES[head](size, num_queries).eval()
    mask_hw = _mask_size(graph)
    batch = 2  # traced at 2: the batch axis stays symbolic
    classes = torch.randn(batch, num_queries, num_labels + 1)
    masks = torch.randn(batch, num_queries, *mask_hw)
    extra_names = list(HEAD_INPUTS[head])
    extra = [_dummy(HEAD_INPUTS[head][n], batch, num_labels) for n in extra_names]
    outputs = list(head_outputs(head, num_queries, size))
    axes = {name: {0: "batch"} for name in [*OUTPUT_NAMES, *extra_names, *outputs]}
    path = workdir / f"head-{head}.onnx"
    import warnings

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, (classes, masks, *extra), str(path), dynamo=False, opset_version=opset,
            input_names=[*OUTPUT_NAMES, *extra_names], output_names=outputs, dynamic_axes=axes,
            do_constant_folding=True,
        )  # fmt: skip
    head_graph = onnx.load(str(path))
    graph = _toposorted(graph)
    head_graph.ir_version = graph.ir_version
    _rename_batch(graph, head_graph)
    merged = onnx.compose.merge_models(
        graph, head_graph, io_map=[(name, name) for name in OUTPUT_NAMES], prefix2="head/",
        outputs=None,
    )  # fmt: skip
    # merge_models prefixes every name of the second graph: give the head's inputs and outputs their own back
    _unprefix(merged, "head/", [*extra_names, *outputs])
    return merged


def _toposorted(graph: Any) -> Any:
    """The graph with its nodes in topological order (merge_models checks it; the fp16 converter appends its input
    casts at the end): onnx-graphsurgeon's sort."""
    import onnx_graphsurgeon as gs

    sorted_graph = gs.export_onnx(gs.import_onnx(graph).toposort())
    sorted_graph.metadata_props.extend(graph.metadata_props)
    return sorted_graph


def _dummy(spec: dict[str, Any], batch: int, num_labels: int) -> Tensor:
    if spec["dtype"] == "bool":
        return torch.zeros(batch, num_labels, dtype=torch.bool)
    return torch.full((batch,), float(spec["default"]))


def _mask_size(graph: Any) -> tuple[int, int]:
    for out in graph.graph.output:
        if out.name == OUTPUT_NAMES[1]:
            dims = out.type.tensor_type.shape.dim
            if dims[2].HasField("dim_value") and dims[3].HasField("dim_value"):
                return dims[2].dim_value, dims[3].dim_value
    raise InputError("the logits graph's mask output has no static height and width: fused heads need a static size")


def _rename_batch(graph: Any, head_graph: Any) -> None:
    """Use the logits graph's name for the batch axis (or its value, for a static batch) in the head too."""
    dim = graph.graph.input[0].type.tensor_type.shape.dim[0]
    for v in [*head_graph.graph.input, *head_graph.graph.output]:
        d = v.type.tensor_type.shape.dim[0]
        if dim.HasField("dim_value"):
            d.dim_value = dim.dim_value
        else:
            d.dim_param = dim.dim_param or "batch"


def _unprefix(model: Any, prefix: str, names: list[str]) -> None:
    rename = {prefix + n: n for n in names}
    g = model.graph
    for v in [*g.input, *g.output]:
        v.name = rename.get(v.name, v.name)
    for node in g.node:
        node.input[:] = [rename.get(x, x) for x in node.input]
        node.output[:] = [rename.get(x, x) for x in node.output]
    for v in g.value_info:
        v.name = rename.get(v.name, v.name)


def fuse_onnx(
    logits_path: Any, path: Any, head: str, *, head_size: tuple[int, int] | None = None, validate: bool = True,
    seed: int = 0,
) -> Any:
    """Write ``path``: the logits graph at ``logits_path`` (from ``m2f-export``) with ``head`` appended, its metadata
    updated (``fused_heads``, ``outputs``, ``heads``), checked against our numpy post-processing of the logits graph
    (a miss raises :class:`~m2f_deploy.export.validate.ValidationError` and writes nothing). Returns ``path``."""
    import logging
    import tempfile
    from pathlib import Path

    import onnx

    from m2f_deploy.artifact import read_onnx_metadata
    from m2f_deploy.export.onnx_export import _publish, _save, _with_metadata, check_output_path

    log = logging.getLogger("m2f_deploy.export")
    logits_path, path = Path(logits_path), Path(path)
    meta = read_onnx_metadata(logits_path)
    inp = meta["input"]
    if meta["fused_heads"]:
        raise InputError(f"{logits_path}: already has a fused head ({meta['fused_heads'][0]}); give a --heads raw graph")
    check_head_args(head, head_size, dynamic_hw=inp["dynamic_hw"], int8=meta["precision"] == "int8")
    if head == "raw":
        raise InputError("--heads raw: the graph is already the logits graph")
    check_output_path(path)
    graph = onnx.load(str(logits_path))
    opset = next(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx"))
    size = tuple(head_size) if head_size else (inp["height"], inp["width"])
    with tempfile.TemporaryDirectory(prefix=".m2f-heads-", dir=path.parent) as tmpdir:
        fused = append_head(graph, head, num_queries=meta["num_queries"], num_labels=len(meta["id2label"]),
                            size=size, opset=opset, workdir=Path(tmpdir))  # fmt: skip
        meta = {**meta, "id2label": {str(k): v for k, v in meta["id2label"].items()}, "fused_heads": [head],
                "heads": head_metadata(head, meta["num_queries"], size, (inp["height"], inp["width"]))}  # fmt: skip
        meta["outputs"] = list(meta["heads"]["outputs"])
        out = Path(tmpdir) / path.name
        _save(_with_metadata(fused, meta), out)
        if validate:
            from m2f_deploy.export.validate import validate_head

            report = validate_head(logits_path, out, seed=seed)
            log.info("%s head against the numpy post-processing:\n%s", head, report.format())
            report.raise_if_failed(path)
        _publish(out, path)
    return path
