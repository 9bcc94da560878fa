"""The artifact contract: the ``m2f_deploy`` metadata entry every exported graph carries (no torch).

The runtime needs nothing but the artifact: labels, query count, preprocessing, input size and
dynamic axes, MSDA flavour, precision, outputs, and where it came from.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from m2f_deploy.errors import InputError
from m2f_deploy.utils import parse_json_object

METADATA_KEY = "m2f_deploy"
FORMAT_VERSION = 1
INPUT_NAME = "pixel_values"
"""The graph's input, named as transformers' processor names it: ``preprocess`` returns it under this key too."""
HW_MULTIPLE = 32
"""Height and width of a graph's input are multiples of this: Swin's patch embedding (4) and three patch merges (2
each) reach stride 32, which must divide the input for the feature maps to line up."""
OUTPUT_NAMES = ("class_queries_logits", "masks_queries_logits")
REQUIRED = (
    "format_version", "id2label", "num_queries", "preprocessing", "input", "outputs", "msda",
    "precision", "fused_heads", "source", "exporter",
)  # fmt: skip

# transformers' Mask2FormerImageProcessor defaults, for checkpoints without preprocessor_config.json
DEFAULT_PREPROCESSING: dict[str, Any] = {
    "do_resize": True,
    "size": {"shortest_edge": 800, "longest_edge": 1333},
    "size_divisor": 32,
    "resample": 2,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
    "ignore_index": None,
    "do_reduce_labels": False,
}


def build_metadata(
    *,
    id2label: dict[int, str],
    num_queries: int,
    preprocessing: dict[str, Any],
    height: int,
    width: int,
    batch: int,
    dynamic_batch: bool,
    dynamic_hw: bool,
    msda: str,
    precision: str,
    source: dict[str, Any],
    exporter: dict[str, Any],
    fused_heads: tuple[str, ...] = (),
) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "id2label": {str(k): v for k, v in sorted(id2label.items())},
        "num_labels": len(id2label),
        "num_queries": num_queries,
        "preprocessing": preprocessing,
        "input": {
            "name": INPUT_NAME,
            "layout": "NCHW float32, normalised",
            "batch": batch,
            "height": height,
            "width": width,
            "dynamic_batch": dynamic_batch,
            "dynamic_hw": dynamic_hw,
            "hw_multiple": HW_MULTIPLE,
        },
        "outputs": list(OUTPUT_NAMES),
        "msda": msda,
        "precision": precision,
        "fused_heads": list(fused_heads),
        "source": source,
        "exporter": exporter,
    }


def parse_metadata(text: str | None, where: str) -> dict[str, Any]:
    """Check and return the metadata JSON; ``where`` names the artifact in errors."""
    if text is None:
        raise InputError(f"{where}: no '{METADATA_KEY}' metadata entry (not exported by m2f-export)")
    meta = parse_json_object(text, f"{where}: '{METADATA_KEY}' metadata", InputError)
    missing = [k for k in REQUIRED if k not in meta]
    if missing:
        raise InputError(f"{where}: '{METADATA_KEY}' metadata lacks {', '.join(missing)}")
    _check_types(meta, f"{where}: '{METADATA_KEY}' metadata")
    if meta["format_version"] > FORMAT_VERSION:
        raise InputError(
            f"{where}: metadata format {meta['format_version']} is newer than this m2f-deploy understands "
            f"({FORMAT_VERSION}); upgrade m2f-deploy"
        )
    meta["id2label"] = _id2label(meta["id2label"], f"{where}: '{METADATA_KEY}' metadata")
    return meta


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# what the runtime reads, by JSON type: a wrong type is one error naming the artifact and the key, not a traceback
_TYPES: dict[str, tuple[type, ...]] = {
    "format_version": (int,), "id2label": (dict,), "num_queries": (int,), "preprocessing": (dict,),
    "input": (dict,), "outputs": (list,), "msda": (str,), "precision": (str,), "fused_heads": (list,),
}  # fmt: skip
_INPUT_TYPES: dict[str, tuple[type, ...]] = {
    "batch": (int,), "height": (int,), "width": (int,), "dynamic_batch": (bool,), "dynamic_hw": (bool,),
}  # fmt: skip
_JSON_NAMES = {int: "an integer", dict: "an object", list: "a list", str: "a string", bool: "true or false"}


def _check_types(meta: dict[str, Any], where: str) -> None:
    def check(key: str, value: Any, kinds: tuple[type, ...]) -> None:
        ok = _is_int(value) if kinds == (int,) else isinstance(value, kinds)
        if not ok:
            raise InputError(f"{where}: {key} must be {_JSON_NAMES[kinds[0]]}, got {json.dumps(value)[:60]}")

    for key, kinds in _TYPES.items():
        check(key, meta[key], kinds)
    unknown = [h for h in meta["fused_heads"] if h not in ("semantic", "instance", "panoptic")]
    if unknown:  # else every image fails later with "unknown task"
        raise InputError(f"{where}: fused_heads lists {json.dumps(unknown[0])[:60]}; expected semantic, instance or "
                         "panoptic")  # fmt: skip
    for key, kinds in _INPUT_TYPES.items():
        if key not in meta["input"]:
            raise InputError(f"{where}: input lacks {key}")
        check(f"input.{key}", meta["input"][key], kinds)
    for key in ("batch", "height", "width"):
        if meta["input"][key] < 1:
            raise InputError(f"{where}: input.{key} must be at least 1, got {meta['input'][key]}")
    if "hw_multiple" in meta["input"]:
        check("input.hw_multiple", meta["input"]["hw_multiple"], (int,))
        if meta["input"]["hw_multiple"] < 1:
            raise InputError(f"{where}: input.hw_multiple must be at least 1, got {meta['input']['hw_multiple']}")


def _id2label(raw: dict[str, Any], where: str) -> dict[int, str]:
    """``{"0": "cat", ...}`` -> ``{0: "cat", ...}``: ids 0..N-1, each once, labels strings."""
    out: dict[int, str] = {}
    for key, label in raw.items():
        # "00" is refused too: int() would fold it onto "0" and one of the two labels would silently win
        if not (isinstance(key, str) and key.isascii() and key.isdigit() and key == str(int(key))):
            raise InputError(f"{where}: id2label key {key!r} is not a class id (0, 1, ...)")
        if not isinstance(label, str):
            raise InputError(f"{where}: id2label[{key}] must be a string, got {json.dumps(label)[:60]}")
        out[int(key)] = label
    if not out:
        raise InputError(f"{where}: id2label is empty")
    if sorted(out) != list(range(len(out))):
        gaps = sorted(set(range(max(out) + 1)) - set(out))[:5]
        raise InputError(f"{where}: id2label must name classes 0..{len(out) - 1}; it lacks {gaps}")
    return out


# -- reading the entry back without the onnx package ---------------------------------------------------------------
# A deployment box has onnxruntime or TensorRT, not necessarily ``onnx``; and onnxruntime cannot open a graph whose
# ops it lacks (the TensorRT plugin). So the entry is read straight from the protobuf: ModelProto field 7 is the
# graph, field 14 the repeated metadata_props (StringStringEntryProto: key = field 1, value = field 2).
_GRAPH_FIELD, _METADATA_FIELD = 7, 14
_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5


def _varint(read: Any) -> int | None:
    """A protobuf varint from ``read(1)``; None at a clean end of input."""
    value, shift = 0, 0
    while True:
        byte = read(1)
        if not byte:
            if shift == 0:
                return None
            raise EOFError
        value |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return value
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _fields(data: bytes) -> dict[int, str]:
    """The length-delimited fields 1 and 2 of a small message (a metadata entry)."""
    import io

    stream, out = io.BytesIO(data), {}
    while (key := _varint(stream.read)) is not None:
        field, wire = key >> 3, key & 7
        if wire != _LENGTH:
            raise ValueError("unexpected field type in a metadata entry")
        out[field] = stream.read(_varint(stream.read) or 0).decode("utf-8")
    return out


def read_onnx_metadata_props(path: str | os.PathLike) -> dict[str, str]:
    """The ``metadata_props`` of the ONNX file at ``path`` (the graph is skipped over, not read).

    Raises :class:`InputError` naming the file when it is missing, not an ONNX model, or truncated.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        f = path.open("rb")
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e})") from None
    props: dict[str, str] = {}
    has_graph = False
    with f:
        try:
            while (key := _varint(f.read)) is not None:
                field, wire = key >> 3, key & 7
                if wire == _VARINT:
                    _varint(f.read)
                    continue
                if wire in (_FIXED64, _FIXED32):
                    step = 8 if wire == _FIXED64 else 4
                elif wire == _LENGTH:
                    step = _varint(f.read)
                    if step is None:
                        raise EOFError
                else:
                    raise ValueError(f"wire type {wire}")
                if f.tell() + step > size:
                    raise EOFError
                if field == _METADATA_FIELD:
                    entry = _fields(f.read(step))
                    props[entry.get(1, "")] = entry.get(2, "")
                else:
                    has_graph |= field == _GRAPH_FIELD
                    f.seek(step, os.SEEK_CUR)
        except EOFError:
            raise InputError(f"{path}: truncated ONNX file (it ends inside a field; re-export or re-copy it)") from None
        except (ValueError, UnicodeDecodeError):
            raise InputError(f"{path}: not an ONNX model (cannot parse it as one)") from None
    if not has_graph:
        raise InputError(f"{path}: not an ONNX model (it holds no graph)")
    return props


