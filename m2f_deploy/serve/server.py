"""``m2f-serve``: one artifact served on a real Triton Inference Server, through PyTriton (no torch).

PyTriton starts its bundled ``tritonserver`` and binds a Python function as a model; Triton does the HTTP / gRPC
endpoints, health and readiness (``/v2/health/ready``), metrics and dynamic batching; the function runs
:meth:`~m2f_deploy.runtime.Segmenter.predict` on the images of every request Triton merged into one call. We write
no server of our own. The tensors are described in :mod:`m2f_deploy.serve.protocol`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import sys
import sysconfig
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from m2f_deploy.errors import BackendError, InputError, M2FError
from m2f_deploy.serve import protocol

log = logging.getLogger("m2f_deploy.serve")

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class ServeOptions:
    """What ``m2f-serve`` is asked for (its flags)."""

    host: str = LOOPBACK
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    max_batch: int = 8
    queue_delay_us: int = 0
    instances: int = 1
    tasks: tuple[str, ...] = protocol.TASKS
    model_name: str = protocol.MODEL_NAME
    backend: str = "auto"
    threads: int | None = None
    exit_timeout_s: int = 10

    def check(self) -> ServeOptions:
        for name in ("http_port", "grpc_port", "metrics_port"):
            port = getattr(self, name)
            if not 0 < port < 65536:
                raise InputError(f"--{name.replace('_', '-')} {port}: not a TCP port (1..65535)")
        if len({self.http_port, self.grpc_port, self.metrics_port}) != 3:
            raise InputError("--http-port, --grpc-port and --metrics-port must differ")
        if self.max_batch < 1:
            raise InputError(f"--max-batch {self.max_batch}: at least 1 (1: no batching of requests)")
        if self.queue_delay_us < 0:
            raise InputError(f"--queue-delay-us {self.queue_delay_us}: must be 0 or more")
        if self.instances < 1:
            raise InputError(f"--instances {self.instances}: at least 1")
        if self.exit_timeout_s < 0:
            raise InputError(f"--exit-timeout-s {self.exit_timeout_s}: must be 0 or more")
        for task in self.tasks:
            protocol.check_task(task)
        return self


def python_library_path(env: dict[str, str] | None = None) -> str:
    """``LD_LIBRARY_PATH`` with this interpreter's own ``lib`` folder first.

    Triton's Python backend (which PyTriton's proxy models run in) loads ``libpython`` by name. Where this
    interpreter is not the system's (pyenv, conda, a custom build), it would load the system's libpython, and every
    model fails to load with ``'_thread.RLock' object has no attribute '_recursion_count'``. The server process
    inherits our environment, so this is set before PyTriton starts it.
    """
    env = os.environ if env is None else env
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    parts = [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    if libdir and libdir not in parts:
        parts.insert(0, libdir)
    return os.pathsep.join(parts)


def pytriton_modules() -> Any:
    """PyTriton's ``Triton``, config and ``Tensor`` classes, or one error saying how to install them."""
    try:
        from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
        from pytriton.triton import Triton, TritonConfig
    except ImportError as e:
        raise BackendError(
            f"m2f-serve needs PyTriton ({e}): pip install 'm2f-deploy[serve]' (in its own environment: PyTriton "
            "pins numpy<2)"
        ) from None
    return Triton, TritonConfig, ModelConfig, DynamicBatcher, Tensor


