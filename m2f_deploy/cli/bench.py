"""m2f-bench: latency of an artifact, a checkpoint or a preset on every backend present."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from m2f_deploy.cli.common import Parser, height_width, run, setup_logging
from m2f_deploy.errors import InputError

log = logging.getLogger("m2f_deploy.cli")


def build_parser() -> Parser:
    from m2f_deploy.bench import ALL_BACKENDS, DEFAULT_BACKENDS
    from m2f_deploy.presets import PRESETS
    from m2f_deploy.runtime import TASKS

    p = Parser(
        prog="m2f-bench",
        description="Benchmark Mask2Former latency on every backend present: a table, JSON and an optional plot.",
        epilog="Example: m2f-bench --preset swin-tiny-coco-panoptic --size 384 --threads 2 --end-to-end --json r.json",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("target", nargs="?", help="an .onnx or .engine artifact, or a checkpoint folder (exported first)")
    src.add_argument("--preset", help=f"an architecture with random weights: {', '.join(PRESETS)}")
    p.add_argument(
        "--backends",
        default=",".join(DEFAULT_BACKENDS),
        help=f"comma-separated, from {', '.join(ALL_BACKENDS)} (default: all but torch-compile)",
    )
    p.add_argument("--batch", type=int, nargs="+", default=[1], help="batch sizes of the model-only rows (default: 1)")
    p.add_argument(
        "--size",
        type=int,
        nargs="+",
        default=[384],
        metavar=("H", "W"),
        help="input size for checkpoint and preset targets (default: 384 384)",
    )
    p.add_argument("--runs", type=int, default=20, help="timed runs per row (default: 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs first (default: 3)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the whole sequence of rows this many times, the timed runs spread over them: rows "
                        "compare fairly on a machine whose speed drifts (default: 1)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch, onnxruntime and the post-processing, at least 1 (default: theirs; "
                        "post-processing 1)")  # fmt: skip
    p.add_argument("--fp16", action="store_true", help="also export and run an fp16 ONNX graph")
    p.add_argument("--int8", action="store_true",
                   help="also quantize and run an INT8 graph on onnxruntime CPU (calibrated on --calib, or on 8 "
                        "synthetic images)")
    p.add_argument("--calib", type=Path, metavar="DIR", help="calibration images for --int8")
    p.add_argument("--msda", default="deform_conv",
                   help="MSDA flavour of the exported graphs (default: deform_conv, the fastest on CPU)")
    p.add_argument(
        "--end-to-end",
        action="store_true",
        help="also time a 640x480 image to results (preprocess / inference / postprocess)",
    )
    p.add_argument(
        "--task",
        nargs="+",
        default=["panoptic"],
        choices=TASKS,
        help="the end-to-end tasks, one row each (default: panoptic)",
    )
    p.add_argument("--json", type=Path, help="write the report here")
    p.add_argument("--plot", type=Path, help="write a PNG bar chart here")
    p.add_argument("-q", "--quiet", action="store_true", help="only the table and errors")
    return p  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.quiet)
    height, width = height_width(args.size)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]

    from m2f_deploy.bench import benchmark, format_table, plot
    from m2f_deploy.utils import atomic_write_text

    def progress(what: str) -> None:
        if not args.quiet:
            print(f"m2f-bench: {what} ...", file=sys.stderr, flush=True)

    calibration = []
    if args.calib:
        if not args.int8:
            raise InputError("--calib is for --int8")
        from m2f_deploy.runtime.images import find_images

        calibration = find_images([args.calib])
    report = benchmark(
        args.target, preset=args.preset, backends=backends, batches=args.batch, height=height, width=width,
        runs=args.runs, warmup=args.warmup, rounds=args.rounds, threads=args.threads, fp16=args.fp16, int8=args.int8,
        calibration=calibration, msda=args.msda, end_to_end=args.end_to_end, tasks=args.task, progress=progress,
    )  # fmt: skip
    m = report["machine"]
    gflop = f"{report['gflop']:.3g} GFLOP/image, " if report["gflop"] else ""
    print(f"{report['settings']['source']} at {report['settings']['height']}x{report['settings']['width']}: {gflop}"
          f"matmul {report['matmul_gflops']:.0f} GFLOP/s (best of "
          f"{', '.join(f'{k} {v:.0f}' for k, v in report['matmul_gflops_by_library'].items())}); "
          f"{m['cpu']}, {m['cores']} cores, "
          f"threads {args.threads or 'default'}, {report['date']}\n")  # fmt: skip
    print(format_table(report))
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=1) + "\n")
        log.info("wrote %s", args.json)
    if args.plot:
        log.info("wrote %s", plot(report, args.plot))
    return 0


def entry() -> None:
    sys.exit(run("m2f-bench", main))


if __name__ == "__main__":
    entry()
