"""A small client of ``m2f-serve``: images in, the structures of ``Segmenter.predict`` out (tritonclient, no torch).

    from m2f_deploy.serve import Client
    with Client("127.0.0.1:8000") as client:            # or Client("127.0.0.1:8001", protocol="grpc")
        results = client.predict(["a.jpg", "b.png"], task="panoptic")

Images are sent encoded: a file's own bytes for a path (decoded on the server exactly as ``Segmenter`` decodes a
file), PNG (lossless) for a Pillow image or a uint8 array.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from m2f_deploy.errors import BackendError, InputError, M2FError
from m2f_deploy.serve import protocol

PROTOCOLS = ("http", "grpc")


class ServeError(M2FError):
    """The server answered a request with an error (a bad image, an unknown task, a batch over its maximum)."""


def encode_image(image: Any, name: str = "image") -> bytes:
    """``image`` (a path, encoded bytes, a Pillow image or a uint8 ``[H, W(, C)]`` array) as encoded bytes."""
    from PIL import Image

    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, (str, os.PathLike)):
        try:
            return Path(image).read_bytes()
        except OSError as e:
            raise InputError(f"{image}: cannot read ({e.strerror or e})") from None
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise InputError(f"{name}: arrays are sent as PNG: give uint8 [H, W] or [H, W, C], got {image.dtype} "
                             f"{image.shape}")  # fmt: skip
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise InputError(f"{name}: give a path, encoded bytes, a Pillow image or a uint8 array, not {type(image)}")
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _tritonclient(protocol_name: str) -> Any:
    if protocol_name not in PROTOCOLS:
        raise InputError(f"unknown protocol {protocol_name!r}; choose one of {', '.join(PROTOCOLS)}")
    try:
        if protocol_name == "http":
            import tritonclient.http as module
        else:
            import tritonclient.grpc as module
    except ImportError as e:
        raise BackendError(f"the m2f-serve client needs tritonclient ({e}): pip install 'tritonclient[http,grpc]'") from None
    return module


class Client:
    """Talk to ``m2f-serve`` at ``url`` (``host:port``: the HTTP port, or the gRPC port with ``protocol="grpc"``)."""

    def __init__(self, url: str = "127.0.0.1:8000", *, protocol: str = "http", model: str = protocol.MODEL_NAME,
                 timeout_s: float = 60.0):  # fmt: skip
        self._tc = _tritonclient(protocol)
        self.protocol, self.model, self.url = protocol, model, url
        if protocol == "http":
            self._client = self._tc.InferenceServerClient(url, network_timeout=timeout_s, connection_timeout=timeout_s)
        else:
            self._client = self._tc.InferenceServerClient(url)
        self._timeout_s = timeout_s

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    def ready(self) -> bool:
        """Whether the server and the model are ready (Triton's readiness endpoints); False when unreachable."""
        try:
            return bool(self._client.is_server_ready() and self._client.is_model_ready(self.model))
        except Exception:  # noqa: BLE001 - unreachable or refused: not ready
            return False

    def predict(
        self,
        images: Any,
        task: str = "panoptic",
        *,
        threshold: float = protocol.DEFAULTS["threshold"],
        mask_threshold: float = protocol.DEFAULTS["mask_threshold"],
        overlap_mask_area_threshold: float = protocol.DEFAULTS["overlap_mask_area_threshold"],
    ) -> list[Any]:
        """Results for ``images`` (one or a list), as ``Segmenter.predict`` gives them; one request for them all.

        Raises :class:`ServeError` with the server's message when it refuses the request or an image.
        """
        if not isinstance(task, str):  # the server names unknown task names; a non-string cannot even be sent
            raise InputError(f"task must be one of {', '.join(protocol.TASKS)}, got {task!r}")
        items = list(images) if isinstance(images, (list, tuple)) else [images]
        if not items:
            raise InputError("images is empty")
        blobs = [encode_image(im, f"image {i}") for i, im in enumerate(items)]
        n = len(blobs)
        values = {"threshold": threshold, "mask_threshold": mask_threshold,
                  "overlap_mask_area_threshold": overlap_mask_area_threshold}  # fmt: skip
        arrays = {
            "image": np.array(blobs, dtype=object).reshape(n, 1),
            "task": np.array([task.encode()] * n, dtype=object).reshape(n, 1),
            **{k: np.full((n, 1), v, dtype=np.float32) for k, v in values.items()},
        }
        inputs = []
        for name, array in arrays.items():
            tensor = self._tc.InferInput(name, list(array.shape), "BYTES" if array.dtype == object else "FP32")
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        outputs = [self._tc.InferRequestedOutput(name) for name in protocol.OUTPUTS]
        try:
            if self.protocol == "grpc":
                response = self._client.infer(self.model, inputs, outputs=outputs, client_timeout=self._timeout_s)
            else:
                response = self._client.infer(self.model, inputs, outputs=outputs)
        except Exception as e:  # noqa: BLE001 - tritonclient raises InferenceServerException and transport errors
            raise ServeError(f"{self.url}: {_message(e)}") from None
        return decode_response(task, {name: response.as_numpy(name) for name in protocol.OUTPUTS})


def decode_response(task: str, out: dict[str, np.ndarray]) -> list[Any]:
    """A response's tensors -> one result per image; the first image error raises :class:`ServeError`."""
    errors = [protocol.as_text(e) for e in out["error"].reshape(-1)]
    bad = [e for e in errors if e]
    if bad:
        raise ServeError(bad[0])  # the server's message names the image
    infos = [protocol.as_text(s) for s in out["segments_info"].reshape(-1)]
    return [protocol.decode_result(task, out["segmentation"][i], out["size"][i], infos[i]) for i in range(len(errors))]


def _message(error: Exception) -> str:
    message = getattr(error, "message", None)
    text = message() if callable(message) else str(error)
    return " ".join(str(text).split())


__all__: Sequence[str] = ("Client", "ServeError", "encode_image", "decode_response")
