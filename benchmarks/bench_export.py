"""Export cost and CPU latency of every MSDA flavour, against transformers eager, in one run.

    python benchmarks/bench_export.py [--size 384] [--runs 10] [--threads 2] [--flavours grid_sample gather trt_plugin]

For the Swin-T COCO-panoptic architecture (random weights written by transformers'
save_pretrained): the wall time of export_onnx with its validation gate, the graph's node count,
and the median onnxruntime CPU latency of each graph, beside transformers eager and our eager
reference on the same input. trt_plugin graphs run through the numpy stand-in (not TensorRT), so
their latency says nothing about TensorRT. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import onnx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from factory import save_hf_checkpoint  # noqa: E402

from m2f_deploy import load_model  # noqa: E402
from m2f_deploy.artifact import INPUT_NAME  # noqa: E402
from m2f_deploy.export import export_onnx  # noqa: E402
from m2f_deploy.export.msda import FLAVOURS  # noqa: E402
from m2f_deploy.presets import preset_config  # noqa: E402


def median_time(fn, runs: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="swin-tiny-coco-panoptic")
    ap.add_argument("--size", type=int, default=384)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--flavours", nargs="+", default=list(FLAVOURS), choices=FLAVOURS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import onnxruntime
    import transformers

    from m2f_deploy.export.validate import session

    rows = []
    x = torch.randn(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_hf_checkpoint(preset_config(args.preset), Path(tmp) / "ckpt")
        hf = transformers.Mask2FormerForUniversalSegmentation.from_pretrained(folder).eval()
        with torch.inference_mode():
            rows.append(("transformers eager", "", "", median_time(lambda: hf(x), args.runs)))
        hf = None  # free its memory before the exports
        t0 = time.perf_counter()
        model = load_model(folder)
        load_s = time.perf_counter() - t0
        with torch.inference_mode():
            rows.append(("m2f-deploy eager reference", "", "", median_time(lambda: model(x), args.runs)))
        for flavour in args.flavours:
            path = Path(tmp) / f"{flavour}.onnx"
            t0 = time.perf_counter()
            export_onnx(model, path, height=args.size, width=args.size, msda=flavour)
            export_s = time.perf_counter() - t0 + load_s
            nodes = len(onnx.load(str(path), load_external_data=False).graph.node)
            if flavour == "trt_plugin":
                sess = session(path, flavour)
            else:
                options = onnxruntime.SessionOptions()
                options.intra_op_num_threads = args.threads
                sess = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            feed = {INPUT_NAME: x.numpy()}
            latency = median_time(lambda: sess.run(None, feed), args.runs)
            rows.append((f"ONNX {flavour} (onnxruntime CPU{', numpy stand-in' if flavour == 'trt_plugin' else ''})",
                         f"{export_s:.1f}", str(nodes), latency))

    base = rows[0][3]
    print(f"{args.preset}, 1x3x{args.size}x{args.size}, {args.threads} threads, torch {torch.__version__}, "
          f"onnxruntime {onnxruntime.__version__}, transformers {transformers.__version__}, "
          f"{platform.machine()}, {time.strftime('%Y-%m-%d')}\n")
    print("| model | export + validation s (incl. load) | nodes | median latency s | speed-up vs transformers |")
    print("|---|---|---|---|---|")
    for name, export_s, nodes, latency in rows:
        print(f"| {name} | {export_s} | {nodes} | {latency:.3f} | {base / latency:.2f}x |")


if __name__ == "__main__":
    main()
