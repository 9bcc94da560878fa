"""``Segmenter``: an artifact (``.onnx`` or ``.engine``) and images in, segmentation results out, without PyTorch.

Everything it needs comes from the artifact's metadata: the preprocessing, the labels, the input size and which
axes are dynamic. A static-size artifact gets a fixed canvas (each image fitted into H x W keeping its aspect
ratio, then padded; the post-processes crop the padding away before resizing to the image's own size); a
dynamic-size one gets the checkpoint's own resizing, as transformers' processor does it.

A graph exported with ``--heads semantic|instance|panoptic`` returns that task's results itself: ``predict`` feeds
its threshold inputs and only cuts the maps back to each image (:mod:`m2f_deploy.runtime.heads`); one exported with
``--input uint8`` gets the images' bytes in a uint8 canvas, normalised in the graph (no float copy here).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from m2f_deploy.artifact import (
    INPUT_NAME,
    METADATA_KEY,
    OUTPUT_NAMES,
    read_engine_metadata,
    read_onnx_metadata,
)
from m2f_deploy.errors import InputError, M2FError
from m2f_deploy.processing import ImageProcessor
from m2f_deploy.processing.image_processor import POSTPROCESS, check_thresholds
from m2f_deploy.processing.images import flat_list
from m2f_deploy.processing.postprocess.threads import check_threads
from m2f_deploy.runtime import heads, onnxrt
from m2f_deploy.runtime.images import load_image
from m2f_deploy.utils import did_you_mean

log = logging.getLogger("m2f_deploy.runtime")

BACKENDS = ("auto", "tensorrt", *onnxrt.PROVIDERS)
"""``auto``; ``tensorrt`` (native TensorRT, ``.engine`` files); onnxruntime's ``ort-tensorrt``, ``cuda``, ``cpu``."""
TASKS = ("semantic", "instance", "panoptic")


def available_backends() -> list[str]:
    """The backends installed here, fastest first (whether a GPU backend can start is known only on use)."""
    out = []
    try:
        import tensorrt  # noqa: F401

        out.append("tensorrt")
    except ImportError:
        pass
    return out + onnxrt.present()


