"""The README's demo: checkpoint -> validated ONNX -> onnxruntime on an image -> segments + latency.

    python -m m2f_deploy.demo [--out DIR]

No pretrained weights can be downloaded on the machines this project is built on, so the demo
writes a small Swin Mask2Former checkpoint with random weights: the pipeline is real, the
segments are not meaningful.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CANVAS = (256, 256)
DEMO_CONFIG = dict(
    backbone_config=dict(embed_dim=32, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8], window_size=7),
    feature_size=64, mask_feature_size=64, hidden_dim=64, encoder_feedforward_dim=128, encoder_layers=2,
    decoder_layers=4, num_attention_heads=4, dim_feedforward=128, num_queries=20,
    id2label={0: "sky", 1: "ground", 2: "circle", 3: "square", 4: "triangle"},
)  # fmt: skip


def demo_image(size: tuple[int, int] = (240, 320)) -> Image.Image:
    """A 320x240 scene: sky over ground, a circle, a square and a triangle."""
    h, w = size
    image = Image.new("RGB", (w, h), (120, 170, 235))
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, h * 3 // 5, w, h], fill=(110, 140, 70))
    draw.ellipse([40, 40, 110, 110], fill=(220, 60, 50))
    draw.rectangle([180, 120, 250, 190], fill=(240, 200, 40))
    draw.polygon([(270, 200), (310, 200), (290, 150)], fill=(60, 60, 200))
    return image


def palette(n: int) -> np.ndarray:
    rng = np.random.default_rng(1)
    return rng.integers(40, 256, size=(n + 1, 3), dtype=np.uint8)


def timed(fn, runs: int = 5):
    times, out = [], None
    for _ in range(runs):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times) * 1000


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m m2f_deploy.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("demo-out"), help="folder for the checkpoint, graph and PNGs")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from m2f_deploy.cli.common import setup_logging

    setup_logging(quiet=False)

    import onnxruntime

    from m2f_deploy import load_model
    from m2f_deploy.checkpoints import save_checkpoint
    from m2f_deploy.config import Mask2FormerConfig
    from m2f_deploy.export import export_onnx
    from m2f_deploy.modeling import Mask2Former
    from m2f_deploy.processing import ImageProcessor

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    print(f"1. checkpoint: a small Swin Mask2Former with RANDOM weights -> {out / 'checkpoint'}")
    processor = ImageProcessor(canvas=CANVAS)
    save_checkpoint(Mask2Former.random(Mask2FormerConfig.from_dict(DEMO_CONFIG), seed=0), out / "checkpoint")
    processor.save_pretrained(out / "checkpoint")

    print(f"2. export to ONNX with the validation gate -> {out / 'model.onnx'}")
    model = load_model(out / "checkpoint")
    path = export_onnx(model, out / "model.onnx", height=CANVAS[0], width=CANVAS[1], processor=processor)

    print("3. run it: onnxruntime CPU on a 320x240 image, numpy post-processing")
    image = demo_image()
    image.save(out / "image.png")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs, t_pre = timed(lambda: processor.preprocess(image))
    feed = {"pixel_values": inputs["pixel_values"]}
    names = [o.name for o in session.get_outputs()]
    outputs, t_inf = timed(lambda: dict(zip(names, session.run(None, feed))))
    target = [image.size[::-1]]
    kw = dict(target_sizes=target, pixel_mask=inputs["pixel_mask"])
    panoptic, t_pan = timed(lambda: processor.post_process_panoptic_segmentation(outputs, threshold=0.0, **kw)[0])
    semantic, t_sem = timed(lambda: processor.post_process_semantic_segmentation(outputs, **kw)[0])

    labels = model.config.id2label
    print(f"\n   panoptic segments (threshold 0; random weights, so these mean nothing): {len(panoptic['segments_info'])}")
    print("   | id | label | score | area px |")
    print("   |---|---|---|---|")
    for seg in panoptic["segments_info"][:8]:
        area = int((panoptic["segmentation"] == seg["id"]).sum())
        print(f"   | {seg['id']} | {labels[seg['label_id']]} | {seg['score']:.3f} | {area} |")
    colours = palette(len(labels))
    Image.fromarray(colours[semantic]).save(out / "semantic.png")
    print(f"\n   semantic map {semantic.shape[1]}x{semantic.shape[0]}, classes present: "
          f"{sorted(labels[int(c)] for c in np.unique(semantic))} -> {out / 'semantic.png'}")
    print(f"\n   latency (median of 5, ms): preprocess {t_pre:.1f} | inference {t_inf:.1f} | "
          f"panoptic post-process {t_pan:.1f} | semantic post-process {t_sem:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
