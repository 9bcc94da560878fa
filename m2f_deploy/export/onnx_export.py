"""torch -> ONNX, staged: prepare -> dummy input -> export -> clean up -> fp16 -> metadata -> validate -> publish.

The graph is published (renamed onto its path) only after every stage passed, so an
interrupted or failed export leaves nothing that looks finished.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import Tensor, nn

import m2f_deploy
from m2f_deploy.artifact import (
    DEFAULT_PREPROCESSING,
    HW_MULTIPLE,
    INPUT_NAME,
    METADATA_KEY,
    OUTPUT_NAMES,
    build_metadata,
)
from m2f_deploy.errors import InputError
from m2f_deploy.export import msda as msda_flavours
from m2f_deploy.modeling import Mask2Former
from m2f_deploy.modeling.swin import SwinLayer, SwinSelfAttention
from m2f_deploy.utils import did_you_mean

log = logging.getLogger("m2f_deploy.export")

EXPORTERS = ("torchscript", "dynamo")
CLEANUPS = ("auto", "ort", "onnxslim", "none")
DEFAULT_OPSET = {"torchscript": 17, "dynamo": 18}  # dynamo emits 18; its down-conversion fails on Pad
MIN_OPSET = 16  # GridSample
EXTERNAL_DATA_THRESHOLD = 1_900_000_000  # protobuf cannot hold 2 GB in one message
MAX_FOLD_ROUNDS = 4  # static-size folding rounds of the clean-up (Swin-T at 384x384 needs 3)


class LogitsOnly(nn.Module):
    """The graph's signature: pixel_values -> (class_queries_logits, masks_queries_logits)."""

    def __init__(self, model: Mask2Former):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: Tensor) -> tuple[Tensor, Tensor]:
        out = self.model(pixel_values)
        return out.class_queries_logits, out.masks_queries_logits


@contextmanager
def inference_graph(model: Mask2Former, static_size: bool = False) -> Iterator[None]:
    """The model as the exported graph computes it: earlier layers' masks only at attention size (see
    :class:`~m2f_deploy.modeling.transformer_decoder.TransformerModule`), Swin's query, key and value as one
    product (see :class:`~m2f_deploy.modeling.swin.SwinSelfAttention`), and for a ``static_size`` its windows
    gathered through constant tables (see :class:`~m2f_deploy.modeling.swin.SwinLayer`). The validation gate
    compares the graph with the reference (transformers' order of operations).
    """
    switches = [(model.model.transformer_module, "low_res_attention_masks")]
    switches += [(m, "fused_qkv") for m in model.modules() if isinstance(m, SwinSelfAttention)]
    if static_size:
        switches += [(m, "static_windows") for m in model.modules() if isinstance(m, SwinLayer)]
    previous = [getattr(m, name) for m, name in switches]
    try:
        for m, name in switches:
            setattr(m, name, True)
        yield
    finally:
        for (m, name), value in zip(switches, previous):
            setattr(m, name, value)


@contextmanager
def stage(name: str) -> Iterator[None]:
    log.info("%s ...", name)
    t0 = time.perf_counter()
    yield
    log.info("%s: done in %.1f s", name, time.perf_counter() - t0)


def default_opset(exporter: str, msda: str) -> int:
    """The exporter's opset, raised to the flavour's first (DeformConv: 19)."""
    return max(DEFAULT_OPSET.get(exporter, 17), msda_flavours.MIN_OPSET.get(msda, MIN_OPSET))


