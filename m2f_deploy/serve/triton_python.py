"""The pre- and post-processing steps of the Triton ensemble, in plain numpy (no torch, no Triton).

The model repository's Python-backend models (``m2f_preprocess/1/model.py``, ``m2f_postprocess/1/model.py``, written
by :mod:`m2f_deploy.serve.repository`) are thin wrappers: they read the artifact's metadata (copied beside them),
build one of these steps, and call it on each request's tensors. Keeping the work here lets it be tested without a
Triton server, against :meth:`~m2f_deploy.runtime.Segmenter.predict`.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from m2f_deploy.artifact import INPUT_NAME, OUTPUT_NAMES
from m2f_deploy.errors import InputError
from m2f_deploy.processing import ImageProcessor
from m2f_deploy.serve import protocol

METADATA_FILE = "m2f_deploy.json"
"""The artifact's metadata, copied into each Python model's version folder."""


def processor_from_metadata(meta: dict[str, Any]) -> ImageProcessor:
    """The processor ``Segmenter`` would build for this artifact (a fixed canvas for static-size graphs)."""
    inp = meta["input"]
    canvas = None if inp["dynamic_hw"] else (inp["height"], inp["width"])
    return ImageProcessor(**{**meta["preprocessing"], "canvas": canvas})


class Preprocess:
    """``image`` (BYTES ``[B, 1]``, encoded) -> ``pixel_values`` ``[B, 3, H, W]``, ``pixel_mask``, ``original_size``.

    Images of one request are padded to one size (as ``Segmenter`` pads a batch); a dynamic-size graph also gets
    height and width padded to its multiple.
    """

    inputs = ("image",)

    def __init__(self, meta: dict[str, Any]):
        self.meta = meta
        self.processor = processor_from_metadata(meta)
        self.dynamic_hw = meta["input"]["dynamic_hw"]
        self.multiple = meta["input"].get("hw_multiple", 32)

    def __call__(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        blobs = np.asarray(arrays["image"], dtype=object).reshape(-1)
        images = [protocol.decode_image(bytes(b), f"image {i}") for i, b in enumerate(blobs)]
        out = self.processor.preprocess(images)
        pixel_values, pixel_mask = out[INPUT_NAME], out["pixel_mask"]
        if self.dynamic_hw:
            pad_h, pad_w = -pixel_values.shape[2] % self.multiple, -pixel_values.shape[3] % self.multiple
            pixel_values = np.pad(pixel_values, ((0, 0), (0, 0), (0, pad_h), (0, pad_w)))
            pixel_mask = np.pad(pixel_mask, ((0, 0), (0, pad_h), (0, pad_w)))
        sizes = np.asarray(out["original_sizes"], dtype=np.int64).reshape(-1, 2)
        return {
            INPUT_NAME: np.ascontiguousarray(pixel_values, dtype=np.float32),
            "pixel_mask": np.ascontiguousarray(pixel_mask, dtype=np.int64),
            "original_size": sizes,
        }


class Postprocess:
    """The logits, ``pixel_mask``, ``original_size``, ``task`` and the optional thresholds -> ``segmentation`` and
    ``segments_info``.

    ``segmentation``: INT64 ``[B, H, W]`` at the largest image's size, padded with -1 (each image's own size is
    its ``original_size``); ``segments_info``: BYTES ``[B, 1]``, the JSON segment list (``[]`` for semantic).
    ``threshold``, ``mask_threshold``, ``overlap_mask_area_threshold`` (FP32 ``[B, 1]``, each optional: absent,
    :data:`~m2f_deploy.serve.protocol.DEFAULTS`) apply per image.
    """

    inputs = (*OUTPUT_NAMES, "pixel_mask", "original_size", "task", *protocol.THRESHOLDS)

    def __init__(self, meta: dict[str, Any]):
        self.processor = processor_from_metadata(meta)

    def __call__(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tasks = {protocol.as_text(t) for t in np.asarray(arrays["task"], dtype=object).reshape(-1)}
        if len(tasks) != 1:
            raise InputError(f"task: one task per request, got {sorted(tasks)}")
        task = protocol.check_task(tasks.pop())
        sizes = [tuple(int(v) for v in s) for s in np.asarray(arrays["original_size"]).reshape(-1, 2)]
        count = len(sizes)
        values = {}
        for key in protocol.THRESHOLDS:
            given = arrays.get(key)
            column = np.full(count, protocol.DEFAULTS[key]) if given is None else np.asarray(given, np.float64).reshape(-1)
            if column.shape != (count,):
                raise InputError(f"{key}: one value per image ({count}), got {column.size}")
            values[key] = column
        post = getattr(self.processor, f"post_process_{task}_segmentation")
        pixel_mask = np.asarray(arrays["pixel_mask"])
        logits = {name: np.asarray(arrays[name]) for name in OUTPUT_NAMES}
        results = []
        for i in range(count):  # per image: each may carry its own thresholds (the post-process is per image anyway)
            try:  # which image's value is wrong, as Preprocess names the bad image
                thresholds = protocol.check_thresholds({k: float(v[i]) for k, v in values.items()})
            except InputError as e:
                raise InputError(f"image {i}: {e}") from None
            if task == "semantic":
                thresholds = {}  # transformers' semantic post-process takes none
            outputs = {name: value[i : i + 1] for name, value in logits.items()}
            results += post(outputs, target_sizes=[sizes[i]], pixel_mask=pixel_mask[i : i + 1], **thresholds)
        maps, _, infos = protocol.encode_results(task, results)
        return {"segmentation": maps, "segments_info": np.array([[s.encode()] for s in infos], dtype=object)}


def load_metadata(path: str) -> dict[str, Any]:
    """The metadata file a Python model keeps beside itself (``id2label`` keys back to int)."""
    from m2f_deploy.artifact import parse_metadata

    with open(path, encoding="utf-8") as f:
        return parse_metadata(f.read(), path)


# The Python-backend wrapper, written as each model's ``model.py`` with STEP replaced (Triton's documented
# TritonPythonModel interface: initialize / execute / finalize; one response per request, errors per request).
MODEL_PY = '''"""Triton Python-backend model written by m2f-deploy (m2f_deploy.serve.repository): the {step} step.

Needs m2f-deploy importable in Triton's Python environment: pip install m2f-deploy (numpy and Pillow only).
"""

import os

import triton_python_backend_utils as pb_utils

from m2f_deploy.serve.triton_python import METADATA_FILE, {step}, load_metadata


class TritonPythonModel:
    def initialize(self, args):
        folder = os.path.join(args["model_repository"], args["model_version"])
        self.step = {step}(load_metadata(os.path.join(folder, METADATA_FILE)))

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                tensors = {{name: pb_utils.get_input_tensor_by_name(request, name) for name in self.step.inputs}}
                arrays = {{name: t.as_numpy() for name, t in tensors.items() if t is not None}}  # optional ones: None
                out = self.step(arrays)
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(k, v) for k, v in out.items()]))
            except Exception as e:  # one bad request is answered with its error; the others go on
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e))))
        return responses

    def finalize(self):
        self.step = None
'''


def model_py(step: str) -> str:
    if step not in ("Preprocess", "Postprocess"):
        raise ValueError(step)
    return MODEL_PY.format(step=step)


def metadata_json(meta: dict[str, Any]) -> str:
    return json.dumps({**meta, "id2label": {str(k): v for k, v in meta["id2label"].items()}}, indent=1) + "\n"
