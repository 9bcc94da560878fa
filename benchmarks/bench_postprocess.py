"""Post-processing latency: m2f_deploy.processing (numpy) against transformers' Mask2FormerImageProcessor (torch).

    .venv/bin/python benchmarks/bench_postprocess.py            # the table in the issue
    .venv/bin/python benchmarks/bench_postprocess.py --repeats 31 --target 480 640 --rounds 5
    .venv/bin/python benchmarks/bench_postprocess.py --threads 1                  # ours on one thread

One image, 100 queries, 133 classes, mask logits 96x128, target size 480x640 (height x width), default
thresholds. Three kinds of logits (``m2f_deploy.testing.logits``): "scene" looks like a trained model's
output (stuff regions, overlapping objects, segments found); "noise" is standard-normal (nothing passes a
threshold, so instance and panoptic are trivial for us, and semantic has a boundary at nearly every pixel);
"untrained" looks like a random-weight model's (the same class leads everywhere by a small margin: semantic is
mostly decided from bounds, but in this seed's image the two best classes nearly tie and it goes exact).
Each implementation runs ``--repeats`` times after a warm-up, in its own block with a pause before it, so that
neither runs while the other's thread pool (torch's OpenMP, numpy's OpenBLAS) is still busy-waiting. The
blocks alternate ``--rounds`` times (ours, theirs, ours, ...), so that a change of load on the machine hits
both: the table shows medians over all runs, and the speedup is the median over rounds of the ratio of the
two blocks' medians (with its range over rounds). The load average is printed: on a busy machine torch's
threads suffer more than numpy's, so ratios measured there come out high. Ours runs with ``--threads`` (default:
one per core, as torch does; the processor's own default is 1). Prints a markdown table to paste into an issue.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from functools import partial
from types import SimpleNamespace

import numpy as np
import torch
import transformers

from m2f_deploy.processing import ImageProcessor
from m2f_deploy.testing.logits import synthetic_outputs

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
    parser.add_argument("--rounds", type=int, default=3, help="alternating blocks of each implementation")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count(), help="post-processing threads of ours (default: one per core)"
    )
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()

    ours = ImageProcessor(threads=args.threads)
    theirs = transformers.Mask2FormerImageProcessorPil()
    target = [tuple(args.target)]
    load_before = os.getloadavg()[0]
    rows = []
    for kind in ("scene", "noise", "untrained"):
        outputs = synthetic_outputs(num_queries=args.queries, num_classes=args.classes, kind=kind, seed=0)
        as_torch = SimpleNamespace(**{k: torch.from_numpy(v) for k, v in outputs.items()})
        for task, kwargs in TASKS.items():
            method = f"post_process_{task}_segmentation"
            ours_call = partial(getattr(ours, method), outputs, target_sizes=target, **kwargs)
            theirs_call = partial(getattr(theirs, method), as_torch, target_sizes=target, **kwargs)
            segments = "-" if task == "semantic" else str(len(ours_call()[0]["segments_info"]))
            rows.append((task, kind, segments, *_compare(ours_call, theirs_call, args.repeats, args.rounds)))

    print(
        f"Post-processing, 1 image, {args.queries} queries, {args.classes} classes, mask logits 96x128, "
        f"target {args.target[0]}x{args.target[1]} (HxW); {args.rounds} rounds of {args.repeats} runs each.\n"
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), transformers {transformers.__version__}, numpy {np.__version__}, "
        f"m2f_deploy {args.threads} post-processing threads; "
        f"load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after\n"
    )
    print("| post-process | logits | segments | transformers (ms) | m2f_deploy (ms) | speedup | speedup range |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for task, kind, segments, theirs_ms, ours_ms, ratios in rows:
        print(
            f"| {task} | {kind} | {segments} | {theirs_ms:.1f} | {ours_ms:.1f} | {statistics.median(ratios):.1f}x "
            f"| {min(ratios):.1f}-{max(ratios):.1f}x |"
        )


def _compare(ours, theirs, repeats: int, rounds: int) -> tuple[float, float, list[float]]:
    """Median ms of theirs and of ours over all runs, and the ratio of the blocks' medians per round."""
    ours_all, theirs_all, ratios = [], [], []
    for _ in range(rounds):
        ours_times, theirs_times = _timed(ours, repeats), _timed(theirs, repeats)
        ours_all += ours_times
        theirs_all += theirs_times
        ratios.append(statistics.median(theirs_times) / statistics.median(ours_times))
    return statistics.median(theirs_all), statistics.median(ours_all), ratios


def _timed(fn, repeats: int) -> list[float]:
    time.sleep(0.5)  # let the other implementation's worker threads stop spinning
    fn()  # warm-up: caches, allocations
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return times


if __name__ == "__main__":
    main()
