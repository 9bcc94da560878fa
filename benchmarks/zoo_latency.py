"""Model-only CPU latency of architecture presets side by side (the R50 rows of benchmarks/RESULTS.md).

    python benchmarks/zoo_latency.py [--presets swin-tiny-coco-panoptic r50-coco-panoptic] [--size 384]
                                     [--runs 12] [--rounds 3] [--threads 2]

Each preset (random weights, seeded) is exported once with m2f-bench's own preparation (``prepare_target``:
``--msda deform_conv``, static size, dynamic batch; an INT8 graph for onnxruntime CPU calibrated on 8 synthetic
images), then m2f-bench's onnxruntime-CPU rows (fp32 and INT8, batch 1, model only) run in one process, in rounds
that alternate the presets (each row set up afresh and warmed up in every round), so that the machine's drift hits
all rows alike. Prints a markdown table with each row's time as a ratio of the first preset's row of the same
precision.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from m2f_deploy.bench.plan import plan_rows, prepare_target
from m2f_deploy.bench.report import machine, summarize
from m2f_deploy.bench.runners import _run_row, matmul_gflops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["swin-tiny-coco-panoptic", "r50-coco-panoptic"])
    ap.add_argument("--size", type=int, default=384)
    ap.add_argument("--runs", type=int, default=12, help="timed runs per row, spread over the rounds")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="m2f-zoo-bench-") as tmp:
        targets, plans = {}, {}
        for preset in args.presets:
            print(f"exporting {preset} ...", file=sys.stderr, flush=True)
            folder = Path(tmp) / preset
            folder.mkdir()
            targets[preset] = prepare_target(None, preset=preset, height=args.size, width=args.size, fp16=False,
                                             workdir=folder, int8=True)  # fmt: skip
            plans[preset] = plan_rows(targets[preset], ("cpu",), (1,), end_to_end=False, tasks=())
        before = matmul_gflops(args.threads)
        seconds = {(p, i): [] for p in args.presets for i in range(len(plans[p]))}
        per_round = [args.runs // args.rounds + (r < args.runs % args.rounds) for r in range(args.rounds)]
        for runs in per_round:
            for preset in args.presets:
                for i, row in enumerate(plans[preset]):
                    print(f"  {preset} {row.precision} ({runs} runs)", file=sys.stderr, flush=True)
                    times, _ = _run_row(row, targets[preset], runs=runs, warmup=args.warmup, threads=args.threads)
                    seconds[(preset, i)] += times
        after = matmul_gflops(args.threads)
    m = machine()
    print(f"{m['cpu']}, {m['cores']} cores, {args.threads} threads; {time.strftime('%Y-%m-%d %H:%M:%S')}; "
          f"{args.size}x{args.size}, batch 1, model only, msda deform_conv; {args.runs} runs per row in "
          f"{args.rounds} rounds alternating the presets, {args.warmup} warm-up each; fp32 matmul "
          f"{max(before.values()):.0f} GFLOP/s before, {max(after.values()):.0f} after\n")
    print("| preset | GFLOP/image | backend | precision | p50 ms | p90 ms | mean ms | img/s | mean vs first preset |")
    print("|---|---|---|---|---|---|---|---|---|")
    first = {}
    for preset in args.presets:
        for i, row in enumerate(plans[preset]):
            summarize(row, seconds[(preset, i)])
            first.setdefault(row.precision, row.mean_ms)
            gflop = targets[preset].gflop
            print(f"| {preset} | {gflop:.1f} | onnxruntime CPU | {row.precision} | {row.p50_ms:.1f} | {row.p90_ms:.1f} | "
                  f"{row.mean_ms:.1f} | {row.throughput_ips:.2f} | {row.mean_ms / first[row.precision]:.2f}x |")


if __name__ == "__main__":
    main()