class Segmenter:
    """Run an exported Mask2Former.

    ``artifact``: an ``.onnx`` file written by ``m2f-export``, or a TensorRT ``.engine`` with its sidecar JSON.
    ``backend``: ``auto`` (the fastest present: native TensorRT for engines; for ONNX onnxruntime's TensorRT, CUDA,
    then CPU provider; the one picked is in :attr:`backend` and logged) or one of :data:`BACKENDS`; a backend that
    is asked for and cannot start raises :class:`~m2f_deploy.errors.BackendError`. ``threads``: onnxruntime's
    intra-op threads (default: its own) and the fast post-processing's (default: 1, the calling thread; the
    ``"reference"`` path ignores it); at least 1 (0 raises: leave it None for the defaults).
    ``postprocess``: ``"fast"`` (default) or ``"reference"`` (HF's post-processing ported literally: slow, exact).
    ``batch_size``: images per run in :meth:`predict` (default: the artifact's export batch; a static-batch
    artifact always runs its own batch, the last one padded). :meth:`close` (or ``with``) ends both.
    """

    def __init__(
        self,
        artifact: str | os.PathLike,
        backend: str = "auto",
        *,
        threads: int | None = None,
        device_id: int = 0,
        batch_size: int | None = None,
        postprocess: str = "fast",
    ):
        path = Path(artifact)
        check_threads(threads, InputError)  # before onnxruntime gets it
        if batch_size is not None and (
            isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
        ):
            raise InputError(f"batch_size must be a positive whole number or None, got {batch_size!r}")
        if postprocess not in POSTPROCESS:
            raise InputError(
                f"unknown postprocess {postprocess!r}{did_you_mean(str(postprocess), POSTPROCESS)}; "
                f"choose one of {', '.join(POSTPROCESS)}"
            )
        if backend not in BACKENDS:
            raise InputError(
                f"unknown backend {backend!r}{did_you_mean(backend, BACKENDS)}; choose one of {', '.join(BACKENDS)}"
            )
        check_artifact_path(path)
        if path.suffix == ".engine":
            self.metadata = read_engine_metadata(path)
            if heads.fused_head(self.metadata):
                raise InputError(f"{path}: an engine with a fused head: the TensorRT runner does not feed the head's "
                                 "inputs yet; run the .onnx with backend 'ort-tensorrt'")  # fmt: skip
            if backend not in ("auto", "tensorrt"):
                raise InputError(f"{path}: a TensorRT engine runs on backend 'tensorrt' only, not {backend!r}")
            from m2f_deploy.runtime.tensorrt import TensorRTRunner

            self._runner = TensorRTRunner(path, self.metadata, device_id=device_id)
        else:
            self.metadata = read_onnx_metadata(path)
            if backend == "tensorrt":
                raise InputError(
                    f"{path}: backend 'tensorrt' runs TensorRT engines; build one with m2f-export {path.name} --engine, "
                    "or run this file with backend 'ort-tensorrt'"
                )
            self._runner = onnxrt.OnnxRuntimeRunner(path, self.metadata, backend, threads=threads, device_id=device_id)
        self._batch_range = self._runner.input_spec.batch
        self.path = path
        self.backend: str = self._runner.backend
        self.id2label: dict[int, str] = self.metadata["id2label"]
        self.uint8: bool = self.metadata["input"].get("dtype") == "uint8"
        """Whether the graph takes uint8 images (``m2f-export --input uint8``): :meth:`predict` then feeds bytes."""
        self.head: str | None = heads.fused_head(self.metadata)
        """The task a fused-head graph returns (``m2f-export --heads``), or None: logits, post-processed here."""
        inp = self.metadata["input"]
        self.dynamic_hw: bool = inp["dynamic_hw"]
        self.input_size: tuple[int, int] = (inp["height"], inp["width"])
        self._hw_multiple = self._runner.input_spec.multiple  # what the runner checks inputs against
        canvas = None if self.dynamic_hw else self.input_size
        try:
            self.processor = ImageProcessor(
                **{**self.metadata["preprocessing"], "canvas": canvas}, postprocess=postprocess, threads=threads
            )
        except M2FError as e:
            self._runner.close()
            raise InputError(f"{path}: the preprocessing in its '{METADATA_KEY}' metadata: {e}") from None
        default = batch_size or max(inp["batch"], self._batch_range[0])
        low, high = self._batch_range
        if not low <= default <= high and low != high:
            raise InputError(f"batch_size={default} is outside what {path.name} runs ({low}..{high})")
        self.batch_size = low if low == high else default
        log.debug("%s: %s", path.name, self._runner.description)

    @property
    def description(self) -> str:
        """What runs the artifact, e.g. ``onnxruntime 1.20.1 CPUExecutionProvider``."""
        return self._runner.description

    def __enter__(self) -> Segmenter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._runner.close()
        self.processor.close()

    # -- raw outputs -----------------------------------------------------------------------------------------------

    def infer(self, pixel_values: np.ndarray, pixel_mask: np.ndarray | None = None, **head_options: Any) -> dict[str, np.ndarray]:
        """Raw outputs by name for ``pixel_values`` ``[B, 3, H, W]`` float32 (normalized, as ``preprocess`` gives);
        for a uint8-input graph (:attr:`uint8`), ``images`` ``[B, H, W, 3]`` uint8 and its ``pixel_mask``
        ``[B, H, W]`` (default: all image), as ``processor.preprocess_uint8`` gives them.

        A fused-head graph's outputs are its head's (:mod:`m2f_deploy.export.heads`); ``head_options`` set its
        inputs (``threshold``, ``mask_threshold``, ``overlap_mask_area_threshold``, ``label_ids_to_fuse``;
        missing ones: the metadata's defaults)."""
        extra = heads.head_inputs(self.metadata, len(pixel_values), **head_options) if self.head else {}
        if self.uint8:
            if pixel_mask is None:
                pixel_mask = np.ones(np.shape(pixel_values)[:3], np.uint8)
            extra = {self.metadata["input"]["mask"]: np.ascontiguousarray(pixel_mask, np.uint8), **extra}
        return self._runner.infer(pixel_values, extra or None)  # checked once, by the runner (runtime/base.py)

    # -- results ---------------------------------------------------------------------------------------------------

    def predict(
        self,
        images: Any,
        task: str = "panoptic",
        *,
        threshold: float = 0.5,
        mask_threshold: float = 0.5,
        overlap_mask_area_threshold: float = 0.8,
        label_ids_to_fuse: Collection[int] | None = None,
        return_coco_annotation: bool = False,
        return_binary_maps: bool = False,
        timings: dict[str, float] | None = None,
        input_data_format: str | None = None,
    ) -> list[Any]:
        """Results for ``images`` (an image file's path, a PIL image, an ``[H, W, 3]`` array, or a list of them).

        The structures are the post-processes' (:class:`~m2f_deploy.processing.ImageProcessor`) at each image's own
        size: semantic ``[H, W]`` int64 class ids; instance and panoptic ``{"segmentation", "segments_info"}``.
        ``timings``, when given, accumulates seconds under ``preprocess``, ``inference`` and ``postprocess``.
        The thresholds are numbers in [0, 1] (checked before any work). PIL images and files are taken upright (their
        EXIF orientation applied); an array whose channel axis could be the first or the last (``[1, W, 3]``) needs
        ``input_data_format`` (``"channels_last"`` or ``"channels_first"``).
        """
        if task not in TASKS:
            raise InputError(f"unknown task {task!r}{did_you_mean(task, TASKS)}; choose one of {', '.join(TASKS)}")
        check_thresholds(threshold=threshold, mask_threshold=mask_threshold,
                         overlap_mask_area_threshold=overlap_mask_area_threshold)  # fmt: skip
        if self.head and task != self.head:
            raise InputError(f"{self.path.name} returns {self.head} results (exported with --heads {self.head}), "
                             f"not {task}: use task {self.head!r} or an artifact exported with --heads raw")  # fmt: skip
        items = [load_image(i) if isinstance(i, (str, os.PathLike)) else i for i in flat_list(images, "images", 3)]
        clock = timings if timings is not None else {}
        results: list[Any] = []
        for start in range(0, len(items), self.batch_size):
            chunk = items[start : start + self.batch_size]
            with timed(clock, "preprocess"):
                if self.uint8:  # bytes into the canvas, no float copy: the graph normalises
                    inputs = self.processor.preprocess_uint8(chunk, input_data_format=input_data_format)
                    pixel_values, pixel_mask = self._fit_batch_uint8(inputs["images"], inputs["pixel_mask"])
                else:
                    inputs = self.processor.preprocess(chunk, input_data_format=input_data_format)
                    pixel_values, pixel_mask = self._fit_batch(inputs[INPUT_NAME], inputs["pixel_mask"])
            feed = {"pixel_mask": pixel_mask} if self.uint8 else {}
            if self.head:
                with timed(clock, "inference"):
                    outputs = self.infer(
                        pixel_values, **feed, threshold=threshold, mask_threshold=mask_threshold,
                        overlap_mask_area_threshold=overlap_mask_area_threshold, label_ids_to_fuse=label_ids_to_fuse,
                    )  # fmt: skip
                with timed(clock, "postprocess"):  # what is left: cut each map back to its image
                    results += heads.decode(
                        self.metadata, {k: v[: len(chunk)] for k, v in outputs.items()},
                        target_sizes=inputs["original_sizes"], pixel_mask=pixel_mask[: len(chunk)],
                        label_ids_to_fuse=label_ids_to_fuse, return_coco_annotation=return_coco_annotation,
                        return_binary_maps=return_binary_maps,
                    )  # fmt: skip
                continue
            with timed(clock, "inference"):
                outputs = self.infer(pixel_values, **feed)
            outputs = {k: v[: len(chunk)] for k, v in outputs.items() if k in OUTPUT_NAMES}
            with timed(clock, "postprocess"):
                common = dict(
                    target_sizes=inputs["original_sizes"],
                    pixel_mask=pixel_mask[: len(chunk)],
                )
                if task == "semantic":
                    results += self.processor.post_process_semantic_segmentation(outputs, **common)
                elif task == "instance":
                    results += self.processor.post_process_instance_segmentation(
                        outputs, threshold, mask_threshold, overlap_mask_area_threshold,
                        return_coco_annotation=return_coco_annotation, return_binary_maps=return_binary_maps,
                        **common,
                    )  # fmt: skip
                else:
                    results += self.processor.post_process_panoptic_segmentation(
                        outputs,
                        threshold,
                        mask_threshold,
                        overlap_mask_area_threshold,
                        label_ids_to_fuse,
                        **common,
                    )
        return results

    def _fit_batch_uint8(self, images: np.ndarray, pixel_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pad the batch to a static batch (the canvas is the graph's size already)."""
        pad_b = max(self._batch_range[0] - len(images), 0)
        if pad_b:
            images = np.pad(images, ((0, pad_b), (0, 0), (0, 0), (0, 0)))
            pixel_mask = np.pad(pixel_mask, ((0, pad_b), (0, 0), (0, 0)))
        return images, pixel_mask

    def _fit_batch(self, pixel_values: np.ndarray, pixel_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pad height and width to the graph's multiple (dynamic size) and the batch to a static batch."""
        b, _, h, w = pixel_values.shape
        m = self._hw_multiple
        pad_h, pad_w = (-h % m, -w % m) if self.dynamic_hw else (0, 0)
        pad_b = max(self._batch_range[0] - b, 0)
        if pad_h or pad_w or pad_b:
            pixel_values = np.pad(pixel_values, ((0, pad_b), (0, 0), (0, pad_h), (0, pad_w)))
            pixel_mask = np.pad(pixel_mask, ((0, pad_b), (0, pad_h), (0, pad_w)))
        return pixel_values, pixel_mask


def check_artifact_path(path: Path) -> None:
    """One :class:`InputError` when ``path`` cannot be an artifact file: missing, a folder, a dangling link."""
    if path.is_dir():
        raise InputError(f"{path}: is a folder, not a file; give the .onnx or .engine file m2f-export wrote")
    if not path.exists():
        raise InputError(f"{path}: {'a dangling link' if path.is_symlink() else 'no such file'}")
    if not path.is_file():
        raise InputError(f"{path}: not a regular file (a FIFO, socket or device)")


@contextmanager
def timed(clock: dict[str, float], key: str) -> Iterator[None]:
    """Add the seconds the ``with`` block takes to ``clock[key]`` (also m2f-bench's stage timer)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        clock[key] = clock.get(key, 0.0) + time.perf_counter() - start
