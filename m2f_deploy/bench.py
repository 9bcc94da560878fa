"""Latency benchmarking of every backend present, on one target: an artifact, a checkpoint or a preset.

Each row is one backend at one batch size: warm-up, then timed runs, p50 / p90 / p99 / mean, throughput, peak host
memory over the row (and peak GPU memory where the backend can say), and for end-to-end rows the stage breakdown
(preprocess / inference / postprocess). A backend that is not present, or cannot run this target, is a row with
status ``skipped`` and the reason, never an error. Rows run one after another in this process; peak memory is
reset between rows where Linux allows it (``/proc/self/clear_refs``).

Backends: ``transformers`` (eager, the "before" column; needs transformers and a checkpoint or preset), ``torch``
(our reference model, eager), ``torch-compile`` (only when asked: compiling takes minutes), and the runtime's
``cpu``, ``cuda``, ``ort-tensorrt`` (onnxruntime providers, ONNX) and ``tensorrt`` (engines). A checkpoint or preset
target is exported to a temporary ONNX file first (fp32, and fp16 with ``fp16=True``).
"""

from __future__ import annotations

import logging
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from m2f_deploy.errors import InputError, M2FError

log = logging.getLogger("m2f_deploy.bench")

TORCH_BACKENDS = ("transformers", "torch", "torch-compile")
RUNTIME_BACKENDS = ("cpu", "cuda", "ort-tensorrt", "tensorrt")
ALL_BACKENDS = TORCH_BACKENDS + RUNTIME_BACKENDS
DEFAULT_BACKENDS = tuple(b for b in ALL_BACKENDS if b != "torch-compile")
IMAGE_SIZE = (480, 640)  # end-to-end: a 640x480 image, results at its size
TASKS = ("semantic", "instance", "panoptic")


