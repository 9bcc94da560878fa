"""The README's demo: checkpoint -> validated ONNX -> the torch-free runtime on an image -> segments, overlays, latency.

    python -m m2f_deploy.demo [--out DIR]

No pretrained weights can be downloaded on the machines this project is built on, so the demo
writes a small Swin Mask2Former checkpoint with random weights: the pipeline is real, the
segments are not meaningful.
"""

from __future__ import annotations

import argparse
import logging
import sys
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m m2f_deploy.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("demo-out"), help="folder for the checkpoint, graph and PNGs")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from m2f_deploy.cli.common import setup_logging

    setup_logging(quiet=False)

    from m2f_deploy import load_model, viz
    from m2f_deploy.checkpoints import save_checkpoint
    from m2f_deploy.config import Mask2FormerConfig
    from m2f_deploy.export import export_onnx
    from m2f_deploy.modeling import Mask2Former
    from m2f_deploy.processing import ImageProcessor
    from m2f_deploy.runtime import Segmenter

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    print(f"1. checkpoint: a small Swin Mask2Former with RANDOM weights -> {out / 'checkpoint'}")
    processor = ImageProcessor(canvas=CANVAS)
    save_checkpoint(Mask2Former.random(Mask2FormerConfig.from_dict(DEMO_CONFIG), seed=0), out / "checkpoint")
    processor.save_pretrained(out / "checkpoint")

    print(f"2. export to ONNX with the validation gate -> {out / 'model.onnx'}")
    model = load_model(out / "checkpoint")
    path = export_onnx(model, out / "model.onnx", height=CANVAS[0], width=CANVAS[1], processor=processor)

    print("3. run it with the torch-free runtime (m2f_deploy.runtime.Segmenter) on a 320x240 image")
    image = demo_image()
    image.save(out / "image.png")
    segmenter = Segmenter(path)
    print(f"   backend: {segmenter.description}")
    segmenter.predict(image, "panoptic")  # warm-up
    panoptic, timings, runs = None, {}, 5
    for _ in range(runs):
        panoptic = segmenter.predict(image, "panoptic", threshold=0.0, timings=timings)[0]
    semantic = segmenter.predict(image, "semantic")[0]

    labels = segmenter.id2label
    print(
        f"\n   panoptic segments (threshold 0; random weights, so these mean nothing): {len(panoptic['segments_info'])}"
    )
    print("   | id | label | score | area px |")
    print("   |---|---|---|---|")
    for seg in panoptic["segments_info"][:8]:
        area = int((panoptic["segmentation"] == seg["id"]).sum())
        print(f"   | {seg['id']} | {labels[seg['label_id']]} | {seg['score']:.3f} | {area} |")
    viz.draw_panoptic(image, panoptic, labels).save(out / "panoptic.png")
    viz.draw_semantic(image, semantic, labels).save(out / "semantic.png")
    print(
        f"\n   semantic map {semantic.shape[1]}x{semantic.shape[0]}, classes present: "
        f"{sorted(labels[int(c)] for c in np.unique(semantic))}"
    )
    print(f"   overlays: {out / 'panoptic.png'}, {out / 'semantic.png'}")
    stages = " | ".join(f"{k} {1000 * v / runs:.1f}" for k, v in timings.items())
    print(f"\n   latency (panoptic, mean of {runs}, ms): {stages}")
    print(
        f"\n   the same from the shell: m2f-predict {path} {out / 'image.png'} --task panoptic --out {out / 'predictions'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
