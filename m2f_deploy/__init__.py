"""m2f-deploy: Mask2Former from PyTorch to ONNX and TensorRT, with a torch-free runtime.

Importing this package imports nothing heavy: ``m2f_deploy.processing`` and
``m2f_deploy.runtime`` must stay usable on a box without PyTorch, so the torch-backed
names (``load_model``) are resolved lazily on first access.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load_model", "M2FError"]

from m2f_deploy.errors import M2FError


def __getattr__(name: str):
    if name == "load_model":
        from m2f_deploy.checkpoints import load_model

        return load_model
    raise AttributeError(f"module 'm2f_deploy' has no attribute {name!r}")