class InferFunction:
    """One model instance: a :class:`~m2f_deploy.runtime.Segmenter` and the requests Triton hands it."""

    def __init__(self, segmenter: Any, tasks: tuple[str, ...]):
        self.segmenter = segmenter
        self.tasks = tasks

    def __call__(self, requests: list[Any]) -> list[dict[str, np.ndarray]]:
        # every image of every request, grouped by (task, thresholds): one predict call per group
        groups: dict[tuple, list[tuple[int, int, Any]]] = {}
        errors: list[list[str]] = []
        counts = []
        for r, request in enumerate(requests):
            images = request["image"]
            count = len(images)
            counts.append(count)
            errors.append([""] * count)
            for i in range(count):
                try:
                    task, thresholds, image = self._item(request, i)
                except M2FError as e:
                    errors[r][i] = str(e)
                    continue
                groups.setdefault((task, *thresholds.values()), []).append((r, i, image))
        results: list[list[Any]] = [[None] * c for c in counts]
        for (task, *values), items in groups.items():
            try:
                out = self.segmenter.predict([im for _, _, im in items], task, **dict(zip(protocol.THRESHOLDS, values)))
            except M2FError as e:
                for r, i, _ in items:
                    errors[r][i] = str(e)
                continue
            for (r, i, _), result in zip(items, out):
                results[r][i] = (task, result)
        return [self._response(res, err) for res, err in zip(results, errors)]

    def _item(self, request: Any, i: int) -> tuple[str, dict[str, float], Any]:
        task = protocol.as_text(request["task"][i])
        if task not in self.tasks:
            served = ", ".join(self.tasks)
            if task in protocol.TASKS:
                raise InputError(f"task {task!r} is not served here (m2f-serve --task); served: {served}")
            raise InputError(f"unknown task {task!r}; choose one of {served}")
        thresholds = {k: float(np.asarray(request[k][i]).reshape(-1)[0]) for k in protocol.THRESHOLDS}
        protocol.check_thresholds(thresholds)
        image = protocol.decode_image(bytes(np.asarray(request["image"][i]).reshape(-1)[0]), f"image {i}")
        return task, thresholds, image

    @staticmethod
    def _response(results: list[Any], errors: list[str]) -> dict[str, np.ndarray]:
        """One request's tensors: each image encoded on its own (a request may mix tasks), maps padded together."""
        encoded = [protocol.encode_results(r[0], [r[1]]) if r is not None else None for r in results]
        sizes = [e[1][0] for e in encoded if e is not None]
        h, w = np.max(sizes, axis=0) if sizes else (1, 1)
        segmentation = np.full((len(results), h, w), protocol.PAD, dtype=np.int64)
        size = np.zeros((len(results), 2), dtype=np.int64)
        info = np.array([[b"[]"]] * len(results), dtype=object).reshape(len(results), 1)
        for i, e in enumerate(encoded):
            if e is not None:
                maps, sizes_i, infos = e
                segmentation[i, : sizes_i[0, 0], : sizes_i[0, 1]] = maps[0]
                size[i], info[i, 0] = sizes_i[0], infos[0].encode()
        error = np.array([[e.encode()] for e in errors], dtype=object).reshape(len(results), 1)
        return {"segmentation": segmentation, "size": size, "segments_info": info, "error": error}


def check_ports_free(options: ServeOptions) -> None:
    """One clear error for a port already taken (Triton itself would only time out at start-up, minutes later)."""
    import socket

    for flag, port in (("--port", options.http_port), ("--grpc-port", options.grpc_port),
                       ("--metrics-port", options.metrics_port)):  # fmt: skip
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is free to listen on
            try:
                s.bind((options.host, port))
            except OSError as e:
                raise InputError(f"{flag} {port}: cannot listen on {options.host}:{port} ({e.strerror or e})") from None


def _tritonclient_errors() -> tuple[type[Exception], ...]:
    try:
        from tritonclient.utils import InferenceServerException
    except ImportError:
        return ()
    return (InferenceServerException,)