def read_onnx_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The checked ``m2f_deploy`` metadata of the ONNX file at ``path`` (no onnx package, weights not read)."""
    return parse_metadata(read_onnx_metadata_props(path).get(METADATA_KEY), str(path))


# -- TensorRT engines: a plain serialized engine plus a sidecar JSON -----------------------------------------------
ENGINE_SIDECAR_SUFFIX = ".json"  # model.engine -> model.engine.json


def engine_sidecar_path(engine: str | os.PathLike) -> Path:
    engine = Path(engine)
    return engine.with_name(engine.name + ENGINE_SIDECAR_SUFFIX)


def read_engine_metadata(engine: str | os.PathLike) -> dict[str, Any]:
    """The checked metadata of a TensorRT engine, from its sidecar: the ONNX entry plus a ``tensorrt`` section."""
    engine = Path(engine)
    sidecar = engine_sidecar_path(engine)
    if not engine.is_file():
        raise InputError(f"{engine}: no such file")
    try:
        text = sidecar.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(
            f"{engine}: its sidecar {sidecar.name} is missing (engines are built with m2f-export --engine, "
            "which writes both)"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{sidecar}: cannot read ({e})") from None
    meta = parse_metadata(text, str(sidecar))
    trt = meta.get("tensorrt")
    if not isinstance(trt, dict) or not {"version", "gpu", "compute_capability", "profile"} <= trt.keys():
        raise InputError(f"{sidecar}: no 'tensorrt' section with version, gpu, compute_capability and profile")
    return meta


def check_engine_compatible(
    meta: dict[str, Any],
    where: str,
    *,
    tensorrt_version: str,
    gpu: str,
    compute_capability: str,
) -> None:
    """An engine runs only on the TensorRT version and GPU architecture it was built for: say so before TensorRT does."""
    built = meta["tensorrt"]
    if built["version"] != tensorrt_version:
        raise InputError(
            f"{where}: built with TensorRT {built['version']}, this is TensorRT {tensorrt_version}; "
            "rebuild the engine here (m2f-export MODEL.onnx --engine)"
        )
    if built["compute_capability"] != compute_capability:
        raise InputError(
            f"{where}: built for {built['gpu']} (compute capability {built['compute_capability']}), this GPU is "
            f"{gpu} ({compute_capability}); rebuild the engine on this GPU (m2f-export MODEL.onnx --engine)"
        )
