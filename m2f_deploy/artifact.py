"""The artifact contract: the ``m2f_deploy`` metadata entry every exported graph carries (no torch).

The runtime needs nothing but the artifact: labels, query count, preprocessing, input size and
dynamic axes, MSDA flavour, precision, outputs, and where it came from.
"""

from __future__ import annotations

from typing import Any

from m2f_deploy.errors import InputError
from m2f_deploy.utils import parse_json_object

METADATA_KEY = "m2f_deploy"
FORMAT_VERSION = 1
INPUT_NAME = "pixel_values"
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
            "hw_multiple": 32,
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
    if meta["format_version"] > FORMAT_VERSION:
        raise InputError(
            f"{where}: metadata format {meta['format_version']} is newer than this m2f-deploy understands "
            f"({FORMAT_VERSION}); upgrade m2f-deploy"
        )
    meta["id2label"] = {int(k): v for k, v in meta["id2label"].items()}
    return meta
