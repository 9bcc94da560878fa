"""torch -> ONNX (MSDA flavours, fp16), ONNX -> TensorRT, validation against the reference.

Names are resolved lazily, so that the torch-free modules here (``agreement``) import without torch.
"""

from __future__ import annotations

__all__ = ["export_onnx", "validate_onnx"]


def __getattr__(name: str):
    if name == "export_onnx":
        from m2f_deploy.export.onnx_export import export_onnx

        return export_onnx
    if name == "validate_onnx":
        from m2f_deploy.export.validate import validate_onnx

        return validate_onnx
    raise AttributeError(f"module 'm2f_deploy.export' has no attribute {name!r}")