def check_export_args(
    height: int, width: int, batch: int, msda: str, exporter: str, opset: int, *, dynamic_hw: bool = False
) -> None:
    for name, v in (("height", height), ("width", width)):
        if not isinstance(v, int) or v <= 0 or v % HW_MULTIPLE:
            raise InputError(f"{name}={v}: must be a positive multiple of {HW_MULTIPLE}")
    if batch < 1:
        raise InputError(f"batch={batch}: must be at least 1")
    msda_flavours.check_flavour(msda)
    if exporter not in EXPORTERS:
        raise InputError(f"unknown exporter {exporter!r}{did_you_mean(exporter, EXPORTERS)}; choose one of {', '.join(EXPORTERS)}")
    if opset < MIN_OPSET:
        raise InputError(f"opset {opset} is too old: GridSample needs opset {MIN_OPSET} or newer")
    if opset < msda_flavours.MIN_OPSET.get(msda, MIN_OPSET):
        raise InputError(f"opset {opset} is too old for --msda {msda}: it needs opset {msda_flavours.MIN_OPSET[msda]}")
    if dynamic_hw and msda in msda_flavours.STATIC_SIZE_FLAVOURS:
        raise InputError(f"--msda {msda} needs a static size (its sampling geometry becomes node attributes); "
                         "drop --dynamic-shape or use --msda grid_sample")  # fmt: skip


def check_output_path(path: Path) -> None:
    if path.is_dir():
        raise InputError(f"{path}: is a folder; give a file name such as {path / 'model.onnx'}")
    parent = path.parent
    if not parent.is_dir():
        raise InputError(f"{path}: folder {parent} does not exist")
    try:  # a real probe: permission bits say nothing for root or read-only mounts
        fd, probe = tempfile.mkstemp(prefix=".m2f-probe-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise InputError(f"{path}: folder {parent} is not writable ({e.strerror})") from None


def _dynamic_axes(dynamic_batch: bool, dynamic_hw: bool) -> dict[str, dict[int, str]]:
    axes: dict[str, dict[int, str]] = {INPUT_NAME: {}, OUTPUT_NAMES[0]: {}, OUTPUT_NAMES[1]: {}}
    if dynamic_batch:
        for name in axes:
            axes[name][0] = "batch"
    if dynamic_hw:
        axes[INPUT_NAME].update({2: "height", 3: "width"})
        axes[OUTPUT_NAMES[1]].update({2: "mask_height", 3: "mask_width"})
    return axes


def _torchscript(wrapper: nn.Module, x: Tensor, f: Path, opset: int, axes: dict) -> None:
    with warnings.catch_warnings():
        # TracerWarnings (GroupNorm's size check) and the exporter's deprecation notice are expected
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper, (x,), str(f), dynamo=False, opset_version=opset, input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES), dynamic_axes=axes, do_constant_folding=True,
        )  # fmt: skip


def _dynamo(wrapper: nn.Module, x: Tensor, f: Path, opset: int, axes: dict, table: dict) -> None:
    dims = {}
    if 0 in axes[INPUT_NAME]:
        dims[0] = torch.export.Dim("batch", min=1, max=1024)
        if x.shape[0] == 1:  # torch.export specialises axes of size 1: trace at batch 2
            x = torch.cat([x, x])
    if 2 in axes[INPUT_NAME]:
        dims[2] = HW_MULTIPLE * torch.export.Dim("h32", min=1, max=512)
        dims[3] = HW_MULTIPLE * torch.export.Dim("w32", min=1, max=512)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            wrapper, (x,), dynamo=True, opset_version=opset, input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES), dynamic_shapes={"pixel_values": dims} if dims else None,
            custom_translation_table=table or None, verbose=False,
        )  # fmt: skip
    program.save(str(f))


def _name_by_scope(graph: onnx.ModelProto) -> None:
    """Give dynamo-exported nodes TorchScript-style names (``/module/path/node_Mul_3``).

    The dynamo exporter keeps module scopes only in per-node metadata, which clean-up drops; the
    fp16 converter's scope block list reads node names. The bulky metadata (stack traces) goes.
    """
    import ast

    for node in graph.graph.node:
        props = {p.key: p.value for p in node.metadata_props}
        scopes = ast.literal_eval(props.get("pkg.torch.onnx.name_scopes", "[]"))
        modules = [s for s in scopes[:-1] if s]
        if modules:
            node.name = "/" + modules[-1].replace(".", "/") + "/" + node.name
        del node.metadata_props[:]


