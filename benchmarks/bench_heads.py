"""Raw (logits) graph vs fused-head graphs, per head, on onnxruntime CPU: bytes leaving the graph per image,
end-to-end latency (image -> results, ``Segmenter.predict``) and post-processing time, side by side in ONE process,
alternating the variants round after round (the machine's speed drifts; ratios of neighbours are what count).

    python benchmarks/bench_heads.py --checkpoint checkpoints/shapes-demo --size 160 160 --rounds 8
    python benchmarks/bench_heads.py --preset swin-tiny-coco-panoptic --size 384 384 --rounds 4

The logits graph is exported once (``--msda deform_conv``, the fastest on onnxruntime CPU; the gate against PyTorch
is skipped with ``--no-validate``), the three fused graphs are made from it with ``fuse_onnx`` (their gate on).
Prints a Markdown table (medians over the rounds) for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TASKS = ("semantic", "instance", "panoptic")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", type=Path)
    src.add_argument("--preset")
    p.add_argument("--size", type=int, nargs=2, default=(384, 384))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--image", type=Path, help="the image (default: the demo scene at 640x480)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-validate", action="store_true", help="skip the logits graph's gate against PyTorch")
    args = p.parse_args()

    from PIL import Image

    from m2f_deploy.demo import demo_image
    from m2f_deploy.export import export_onnx
    from m2f_deploy.export.heads import fuse_onnx
    from m2f_deploy.runtime import Segmenter

    if args.checkpoint:
        from m2f_deploy import load_model

        model, name = load_model(args.checkpoint), args.checkpoint.name
    else:
        from m2f_deploy.modeling import Mask2Former
        from m2f_deploy.presets import preset_config

        model, name = Mask2Former.random(preset_config(args.preset)), args.preset
    image = np.asarray(Image.open(args.image).convert("RGB")) if args.image else np.asarray(demo_image((480, 640)))
    h, w = args.size
    with tempfile.TemporaryDirectory() as tmp:
        raw = export_onnx(model, Path(tmp) / "raw.onnx", height=h, width=w, msda="deform_conv",
                          validate=not args.no_validate)  # fmt: skip
        fused = {t: fuse_onnx(raw, Path(tmp) / f"{t}.onnx", t) for t in TASKS}
        runners = {("raw", t): Segmenter(raw, "cpu", threads=args.threads) for t in TASKS}
        runners.update({("fused", t): Segmenter(fused[t], "cpu", threads=args.threads) for t in TASKS})
        sizes, samples = {}, {key: {"total": [], "postprocess": [], "inference": []} for key in runners}
        for key, seg in runners.items():  # warm-up, and the bytes each graph returns per image
            if seg.uint8:
                raise SystemExit("float-input graphs only")
            x = seg.processor.preprocess(image)["pixel_values"]
            outputs = seg.infer(x)
            sizes[key] = sum(v.nbytes for v in outputs.values())
            seg.predict(image, key[1])
        for _ in range(args.rounds):
            for key, seg in runners.items():  # alternating: raw-semantic, ..., fused-panoptic, then again
                timings: dict[str, float] = {}
                t0 = time.perf_counter()
                seg.predict(image, key[1], timings=timings)
                samples[key]["total"].append(time.perf_counter() - t0)
                samples[key]["postprocess"].append(timings["postprocess"])
                samples[key]["inference"].append(timings["inference"])
        for seg in runners.values():
            seg.close()

    def ms(key, what):
        return 1000 * statistics.median(samples[key][what])

    print(f"{name} at {h}x{w}, image {image.shape[1]}x{image.shape[0]}, onnxruntime CPU, {args.rounds} rounds "
          f"(medians, ms)\n")  # fmt: skip
    print("| head | graph | bytes out / image | end-to-end | inference | post-processing | end-to-end fused/raw |")
    print("|---|---|---|---|---|---|---|")
    for task in TASKS:
        for kind in ("raw", "fused"):
            key = (kind, task)
            ratio = f"{ms(('fused', task), 'total') / ms(('raw', task), 'total'):.2f}" if kind == "fused" else ""
            print(f"| {task} | {kind} | {sizes[key]:,} | {ms(key, 'total'):.1f} | {ms(key, 'inference'):.1f} "
                  f"| {ms(key, 'postprocess'):.1f} | {ratio} |")  # fmt: skip


if __name__ == "__main__":
    main()
