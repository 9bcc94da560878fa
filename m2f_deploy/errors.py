"""Typed errors. A user error is one readable line; a traceback means a bug."""

from __future__ import annotations


class M2FError(Exception):
    """Base class of every error m2f-deploy raises on bad input (CLI: one line, exit code 1)."""


class ConfigError(M2FError, ValueError):
    """A config.json / preprocessor_config.json that cannot be used."""


class CheckpointError(M2FError):
    """A checkpoint that cannot be found, read or matched to the model."""


class InputError(M2FError, ValueError):
    """Bad images, arrays or arguments given to the processor or the runtime."""


class BackendError(M2FError):
    """A requested backend (onnxruntime provider, TensorRT, a GPU) is not installed here or cannot start."""


class OutputError(M2FError):
    """An output that cannot be written: a folder that is a file, read-only, full, or in use by another run."""
