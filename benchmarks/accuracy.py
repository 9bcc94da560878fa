"""Accuracy and CPU latency of every exported variant of a checkpoint: PyTorch fp32, ONNX fp32 / fp16 / int8.

    .venv/bin/python benchmarks/accuracy.py checkpoints/shapes-demo --images 200 --threads 2

Writes a held-out synthetic dataset (seed 2: neither the training data, seed 0, nor the validation used while
training, seed 1), calibration images (seed 3), exports the three ONNX variants with ``m2f-export``, runs
``m2f-validate`` on each (PQ, mIoU, mask AP, agreement with PyTorch), times the model alone (``m2f-bench`` for
PyTorch eager; the three graphs on onnxruntime CPU in alternating rounds in one process, through m2f-bench's
``run_rows``), and prints a markdown table for benchmarks/RESULTS.md. The exports and the validation run through
the installed commands, the way a user would run them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HELD_OUT_SEED, CALIBRATION_SEED = 2, 3


def cpu_name() -> str:
    from m2f_deploy.bench import machine

    return machine()["cpu"]


def cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", *args], check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--images", type=int, default=200, help="held-out images (default: 200)")
    ap.add_argument("--calib", type=int, default=32, help="calibration images for int8 (default: 32)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=30, help="timed runs of the latency rows")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of the ONNX latency rows (default 3)")
    ap.add_argument("--work", type=Path, default=None, help="keep the data and graphs here (default: a temp folder)")
    ap.add_argument("--msda", default="deform_conv",
                    help="MSDA flavour of the fp32 and int8 exports (default: deform_conv, the CPU's)")
    ap.add_argument("--fp16-msda", default="grid_sample",
                    help="MSDA flavour of the fp16 export, a GPU format (default: grid_sample)")
    args = ap.parse_args()

    from m2f_deploy.data import write_dataset
    from m2f_deploy.processing import ImageProcessor

    size = ImageProcessor.from_pretrained(args.checkpoint).size
    height, width = (size["height"], size["width"]) if "height" in size else (size["shortest_edge"],) * 2
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        data, calib = work / "heldout", work / "calib"
        if not data.exists():
            write_dataset(data, args.images, seed=HELD_OUT_SEED, size=(height, width))
        if not calib.exists():
            write_dataset(calib, args.calib, seed=CALIBRATION_SEED, size=(height, width))
        graphs = {
            "ONNX fp32": work / "model.onnx",
            "ONNX fp16": work / "model-fp16.onnx",
            "ONNX int8": work / "model-int8.onnx",
        }
        common = [str(args.checkpoint), "--size", str(height), str(width), "-q"]
        cli("m2f_deploy.cli.export", *common, "--msda", args.msda, "-o", str(graphs["ONNX fp32"]))
        cli("m2f_deploy.cli.export", *common, "--msda", args.fp16_msda, "--fp16", "-o", str(graphs["ONNX fp16"]))
        cli(
            "m2f_deploy.cli.export", *common, "--msda", args.msda, "--int8", "--calib", str(calib / "images"), "-o",
            str(graphs["ONNX int8"]),
        )

        rows = {}
        for name, model in [("PyTorch fp32", args.checkpoint), *graphs.items()]:
            out = work / f"{name.replace(' ', '-')}.json"
            cli("m2f_deploy.cli.validate", str(model), "--data", str(data), "--json", str(out), "-q",
                *(["--reference", str(args.checkpoint)] if model != args.checkpoint else []))  # fmt: skip
            rows[name] = json.loads(out.read_text())
        latency = {}
        bench = work / "bench.json"
        cli("m2f_deploy.cli.bench", str(args.checkpoint), "--size", str(height), str(width), "--backends", "torch",
            "--runs", str(args.runs), "--threads", str(args.threads), "--json", str(bench), "-q")  # fmt: skip
        latency["PyTorch fp32"] = json.loads(bench.read_text())["rows"][0]
        # the three graphs in one process, in alternating rounds: on a VM whose speed drifts, one after the other
        # would compare them at different speeds
        from m2f_deploy.bench import Target, run_rows

        rows_by_precision = run_rows(Target(onnx={name.split()[-1]: path for name, path in graphs.items()},
                                            height=height, width=width), ["cpu"], [1], runs=args.runs,
                                     threads=args.threads, rounds=args.rounds)  # fmt: skip
        for row in rows_by_precision:
            latency[f"ONNX {row.precision}"] = row.__dict__
    print(f"{args.checkpoint} on {args.images} held-out synthetic images ({height}x{width}, seed {HELD_OUT_SEED}); "
          f"--msda {args.msda} (fp16: {args.fp16_msda}); latency: model only, batch 1, {args.threads} threads, "
          f"{cpu_name()}, {time.strftime('%Y-%m-%d')}\n")  # fmt: skip
    print("| variant | PQ | PQ things | PQ stuff | mIoU | mask AP | agreement with PyTorch (pixels, segments) "
          "| CPU latency p50 ms | vs fp32 ONNX |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    base = latency["ONNX fp32"]["p50_ms"]
    for name, r in rows.items():
        a = r.get("agreement")
        agree = (
            f"{a['semantic_pixels']:.2f}%, {a['panoptic_segments_matched'][0]}/{a['panoptic_segments_matched'][1]}"
            if a
            else "(itself)"
        )
        lat = latency[name]
        print(f"| {name} | {r['PQ']:.1f} | {r['PQ_things']:.1f} | {r['PQ_stuff']:.1f} | {r['mIoU']:.1f} | {r['AP']:.1f} "
              f"| {agree} | {lat['p50_ms']:.1f} ({lat['device']}) | {base / lat['p50_ms']:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
