"""``m2f-export --input uint8``: a graph that takes decoded 8-bit images and normalises them itself.

Inputs then are ``images`` ``[B, H, W, 3]`` uint8 (NHWC: as images are decoded; the canvas, zeros on padding) and
``pixel_mask`` ``[B, H, W]`` uint8 (1 on image pixels, 0 on padding), in place of ``pixel_values``; a fused head's
threshold inputs follow them. The runtime resizes on the host (Pillow through uint8, as HF does) and copies bytes
into the canvas (:meth:`~m2f_deploy.processing.ImageProcessor.preprocess_uint8`): no float image is made there.

In the graph each byte becomes the float our processor computes for it, by a lookup in a ``[3 x 256]`` table made
by the processor itself (:meth:`~m2f_deploy.processing.ImageProcessor.uint8_table`: HF's rescale in float64, then
normalize), so the uint8 graph sees bit for bit the ``pixel_values`` the float graph is fed: Cast, Add, Gather,
Where (padding is 0 after normalisation, as the float path pads), Transpose. Metadata: ``input.name`` ``images``,
``input.dtype`` ``uint8``, ``input.layout`` ``NHWC uint8``, ``input.mask`` ``pixel_mask``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from m2f_deploy.artifact import INPUT_NAME
from m2f_deploy.errors import InputError

log = logging.getLogger("m2f_deploy.export")

INPUTS = ("float32", "uint8")
IMAGES, MASK = "images", "pixel_mask"


class Uint8Input(nn.Module):
    """``images`` uint8 NHWC and ``pixel_mask`` -> ``pixel_values`` float32 NCHW, through the processor's table."""

    def __init__(self, table: np.ndarray):
        super().__init__()
        self.register_buffer("table", torch.from_numpy(np.ascontiguousarray(table, np.float32).reshape(-1)))
        self.register_buffer("offsets", torch.arange(3) * 256)

    def forward(self, images: Tensor, pixel_mask: Tensor) -> Tensor:
        values = self.table[images.long() + self.offsets]  # [B, H, W, 3]
        inside = pixel_mask.to(torch.bool).unsqueeze(-1)  # cast first: TensorRT takes UINT8 only at the graph's edge
        values = torch.where(inside, values, torch.zeros_like(values))
        return values.permute(0, 3, 1, 2)


def _processor(meta: dict[str, Any]) -> Any:
    from m2f_deploy.processing import ImageProcessor

    inp = meta["input"]
    return ImageProcessor(**{**meta["preprocessing"], "canvas": (inp["height"], inp["width"])})


def prepend_uint8(graph: Any, table: np.ndarray, *, height: int, width: int, opset: int, workdir: Path) -> Any:
    """``graph`` (an ``onnx.ModelProto`` taking ``pixel_values``) behind :class:`Uint8Input`."""
    import warnings

    import onnx
    import onnx.compose

    from m2f_deploy.export.heads import _rename_batch, _toposorted, _unprefix

    path = workdir / "uint8-input.onnx"
    batch = 2
    images = torch.zeros(batch, height, width, 3, dtype=torch.uint8)
    mask = torch.ones(batch, height, width, dtype=torch.uint8)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Uint8Input(table).eval(), (images, mask), str(path), dynamo=False, opset_version=opset,
            input_names=[IMAGES, MASK], output_names=[INPUT_NAME],
            dynamic_axes={IMAGES: {0: "batch"}, MASK: {0: "batch"}, INPUT_NAME: {0: "batch"}},
        )  # fmt: skip
    prefix = onnx.load(str(path))
    graph = _toposorted(graph)
    prefix.ir_version = graph.ir_version
    _rename_batch(graph, prefix)
    merged = onnx.compose.merge_models(prefix, graph, io_map=[(INPUT_NAME, INPUT_NAME)], prefix1="input/")
    _unprefix(merged, "input/", [IMAGES, MASK])
    return merged


def uint8_onnx(source: Any, path: Any, *, validate: bool = True, seed: int = 0) -> Path:
    """Write ``path``: the float-input artifact at ``source`` behind the uint8 input; checked (outputs equal to the
    float graph's on the same seeded images) unless ``validate`` is False. Returns ``path``."""
    import tempfile

    import onnx

    from m2f_deploy.artifact import read_onnx_metadata
    from m2f_deploy.export.onnx_export import _publish, _save, _with_metadata, check_output_path

    source, path = Path(source), Path(path)
    meta = read_onnx_metadata(source)
    inp = meta["input"]
    if inp.get("dtype") == "uint8":
        raise InputError(f"{source}: already takes uint8 images")
    if inp["dynamic_hw"]:
        raise InputError("--input uint8 needs a static input size (the canvas images are copied into): "
                         "drop --dynamic-shape")  # fmt: skip
    check_output_path(path)
    graph = onnx.load(str(source))
    opset = next(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx"))
    processor = _processor(meta)
    with tempfile.TemporaryDirectory(prefix=".m2f-uint8-", dir=path.parent) as tmpdir:
        merged = prepend_uint8(graph, processor.uint8_table(), height=inp["height"], width=inp["width"], opset=opset,
                               workdir=Path(tmpdir))  # fmt: skip
        meta = {**meta, "id2label": {str(k): v for k, v in meta["id2label"].items()}}
        meta["input"] = {**inp, "name": IMAGES, "dtype": "uint8", "layout": "NHWC uint8, normalised in the graph",
                         "mask": MASK}  # fmt: skip
        out = Path(tmpdir) / path.name
        _save(_with_metadata(merged, meta), out)
        if validate:
            problem = compare_uint8(source, out, processor, seed=seed)
            if problem:
                from m2f_deploy.export.validate import ValidationError

                raise ValidationError(f"{path}: the uint8-input graph differs from the float graph: {problem} "
                                      "(nothing was written; --no-validate skips this gate)")  # fmt: skip
            log.info("uint8 input: outputs equal to the float graph's")
        _publish(out, path)
    return path


def compare_uint8(float_path: Path, uint8_path: Path, processor: Any, *, seed: int = 0) -> str | None:
    """Feed the same seeded images (one filling the canvas, one smaller: padding) to both graphs; None when every
    output is equal (float outputs within 1e-5, integer and bool ones exactly), else what differs."""
    from m2f_deploy.artifact import read_onnx_metadata
    from m2f_deploy.export.validate import session
    from m2f_deploy.runtime.heads import head_inputs

    meta = read_onnx_metadata(uint8_path)
    h, w = processor.settings.canvas
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8), rng.integers(0, 256, (h // 2 + 1, w, 3), dtype=np.uint8)]
    as_bytes = processor.preprocess_uint8(images)
    as_float = processor.preprocess(images)
    extra = head_inputs(meta, len(images)) if meta["fused_heads"] else {}
    a_sess, b_sess = session(float_path, meta["msda"]), session(uint8_path, meta["msda"])
    a = a_sess.run(None, {INPUT_NAME: as_float[INPUT_NAME], **extra})
    b = b_sess.run(None, {IMAGES: as_bytes[IMAGES], MASK: as_bytes[MASK], **extra})
    for out, x, y in zip(a_sess.get_outputs(), a, b, strict=True):
        if x.shape != y.shape:
            return f"{out.name} has shape {y.shape}, not {x.shape}"
        if x.dtype.kind == "f":
            err = float(np.abs(x.astype(np.float32) - y.astype(np.float32)).max())
            if err > 1e-5:
                return f"{out.name} differs by up to {err:.3g}"
        elif not np.array_equal(x, y):
            return f"{out.name} differs at {int((x != y).sum())} places"
    return None