@dataclass
class Row:
    backend: str
    precision: str
    batch: int
    mode: str  # "model" or "end-to-end"
    task: str = ""  # end-to-end rows: semantic | instance | panoptic
    status: str = "ok"  # ok | skipped | failed
    reason: str = ""
    device: str = ""
    runs: int = 0
    p50_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    mean_ms: float | None = None
    throughput_ips: float | None = None  # images per second
    peak_host_mb: float | None = None
    peak_gpu_mb: float | None = None
    stages_ms: dict[str, float] = field(default_factory=dict)  # end-to-end: mean per run
    roofline_share: float | None = None  # model GFLOP / time / measured matmul GFLOP/s


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default) of already sorted values."""
    return float(np.percentile(np.asarray(sorted_values), q))


def summarize(row: Row, seconds: Sequence[float]) -> Row:
    ms = sorted(1000 * s for s in seconds)
    row.runs = len(ms)
    row.p50_ms, row.p90_ms, row.p99_ms = (percentile(ms, q) for q in (50, 90, 99))
    row.mean_ms = statistics.fmean(ms)
    row.throughput_ips = 1000 * row.batch / row.mean_ms
    return row


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}


def matmul_gflops(threads: int | None, size: int = 2048, runs: int = 5) -> dict[str, float]:
    """Measured float32 matmul GFLOP/s of each BLAS at hand (numpy's; torch's when torch is imported).

    The roofline the rows are compared with is the best of them: a share against a slow BLAS would flatter every
    row (on one 2-core Xeon, numpy's OpenBLAS did 126 GFLOP/s and torch's MKL 248).
    """
    import sys

    a = np.random.default_rng(0).standard_normal((size, size), dtype=np.float32)
    products = {"numpy": lambda: a @ a}
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


@dataclass
class Target:
    """What is benchmarked: an artifact file, or a model (checkpoint or preset) to export and run."""

    onnx: dict[str, Path] = field(default_factory=dict)  # precision -> file
    engine: Path | None = None
    model: Any = None  # our torch model (checkpoint or preset targets)
    checkpoint: Path | None = None  # for transformers' from_pretrained
    height: int = 384
    width: int = 384
    gflop: float | None = None  # per image, at height x width
    msda: str = ""  # the MSDA flavour of the exported graphs


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
    modes = [("model", "")] + ([("end-to-end", task) for task in tasks] if end_to_end else [])
    plan = []
    for backend in backends:
        precisions = ["fp32"] if backend in TORCH_BACKENDS or backend == "tensorrt" else list(target.onnx) or ["fp32"]
        for precision in precisions:
            for mode, task in modes:
                plan += [Row(backend, precision, batch, mode, task) for batch in (batches if mode == "model" else [1])]
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
    if row.backend in TORCH_BACKENDS:
        fn, stages = _torch_runner(row, target, threads, row.task)
    else:
        fn, stages = _runtime_runner(row, target, threads, row.task)
    for _ in range(warmup):
        fn()
    stages.clear()
    return [_timed_once(fn) for _ in range(runs)], dict(stages)


def _image() -> Any:
    from m2f_deploy.demo import demo_image

    return demo_image(IMAGE_SIZE)


def _runtime_runner(row: Row, target: Target, threads: int | None, task: str) -> tuple[Callable[[], Any], dict]:
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
    segmenter = Segmenter(artifact, row.backend, threads=threads, batch_size=row.batch)
    row.device = segmenter.description
    stages: dict[str, float] = {}
    if row.mode == "model":
        x = np.random.default_rng(0).standard_normal((row.batch, 3, target.height, target.width), dtype=np.float32)
        return (lambda: segmenter.infer(x)), stages
    image = _image()
    return (lambda: segmenter.predict(image, task, timings=stages)), stages


def _torch_runner(row: Row, target: Target, threads: int | None, task: str) -> tuple[Callable[[], Any], dict]:
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
    from m2f_deploy.processing import ImageProcessor
    from m2f_deploy.runtime.segmenter import _timed

    processor = ImageProcessor(canvas=(target.height, target.width))
    post = getattr(processor, f"post_process_{task}_segmentation")

    def ours() -> Any:
        with _timed(stages, "preprocess"):
            inputs = processor.preprocess(image)
        with _timed(stages, "inference"), torch.inference_mode():
            out = model(torch.from_numpy(inputs["pixel_values"]))
        with _timed(stages, "postprocess"):
            outputs = {"class_queries_logits": out.class_queries_logits.numpy(),
                       "masks_queries_logits": out.masks_queries_logits.numpy()}  # fmt: skip
            return post(outputs, target_sizes=inputs["original_sizes"], pixel_mask=inputs["pixel_mask"])

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

    from m2f_deploy.runtime.segmenter import _timed

    processor = transformers.Mask2FormerImageProcessor(size={"height": target.height, "width": target.width})
    post = getattr(processor, f"post_process_{task}_segmentation")
    sizes = [image.size[::-1]]

    def theirs() -> Any:
        with _timed(stages, "preprocess"):
            inputs = processor(images=image, return_tensors="pt")
        with _timed(stages, "inference"), torch.inference_mode():
            out = model(pixel_values=inputs["pixel_values"])
        with _timed(stages, "postprocess"):
            return post(out, target_sizes=sizes)

    return theirs


def model_gflop(model: Any, height: int, width: int) -> float | None:
    """GFLOP of one forward pass of ``model`` on one ``height`` x ``width`` image (torch's FLOP counter)."""
    try:
        import torch
        from torch.utils.flop_counter import FlopCounterMode
    except ImportError:
        return None
    counter = FlopCounterMode(display=False)
    # the counter's module tracker hooks into autograd: every tensor needs a grad_fn, so the input requires grad
    x = torch.zeros(1, 3, height, width, requires_grad=True)
    with counter, torch.enable_grad():
        model(x)
    return counter.get_total_flops() / 1e9


def prepare_target(
    source: str | os.PathLike | None,
    *,
    preset: str | None,
    height: int,
    width: int,
    fp16: bool,
    workdir: Path,
    seed: int = 0,
    msda: str = "deform_conv",
    int8: bool = False,
    calibration: Sequence[Path] = (),
) -> Target:
    """The benchmark target: an ``.onnx`` / ``.engine`` as it is; a checkpoint or preset exported into ``workdir``.

    The exports use ``msda`` (default: ``deform_conv``, the fastest on onnxruntime CPU); ``int8`` adds an INT8
    graph for onnxruntime CPU, calibrated on ``calibration`` (default: 8 synthetic images; a preset's random
    weights make any calibration as good as another for latency).
    """
    if source is not None and str(source).endswith((".onnx", ".engine")):
        path = Path(source)
        if not path.is_file():
            raise InputError(f"{path}: no such file")
        if path.suffix == ".engine":
            from m2f_deploy.artifact import read_engine_metadata

            meta = read_engine_metadata(path)
            return Target(engine=path, height=meta["input"]["height"], width=meta["input"]["width"])
        from m2f_deploy.artifact import read_onnx_metadata

        meta = read_onnx_metadata(path)
        return Target(onnx={meta["precision"]: path}, height=meta["input"]["height"], width=meta["input"]["width"])
    from m2f_deploy.export import export_onnx

    if preset:
        from m2f_deploy.modeling import Mask2Former
        from m2f_deploy.presets import preset_config

        from m2f_deploy.checkpoints import save_checkpoint

        model = Mask2Former.random(preset_config(preset), seed=seed)
        # transformers reads the same weights from the Hugging Face format on disk (its in-memory names differ)
        checkpoint = save_checkpoint(model, workdir / "preset-checkpoint")
    else:
        from m2f_deploy import load_model

        model, checkpoint = load_model(source), Path(source)
    target = Target(model=model, checkpoint=checkpoint if checkpoint and checkpoint.is_dir() else None,
                    height=height, width=width, msda=msda)  # fmt: skip
    for precision in ["fp32"] + (["fp16"] if fp16 else []):
        target.onnx[precision] = export_onnx(
            model, workdir / f"model-{precision}.onnx", height=height, width=width, fp16=precision == "fp16", msda=msda
        )
    if int8:
        from m2f_deploy.export.int8 import quantize_int8

        if not calibration:
            from m2f_deploy.data import write_dataset

            calibration = sorted((write_dataset(workdir / "calibration", 8, seed=3, size=(height, width)) /
                                  "images").glob("*.png"))  # fmt: skip
        target.onnx["int8"] = quantize_int8(target.onnx["fp32"], workdir / "model-int8.onnx", calibration,
                                            min_agreement=0.0, target="cpu")  # fmt: skip
    target.gflop = model_gflop(model, height, width)
    return target


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
    """Run the rows and return the report: ``{"machine", "settings", "matmul_gflops", "gflop", "rows", ...}``."""
    unknown = [b for b in backends if b not in ALL_BACKENDS]
    if unknown:
        from m2f_deploy.utils import did_you_mean

        raise InputError(f"unknown backend {unknown[0]!r}{did_you_mean(unknown[0], ALL_BACKENDS)}; "
                         f"choose from {', '.join(ALL_BACKENDS)}")  # fmt: skip
    if runs < 1 or warmup < 0 or any(b < 1 for b in batches) or not 1 <= rounds <= runs:
        raise InputError("runs and batch sizes must be at least 1, warm-up at least 0, rounds from 1 to runs")
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        raise InputError(f"unknown task {bad[0]!r}; choose from {', '.join(TASKS)}")
    if threads:
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
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


def _mode(row: dict[str, Any]) -> str:
    return f"{row['mode']} {row.get('task') or ''}".strip()


def speedups(report: dict[str, Any]) -> dict[int, float]:
    """Row index -> transformers' mean time over the row's (same mode, task and batch), where transformers ran."""
    rows = report["rows"]
    before = {(_mode(r), r["batch"]): r["mean_ms"]
              for r in rows if r["backend"] == "transformers" and r["status"] == "ok"}  # fmt: skip
    return {i: before[(_mode(r), r["batch"])] / r["mean_ms"] for i, r in enumerate(rows)
            if r["status"] == "ok" and (_mode(r), r["batch"]) in before}  # fmt: skip


def format_table(report: dict[str, Any]) -> str:
    """A markdown table of the rows, speed-ups against transformers where it ran."""
    rows = report["rows"]
    speed = speedups(report)
    lines = ["| backend | precision | mode | batch | p50 ms | p90 ms | p99 ms | mean ms | img/s | vs transformers "
             "| roofline | peak host MB | stages ms (pre / inf / post) | on |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for i, r in enumerate(rows):
        if r["status"] != "ok":
            lines.append(f"| {r['backend']} | {r['precision']} | {_mode(r)} | {r['batch']} | "
                         f"{r['status']}: {r['reason']} "
                         "| | | | | | | | | |")  # fmt: skip
            continue
        roof = f"{r['roofline_share']:.0%}" if r["roofline_share"] is not None else ""
        st = r["stages_ms"]
        stages = " / ".join(f"{st[k]:.1f}" for k in ("preprocess", "inference", "postprocess") if k in st)
        lines.append(
            f"| {r['backend']} | {r['precision']} | {_mode(r)} | {r['batch']} | {r['p50_ms']:.1f} | {r['p90_ms']:.1f} "
            f"| {r['p99_ms']:.1f} | {r['mean_ms']:.1f} | {r['throughput_ips']:.2f} | "
            f"{f'{speed[i]:.2f}x' if i in speed else ''} | {roof} | {r['peak_host_mb']:.0f} | {stages} "
            f"| {r['device']} |"
        )
    return "\n".join(lines)


def plot(report: dict[str, Any], path: str | os.PathLike) -> Path:
    """A bar chart (PNG, Pillow only) of the mean latency of every row that ran."""
    from PIL import Image, ImageDraw, ImageFont

    from m2f_deploy.utils import atomic_output

    rows = [r for r in report["rows"] if r["status"] == "ok"]
    if not rows:
        raise InputError("no row ran: nothing to plot")
    font = ImageFont.load_default()
    labels = [f"{r['backend']} {r['precision']} {_mode(r)} b{r['batch']}" for r in rows]
    left, bar, gap, width = 230, 18, 8, 420
    picture = Image.new("RGB", (left + width + 90, 40 + len(rows) * (bar + gap)), "white")
    draw = ImageDraw.Draw(picture)
    draw.text((10, 10), f"mean latency, ms ({report['settings']['source']}, {report['settings']['height']}x"
                        f"{report['settings']['width']})", fill="black", font=font)  # fmt: skip
    longest = max(r["mean_ms"] for r in rows)
    for i, (r, label) in enumerate(zip(rows, labels)):
        y = 35 + i * (bar + gap)
        length = max(1, round(width * r["mean_ms"] / longest))
        draw.text((10, y + 3), label, fill="black", font=font)
        draw.rectangle(
            [left, y, left + length, y + bar], fill=(70, 110, 200) if r["mode"] == "model" else (230, 140, 40)
        )
        draw.text((left + length + 6, y + 3), f"{r['mean_ms']:.1f}", fill="black", font=font)
    path = Path(path)
    with atomic_output(path) as tmp:
        picture.save(tmp, format="PNG")
    return path