def _preprocessing(model: Mask2Former, processor: Any) -> dict[str, Any]:
    if processor is None:
        ckpt = getattr(model, "checkpoint", None)
        if ckpt is not None and ckpt.preprocessing is not None:  # a detectron2 file: its model-zoo config's
            return dict(ckpt.preprocessing)
        config = ckpt and ckpt.folder / "preprocessor_config.json"
        if config and config.is_file():
            return json.loads(config.read_text(encoding="utf-8"))
        return dict(DEFAULT_PREPROCESSING)
    return dict(processor) if isinstance(processor, dict) else processor.to_dict()


def _source(model: Mask2Former) -> dict[str, Any]:
    ckpt = getattr(model, "checkpoint", None)
    if ckpt is None:
        return {"checkpoint": None, "sha256": None, "note": "random weights or an in-memory model"}
    from m2f_deploy.utils import sha256_file

    files = {f.name: sha256_file(f) for f in ckpt.weight_files}
    sha256 = files if len(files) > 1 else next(iter(files.values()))
    if ckpt.zoo_config is not None:  # a detectron2 file, read with a model-zoo config
        return {"checkpoint": str(ckpt.weight_files[0]), "sha256": sha256, "zoo_config": ckpt.zoo_config}
    return {"checkpoint": str(ckpt.folder), "sha256": sha256}


def _cleanup(graph: onnx.ModelProto, how: str, workdir: Path) -> onnx.ModelProto:
    """Constant folding and redundant-node removal.

    ``ort``: onnxruntime's offline optimizer at its basic level (standard ONNX ops only), alternating with
    onnx-graphsurgeon's folding of static sizes and constants (:mod:`m2f_deploy.export.static_dims`), while
    something folds. graphsurgeon alone left 1,070 nodes of the tiny test graph, against 917: onnxruntime's
    pass also merges common subexpressions and drops redundant nodes;
    ``onnxslim``: a few hundred nodes fewer, but ~15x slower (32 s against 1.8 s on the Swin-T
    graph at 384x384 on 2 cores). ``auto`` picks ``ort`` unless the graph holds TensorRT plugin
    nodes, which onnxruntime cannot load; then ``onnxslim``.
    """
    if how == "auto":
        has_plugin = any(n.op_type == msda_flavours.PLUGIN_OP for n in graph.graph.node)
        how = "onnxslim" if has_plugin else "ort"
    if how == "onnxslim":
        import onnxslim

        return onnxslim.slim(graph)
    if how == "ort":
        from m2f_deploy.export.static_dims import fold_static_dims

        graph = _ort_basic(graph, workdir)
        # folding a size lets shape inference see through the next Reshape: a few rounds reach every static one
        for _ in range(MAX_FOLD_ROUNDS):
            if graph.ByteSize() >= EXTERNAL_DATA_THRESHOLD:
                break  # (shape inference needs the graph in one protobuf message)
            folded = fold_static_dims(graph)
            if len(folded.graph.node) == len(graph.graph.node):
                break
            graph = _ort_basic(folded, workdir)
        return graph
    return graph


def _ort_basic(graph: onnx.ModelProto, workdir: Path) -> onnx.ModelProto:
    """onnxruntime's offline optimizer at its basic level: constant folding, redundant nodes removed."""
    import onnxruntime

    src, dst = workdir / "cleanup-in.onnx", workdir / "cleanup-out.onnx"
    _save(graph, src)
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(dst)
    if (src.parent / (src.name + ".data")).exists():
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", dst.name + ".data")
    onnxruntime.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])
    return onnx.load(str(dst))


