"""Running the rows: each backend set up, warmed up and timed, with peak memory and the matmul roofline;
:func:`benchmark` runs a whole plan and returns the report."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from m2f_deploy.artifact import INPUT_NAME
from m2f_deploy.bench.plan import (
    DEFAULT_BACKENDS,
    IMAGE_SIZE,
    TORCH_BACKENDS,
    Row,
    Target,
    check_settings,
    plan_rows,
    prepare_target,
)
from m2f_deploy.bench.report import machine, summarize
from m2f_deploy.errors import InputError, M2FError

log = logging.getLogger("m2f_deploy.bench")


def benchmark(
    source: str | os.PathLike | None = None,
    *,
    preset: str | None = None,
    backends: Sequence[str] = DEFAULT_BACKENDS,
    batches: Sequence[int] = (1,),
    height: int = 384,
    width: int = 384,
    runs: int = 20,
    warmup: int = 3,
    threads: int | None = None,
    fp16: bool = False,
    int8: bool = False,
    calibration: Sequence[Path] = (),
    msda: str = "deform_conv",
    end_to_end: bool = False,
    tasks: Sequence[str] = ("panoptic",),
    rounds: int = 1,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the rows and return the report: ``{"machine", "settings", "matmul_gflops", "gflop", "rows", ...}``.

    ``threads`` reaches torch (``set_num_threads``), onnxruntime (intra-op threads) and our post-processing
    (``ImageProcessor(threads=...)``), not numpy's BLAS: its thread count is read when numpy loads it, before any
    call here (setting ``OMP_NUM_THREADS`` now would do nothing).
    """
    check_settings(backends, batches, tasks, runs=runs, warmup=warmup, rounds=rounds, threads=threads)
    with tempfile.TemporaryDirectory(prefix="m2f-bench-") as tmp:
        target = prepare_target(source, preset=preset, height=height, width=width, fp16=fp16, workdir=Path(tmp),
                                msda=msda, int8=int8, calibration=calibration)  # fmt: skip
        before = matmul_gflops(threads)
        rows = run_rows(target, backends, batches, runs=runs, warmup=warmup, threads=threads, end_to_end=end_to_end,
                        tasks=tasks, rounds=rounds, progress=progress)  # fmt: skip
        after = matmul_gflops(threads)  # measured before and after the rows: the machine's speed may drift
    rates = {name: max(rate, after.get(name, 0.0)) for name, rate in before.items()}
    rate = max(rates.values())
    for row in rows:
        # int8 rows have none: their products run on int8 units, which the float32 roofline does not bound
        if row.status == "ok" and row.mode == "model" and row.precision != "int8" and target.gflop and row.mean_ms:
            row.roofline_share = target.gflop * row.batch / (row.mean_ms / 1000) / rate
    return {
        "machine": machine(),
        "settings": {"source": str(source or preset), "height": target.height, "width": target.width, "runs": runs,
                     "warmup": warmup, "rounds": rounds, "threads": threads, "tasks": list(tasks),
                     "image": list(IMAGE_SIZE),
                     "msda": target.msda or None},
        "matmul_gflops": rate,
        "matmul_gflops_by_library": rates,
        "gflop": target.gflop,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "rows": [asdict(r) for r in rows],
    }  # fmt: skip


