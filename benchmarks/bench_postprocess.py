"""Post-processing latency: m2f_deploy.processing (numpy) against transformers' Mask2FormerImageProcessor (torch).

    .venv/bin/python benchmarks/bench_postprocess.py            # the table in the issue
    .venv/bin/python benchmarks/bench_postprocess.py --repeats 31 --target 480 640

One image, 100 queries, 133 classes, mask logits 96x128, target size 480x640 (height x width), default
thresholds. Two kinds of logits (``m2f_deploy.processing.synthetic``): "scene" looks like a trained model's
output (stuff regions, overlapping objects, segments found); "noise" is standard-normal (nothing passes a
threshold, so instance and panoptic are trivial for us, and semantic has a boundary at nearly every pixel).
Each implementation runs ``--repeats`` times after a warm-up, in its own block with a pause before it, so that
neither runs while the other's thread pool (torch's OpenMP, numpy's OpenBLAS) is still busy-waiting; the
table shows medians. Prints a markdown table to paste into an issue.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from types import SimpleNamespace

import numpy as np
import torch
import transformers

from m2f_deploy.processing import ImageProcessor
from m2f_deploy.processing.synthetic import synthetic_outputs

TASKS = {
    "semantic": {},
    "instance": {"threshold": 0.5},
    "panoptic": {"threshold": 0.5, "label_ids_to_fuse": set()},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--target", type=int, nargs=2, default=(480, 640), metavar=("HEIGHT", "WIDTH"))
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--classes", type=int, default=133)
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()

    ours = ImageProcessor()
    theirs = transformers.Mask2FormerImageProcessorPil()
    target = [tuple(args.target)]
    rows = []
    for kind in ("scene", "noise"):
        outputs = synthetic_outputs(num_queries=args.queries, num_classes=args.classes, kind=kind, seed=0)
        as_torch = SimpleNamespace(**{k: torch.from_numpy(v) for k, v in outputs.items()})
        for task, kwargs in TASKS.items():
            method = f"post_process_{task}_segmentation"
            ours_call = lambda: getattr(ours, method)(outputs, target_sizes=target, **kwargs)  # noqa: E731
            theirs_call = lambda: getattr(theirs, method)(as_torch, target_sizes=target, **kwargs)  # noqa: E731
            segments = "-" if task == "semantic" else str(len(ours_call()[0]["segments_info"]))
            ours_ms, theirs_ms = _median_ms(ours_call, theirs_call, args.repeats)
            rows.append((task, kind, segments, theirs_ms, ours_ms))

    print(
        f"Post-processing, 1 image, {args.queries} queries, {args.classes} classes, mask logits 96x128, "
        f"target {args.target[0]}x{args.target[1]} (HxW); median of {args.repeats} runs.\n"
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), transformers {transformers.__version__}, numpy {np.__version__}\n"
    )
    print("| post-process | logits | segments | transformers (ms) | m2f_deploy (ms) | speedup |")
    print("|---|---|---:|---:|---:|---:|")
    for task, kind, segments, theirs_ms, ours_ms in rows:
        print(f"| {task} | {kind} | {segments} | {theirs_ms:.1f} | {ours_ms:.1f} | {theirs_ms / ours_ms:.1f}x |")


def _median_ms(ours, theirs, repeats: int) -> tuple[float, float]:
    return _timed(ours, repeats), _timed(theirs, repeats)


def _timed(fn, repeats: int) -> float:
    time.sleep(0.5)  # let the other implementation's worker threads stop spinning
    fn()  # warm-up: caches, allocations
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


if __name__ == "__main__":
    main()