def _opset_of(graph: onnx.ModelProto) -> int:
    return next(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx"))


def _save(model: onnx.ModelProto, f: Path) -> None:
    size = sum(len(t.raw_data) for t in model.graph.initializer)
    if size > EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(
            model, str(f), save_as_external_data=True, all_tensors_to_one_file=True,
            location=f.name + ".data", size_threshold=1024,
        )  # fmt: skip
    else:
        onnx.save_model(model, str(f))


def _with_metadata(graph: onnx.ModelProto, meta: dict[str, Any]) -> onnx.ModelProto:
    del graph.metadata_props[:]
    graph.metadata_props.add(key=METADATA_KEY, value=json.dumps(meta))
    graph.producer_name, graph.producer_version = "m2f-deploy", m2f_deploy.__version__
    return graph


def _publish(tmp: Path, path: Path) -> None:
    data = tmp.with_name(tmp.name + ".data")
    if data.exists():  # the graph refers to its data by the final name: move the data first
        os.replace(data, path.with_name(path.name + ".data"))
    os.replace(tmp, path)


def export_onnx(
    model: Mask2Former,
    path: str | os.PathLike,
    *,
    height: int,
    width: int,
    batch: int = 1,
    dynamic_batch: bool = True,
    dynamic_hw: bool = False,
    msda: str = "grid_sample",
    opset: int | None = None,
    fp16: bool = False,
    processor: Any = None,
    exporter: str = "torchscript",
    cleanup: str = "auto",
    validate: bool = True,
    tolerances: dict[str, float] | None = None,
    seed: int = 0,
    trt_plugin_version: int = msda_flavours.DEFAULT_PLUGIN_VERSION,
    heads: str = "raw",
    head_size: tuple[int, int] | None = None,
    input_dtype: str = "float32",
) -> Path:
    """Export ``model`` to an ONNX file at ``path`` and return the path.

    height, width: the export shape (multiples of 32); with ``dynamic_hw`` any multiple of 32 runs.
    msda: ``grid_sample`` | ``gather`` | ``trt_plugin`` | ``deform_conv`` (static size; the fastest on onnxruntime
    CPU), see :mod:`m2f_deploy.export.msda`.
    exporter: ``torchscript`` (default; see the README for why) or ``dynamo``.
    trt_plugin_version: the ``MultiscaleDeformableAttnPlugin_TRT`` version of ``trt_plugin`` nodes (1: TensorRT 10
    and 11, deprecated from 10.11; 2: TensorRT >= 10.11), recorded in the metadata.
    validate: compare onnxruntime with the model before publishing; a miss raises
    :class:`~m2f_deploy.export.validate.ValidationError` and writes nothing.
    heads: ``raw`` (the logits) or ``semantic`` | ``instance`` | ``panoptic``: that post-process appended to the
    graph (:mod:`m2f_deploy.export.heads`), its maps at ``head_size`` (default: the input size); the logits graph is
    validated against the model, then the fused graph against the numpy post-processing of the logits graph.
    input_dtype: ``float32`` (``pixel_values``) or ``uint8`` (``images`` NHWC uint8 and ``pixel_mask``, normalised
    in the graph: :mod:`m2f_deploy.export.uint8_input`), checked equal to the float graph.
    """
    opset = default_opset(exporter, msda) if opset is None else opset
    path = Path(path)
    check_export_args(height, width, batch, msda, exporter, opset, dynamic_hw=dynamic_hw)
    from m2f_deploy.export.heads import check_head_args

    check_head_args(heads, head_size, dynamic_hw=dynamic_hw)
    from m2f_deploy.export.uint8_input import INPUTS

    if input_dtype not in INPUTS:
        raise InputError(f"unknown input {input_dtype!r}; choose one of {', '.join(INPUTS)}")
    if input_dtype == "uint8" and dynamic_hw:
        raise InputError("--input uint8 needs a static input size (images are copied into its canvas): "
                         "drop --dynamic-shape")  # fmt: skip
    msda_flavours.check_plugin_version(trt_plugin_version)
    if cleanup not in CLEANUPS:
        raise InputError(f"unknown clean-up {cleanup!r}{did_you_mean(cleanup, CLEANUPS)}; choose one of {', '.join(CLEANUPS)}")
    check_output_path(path)
    model = model.eval()
    config = model.config
    axes = _dynamic_axes(dynamic_batch, dynamic_hw)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, height, width, generator=generator, dtype=model.dtype).to(model.device)

    with tempfile.TemporaryDirectory(prefix=".m2f-export-", dir=path.parent) as tmpdir:
        raw = Path(tmpdir) / "raw.onnx"
        with stage(f"export ({exporter}, msda={msda}, opset {opset}, {batch}x3x{height}x{width})"):
            with torch.inference_mode(False), torch.no_grad(), inference_graph(model, not dynamic_hw), \
                    msda_flavours.flavour(msda, opset, trt_plugin_version) as table:
                wrapper = LogitsOnly(model).eval()
                if exporter == "torchscript":
                    _torchscript(wrapper, x, raw, opset, axes)
                else:
                    _dynamo(wrapper, x, raw, opset, axes, table)
        graph = onnx.load(str(raw))
        if exporter == "dynamo":
            _name_by_scope(graph)
        nodes_raw = len(graph.graph.node)
        if cleanup != "none":
            with stage(f"clean-up ({cleanup})"):
                graph = _cleanup(graph, cleanup, Path(tmpdir))
            log.info("nodes: %d -> %d", nodes_raw, len(graph.graph.node))
        if fp16:
            with stage("fp16 conversion"):
                from m2f_deploy.export.fp16 import to_fp16

                graph = to_fp16(graph)
        # TorchScript can leave value_info of undefined element type behind a custom op (seen on the plugin node of
        # the first decoder layer behind a ResNet): optional hints, but onnxruntime refuses a graph holding them
        typed = [v for v in graph.graph.value_info if v.type.tensor_type.elem_type != onnx.TensorProto.UNDEFINED]
        del graph.graph.value_info[:]
        graph.graph.value_info.extend(typed)
        meta = build_metadata(
            id2label=config.id2label, num_queries=config.num_queries, preprocessing=_preprocessing(model, processor),
            height=height, width=width, batch=batch, dynamic_batch=dynamic_batch, dynamic_hw=dynamic_hw,
            msda=msda, precision="fp16" if fp16 else "fp32", source=_source(model),
            exporter={
                "name": exporter, "m2f_deploy": m2f_deploy.__version__, "torch": torch.__version__,
                "onnx": onnx.__version__, "opset": _opset_of(graph), "cleanup": cleanup,
                **({"trt_plugin_version": trt_plugin_version} if msda == "trt_plugin" else {}),
            },
        )  # fmt: skip
        last = heads == "raw" and input_dtype == "float32"
        out = Path(tmpdir) / (path.name if last else f"logits-{path.name}")
        _save(_with_metadata(graph, meta), out)
        if validate:
            from m2f_deploy.export.validate import validate_onnx

            with stage("validation against PyTorch (onnxruntime CPU)"):
                report = validate_onnx(model, out, tolerances=tolerances, seed=seed)
            log.info("\n%s", report.format())
            report.raise_if_failed(path)
        if heads != "raw":
            from m2f_deploy.export.heads import fuse_onnx

            with stage(f"{heads} head (validated against the numpy post-processing)" if validate else f"{heads} head"):
                fused = Path(tmpdir) / (path.name if input_dtype == "float32" else f"fused-{path.name}")
                out = fuse_onnx(out, fused, heads, head_size=head_size, validate=validate, seed=seed)
        if input_dtype == "uint8":
            from m2f_deploy.export.uint8_input import uint8_onnx

            with stage("uint8 input" + (" (checked against the float graph)" if validate else "")):
                out = uint8_onnx(out, Path(tmpdir) / path.name, validate=validate, seed=seed)
        _publish(out, path)
    log.info("wrote %s (%.1f MB)", path, path.stat().st_size / 1e6)
    return path