def run_rows(
    target: Target,
    backends: Sequence[str],
    batches: Sequence[int],
    *,
    runs: int = 20,
    warmup: int = 3,
    threads: int | None = None,
    end_to_end: bool = False,
    tasks: Sequence[str] = ("panoptic",),
    rounds: int = 1,
    progress: Callable[[str], None] | None = None,
) -> list[Row]:
    """Every (backend, precision, batch) row, model-only, and end-to-end (one row per task) with ``end_to_end``.

    rounds: the whole sequence of rows runs this many times, each row set up afresh and warmed up each time, and
    its ``runs`` timed runs are spread over the rounds. On a machine whose speed drifts (a shared VM: two minutes
    apart, the same matmul ran at 126 and at 240 GFLOP/s here), one pass compares rows measured at different
    speeds; rounds give every row samples from the whole benchmark's duration.
    """
    plan = plan_rows(target, backends, batches, end_to_end=end_to_end, tasks=tasks)
    seconds: dict[int, list[float]] = {i: [] for i in range(len(plan))}
    stages: dict[int, dict[str, float]] = {i: {} for i in range(len(plan))}
    share = [runs // rounds + (r < runs % rounds) for r in range(rounds)]  # timed runs per round, summing to runs
    for round_runs in share:
        for i, row in enumerate(plan):
            if row.status != "ok" or not round_runs:
                continue
            if progress:
                progress(f"{row.backend} {row.precision} {row.mode} {row.task} batch {row.batch}".replace("  ", " "))
            try:
                with _PeakMemory() as peak:
                    times, row_stages = _run_row(row, target, runs=round_runs, warmup=warmup, threads=threads)
                seconds[i] += times
                for k, v in row_stages.items():
                    stages[i][k] = stages[i].get(k, 0.0) + v
                row.peak_host_mb = max(row.peak_host_mb or 0.0, peak.mb or 0.0)
            except M2FError as e:
                row.status, row.reason = "skipped", str(e).splitlines()[0]
            except Exception as e:  # noqa: BLE001  a backend's own failure is a row, not a crash
                row.status, row.reason = "failed", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    for i, row in enumerate(plan):
        if row.status == "ok":
            summarize(row, seconds[i])
            row.stages_ms = {k: 1000 * v / row.runs for k, v in stages[i].items()}
        else:
            row.peak_host_mb = None
    return plan


def _run_row(
    row: Row, target: Target, *, runs: int, warmup: int, threads: int | None
) -> tuple[list[float], dict[str, float]]:
    """Set the row's backend up, warm it up, time ``runs`` runs: -> seconds per run, seconds per stage in all."""
    with ExitStack() as stack:  # what a row opens (a Segmenter's session, post-processing threads) ends with it
        if row.backend in TORCH_BACKENDS:
            fn, stages = _torch_runner(row, target, threads, row.task, stack)
        else:
            fn, stages = _runtime_runner(row, target, threads, row.task, stack)
        for _ in range(warmup):
            fn()
        stages.clear()
        return [_timed_once(fn) for _ in range(runs)], dict(stages)


def _image() -> Any:
    from m2f_deploy.demo import demo_image

    return demo_image(IMAGE_SIZE)


def _runtime_runner(
    row: Row, target: Target, threads: int | None, task: str, stack: ExitStack
) -> tuple[Callable[[], Any], dict]:
    from m2f_deploy.runtime import Segmenter, available_backends

    if row.backend not in available_backends():
        raise InputError(f"{row.backend} is not installed here")
    if row.backend == "tensorrt":
        if target.engine is None:
            raise InputError("needs a TensorRT engine (m2f-export MODEL.onnx builds one)")
        artifact = target.engine
    else:
        if row.precision not in target.onnx:
            raise InputError(f"no {row.precision} ONNX file to run")
        if row.precision == "int8" and row.backend != "cpu":
            raise InputError("the int8 graph is quantized for onnxruntime CPU (m2f-export --int8-target tensorrt "
                             "makes one for TensorRT)")  # fmt: skip
        artifact = target.onnx[row.precision]
    segmenter = stack.enter_context(Segmenter(artifact, row.backend, threads=threads, batch_size=row.batch))
    row.device = segmenter.description
    stages: dict[str, float] = {}
    if segmenter.head and row.mode != "model" and task != segmenter.head:
        raise InputError(f"the artifact returns {segmenter.head} results (a fused head): --task {segmenter.head}")
    if row.mode == "model":
        rng = np.random.default_rng(0)
        if segmenter.uint8:  # m2f-export --input uint8: bytes in
            x = rng.integers(0, 256, (row.batch, target.height, target.width, 3), dtype=np.uint8)
        else:
            x = rng.standard_normal((row.batch, 3, target.height, target.width), dtype=np.float32)
        return (lambda: segmenter.infer(x)), stages
    image = _image()
    return (lambda: segmenter.predict(image, task, timings=stages)), stages


def _torch_runner(
    row: Row, target: Target, threads: int | None, task: str, stack: ExitStack
) -> tuple[Callable[[], Any], dict]:
    if target.model is None:
        raise InputError("needs a checkpoint or preset (an artifact holds no PyTorch model)")
    import torch

    if threads:
        torch.set_num_threads(threads)
    row.device = f"torch {torch.__version__} CPU, {torch.get_num_threads()} threads"
    if row.backend == "transformers":
        model = _transformers_model(target)
        row.device = row.device.replace("torch", "transformers + torch", 1)
    elif row.backend == "torch-compile":
        model = torch.compile(target.model)
    else:
        model = target.model
    stages: dict[str, float] = {}
    if row.mode == "model":
        x = torch.randn(row.batch, 3, target.height, target.width, generator=torch.Generator().manual_seed(0))

        def model_only() -> Any:
            with torch.inference_mode():
                return model(x)

        return model_only, stages
    image = _image()
    if row.backend == "transformers":
        return _transformers_end_to_end(model, target, image, task, stages), stages
    from m2f_deploy.modeling import numpy_logits
    from m2f_deploy.processing import ImageProcessor
    from m2f_deploy.runtime.segmenter import timed

    # post-processes on as many threads as the runtime rows' Segmenter(threads=...): the rows stay comparable
    processor = stack.enter_context(ImageProcessor(canvas=(target.height, target.width), threads=threads))
    post = getattr(processor, f"post_process_{task}_segmentation")

    def ours() -> Any:
        with timed(stages, "preprocess"):
            inputs = processor.preprocess(image)
        with timed(stages, "inference"), torch.inference_mode():
            out = model(torch.from_numpy(inputs[INPUT_NAME]))
        with timed(stages, "postprocess"):
            return post(numpy_logits(out), target_sizes=inputs["original_sizes"], pixel_mask=inputs["pixel_mask"])

    return ours, stages


def _transformers_model(target: Target) -> Any:
    try:
        import transformers
    except ImportError:
        raise InputError("transformers is not installed") from None
    if target.checkpoint is None:
        raise InputError("needs a checkpoint folder for transformers")
    return transformers.Mask2FormerForUniversalSegmentation.from_pretrained(target.checkpoint).eval()


def _transformers_end_to_end(model: Any, target: Target, image: Any, task: str, stages: dict) -> Callable[[], Any]:
    """transformers' own pipeline: its image processor (resized to the export size), model and post-process."""
    import torch
    import transformers

    from m2f_deploy.runtime.segmenter import timed

    processor = transformers.Mask2FormerImageProcessor(size={"height": target.height, "width": target.width})
    post = getattr(processor, f"post_process_{task}_segmentation")
    sizes = [image.size[::-1]]

    def theirs() -> Any:
        with timed(stages, "preprocess"):
            inputs = processor(images=image, return_tensors="pt")
        with timed(stages, "inference"), torch.inference_mode():
            out = model(pixel_values=inputs[INPUT_NAME])
        with timed(stages, "postprocess"):
            return post(out, target_sizes=sizes)

    return theirs


def matmul_gflops(threads: int | None, size: int = 2048, runs: int = 5) -> dict[str, float]:
    """Measured float32 matmul GFLOP/s of each BLAS at hand (numpy's; torch's when torch is imported).

    The roofline the rows are compared with is the best of them: a share against a slow BLAS would flatter every
    row (on one 2-core Xeon, numpy's OpenBLAS did 126 GFLOP/s and torch's MKL 248). With ``threads`` and torch
    imported, numpy's BLAS is left out: it runs at its own thread count, which cannot be changed once loaded, and a
    rate at more threads than the rows use would understate every share.
    """
    import sys

    a = np.random.default_rng(0).standard_normal((size, size), dtype=np.float32)
    products: dict[str, Callable[[], Any]] = {}
    if not (threads and "torch" in sys.modules):
        products["numpy"] = lambda: a @ a
    if "torch" in sys.modules:
        import torch

        if threads:
            torch.set_num_threads(threads)
        t = torch.from_numpy(a)
        products["torch"] = lambda: t @ t
    rates = {}
    for name, product in products.items():
        product()
        best = min(_timed_once(product) for _ in range(runs))
        rates[name] = 2 * size**3 / best / 1e9
    return rates


def _timed_once(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class _PeakMemory:
    """Peak resident memory over a block (Linux: VmHWM after resetting it; elsewhere: the process's peak)."""

    def __enter__(self) -> _PeakMemory:
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass
        return self

    def __exit__(self, *exc: object) -> None:
        self.mb = None
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    self.mb = int(line.split()[1]) / 1024
        except OSError:
            import resource

            self.mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
