"""What a benchmark runs: the backends, the target (an artifact, or a checkpoint or preset exported first) and
the rows, one per backend, precision, mode and batch."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from m2f_deploy.errors import InputError
from m2f_deploy.runtime import TASKS

TORCH_BACKENDS = ("transformers", "torch", "torch-compile")
RUNTIME_BACKENDS = ("cpu", "cuda", "ort-tensorrt", "tensorrt")
ALL_BACKENDS = TORCH_BACKENDS + RUNTIME_BACKENDS
DEFAULT_BACKENDS = tuple(b for b in ALL_BACKENDS if b != "torch-compile")
IMAGE_SIZE = (480, 640)  # end-to-end: a 640x480 image, results at its size


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


def plan_rows(
    target: Target, backends: Sequence[str], batches: Sequence[int], *, end_to_end: bool, tasks: Sequence[str]
) -> list[Row]:
    """Every (backend, precision, mode, batch) row, in the order they run: model-only rows at each batch, and with
    ``end_to_end`` one row per task at batch 1."""
    modes = [("model", "")] + ([("end-to-end", task) for task in tasks] if end_to_end else [])
    plan = []
    for backend in backends:
        precisions = ["fp32"] if backend in TORCH_BACKENDS or backend == "tensorrt" else list(target.onnx) or ["fp32"]
        for precision in precisions:
            for mode, task in modes:
                plan += [Row(backend, precision, batch, mode, task) for batch in (batches if mode == "model" else [1])]
    return plan


def check_settings(
    backends: Sequence[str],
    batches: Sequence[int],
    tasks: Sequence[str],
    *,
    runs: int,
    warmup: int,
    rounds: int,
    threads: int | None = None,
) -> None:
    """``InputError`` naming the first unknown backend or task, or a count out of range."""
    from m2f_deploy.processing.postprocess.threads import check_threads

    check_threads(threads, InputError)  # as Segmenter does: 0 is not a thread count, for the torch rows either
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
        from m2f_deploy.checkpoints import save_checkpoint
        from m2f_deploy.modeling import Mask2Former
        from m2f_deploy.presets import preset_config

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