def triton_error(error: Exception) -> str:
    """One line from a PyTriton / Triton error, whose text can hold the model's whole traceback: its first line and
    the last exception the traceback names."""
    lines = [line.strip() for line in str(error).replace("\\n", "\n").splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    cause = next((line for line in reversed(lines) if re.match(r"^[A-Za-z_.]*(Error|Exception)\b", line)), "")
    first = lines[0].split(" Traceback")[0]
    return f"{first} ({cause})" if cause and cause not in first else first


def serve(
    artifact: str | os.PathLike,
    options: ServeOptions,
    *,
    ready: Callable[[str], None] | None = None,
    stop_event: threading.Event | None = None,
) -> None:
    """Serve ``artifact`` until SIGINT / SIGTERM (or ``stop_event``); ``ready(message)`` once Triton is ready.

    Triton's log, which PyTriton prints from a thread of its own in chunks that are not whole lines, goes to stderr
    while the server runs, so that a caller's own lines on stdout (``m2f-serve``'s "serving ...") are never cut
    into by it (``ready`` is called inside: print to a stdout saved before).
    """
    from m2f_deploy.runtime import Segmenter

    options.check()
    check_ports_free(options)
    path = Path(artifact)
    Triton, TritonConfig, ModelConfig, DynamicBatcher, Tensor = pytriton_modules()
    from pytriton.exceptions import PyTritonError
    # one Segmenter per instance, each running up to max_batch images at once (fewer on a static-batch artifact)
    segmenters = []
    try:
        for _ in range(options.instances):
            segmenters.append(_segmenter(Segmenter, path, options))
        os.environ["LD_LIBRARY_PATH"] = python_library_path()
        config = TritonConfig(
            http_address=options.host, http_port=options.http_port,
            grpc_address=options.host, grpc_port=options.grpc_port,
            metrics_address=options.host, metrics_port=options.metrics_port,
            exit_on_error=True, log_verbose=0,
            # on SIGINT / SIGTERM Triton waits this long for in-flight requests and for clients' open (keep-alive)
            # connections, then exits anyway; its own default, 30 s, is Kubernetes' whole grace period
            exit_timeout_secs=options.exit_timeout_s,
        )  # fmt: skip
        stop = stop_event or threading.Event()
        previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            try:
                with contextlib.redirect_stdout(sys.stderr), Triton(config=config) as triton:
                    triton.bind(
                        model_name=options.model_name,
                        infer_func=[InferFunction(s, options.tasks) for s in segmenters],
                        inputs=[
                            Tensor(name="image", dtype=bytes, shape=(1,)),
                            Tensor(name="task", dtype=bytes, shape=(1,)),
                            *[Tensor(name=k, dtype=np.float32, shape=(1,)) for k in protocol.THRESHOLDS],
                        ],
                        outputs=[
                            Tensor(name="segmentation", dtype=np.int64, shape=(-1, -1)),
                            Tensor(name="size", dtype=np.int64, shape=(2,)),
                            Tensor(name="segments_info", dtype=bytes, shape=(1,)),
                            Tensor(name="error", dtype=bytes, shape=(1,)),
                        ],
                        config=ModelConfig(
                            max_batch_size=options.max_batch,
                            batcher=DynamicBatcher(max_queue_delay_microseconds=options.queue_delay_us),
                        ),
                        strict=True,
                    )
                    triton.run()
                    if ready:
                        ready(
                            f"serving {path.name} as model '{options.model_name}' ({', '.join(options.tasks)}; "
                            f"max batch {options.max_batch}, queue delay {options.queue_delay_us} us, "
                            f"{options.instances} instance(s), {segmenters[0].description}) on "
                            f"http://{options.host}:{options.http_port} and grpc {options.host}:{options.grpc_port}"
                        )
                    while not stop.wait(0.5):
                        if not triton.is_alive():
                            raise BackendError("the Triton server stopped unexpectedly (see its log above)")
            except M2FError:
                raise
            except (PyTritonError, TimeoutError, OSError) + _tritonclient_errors() as e:
                # the server did not start (a port in use, ...) or the model did not load
                raise BackendError(f"Triton could not start or load the model: {triton_error(e)}") from None
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
    finally:
        for s in segmenters:
            s.close()


def _segmenter(Segmenter: Any, path: Path, options: ServeOptions) -> Any:
    """A Segmenter running up to ``max_batch`` images at once (a static-batch artifact runs its own batch)."""
    return Segmenter(path, options.backend, threads=options.threads, batch_size=options.max_batch)
