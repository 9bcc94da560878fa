"""The README's demo: the shipped checkpoint -> validated ONNX -> the torch-free runtime on sample images.

    python -m m2f_deploy.demo [--out DIR]

The checkpoint (``checkpoints/shapes-demo`` in the repository) is a 3.45M-parameter Swin Mask2Former trained on
the synthetic shapes of ``m2f_deploy.data`` by ``tools/train_demo.py`` (no pretrained weights can be downloaded
on the machines this project is built on). The demo exports it with the validation gate, runs ``m2f-predict``'s
pipeline on the sample images (``checkpoints/samples``), prints the segments and the latency, and writes the
overlays, panoptic PNGs and COCO JSON.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT = REPO / "checkpoints" / "shapes-demo"
SAMPLES = REPO / "checkpoints" / "samples"


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
    ap.add_argument("--out", type=Path, default=Path("demo-out"), help="folder for the graph and the results")
    ap.add_argument("--checkpoint", type=Path, default=CHECKPOINT, help="checkpoint folder (default: the shipped one)")
    ap.add_argument("--images", type=Path, default=SAMPLES, help="images or a folder (default: the shipped samples)")
    args = ap.parse_args(argv)
    from m2f_deploy.cli.common import setup_logging

    setup_logging(quiet=False)

    from m2f_deploy import load_model
    from m2f_deploy.cli.predict import main as predict
    from m2f_deploy.errors import InputError
    from m2f_deploy.export import export_onnx
    from m2f_deploy.processing import ImageProcessor

    if not (args.checkpoint / "config.json").is_file():
        raise InputError(
            f"{args.checkpoint}: the demo checkpoint ships with the repository (checkpoints/), not the wheel"
        )
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    processor = ImageProcessor.from_pretrained(args.checkpoint)
    size = processor.size
    height, width = (size["height"], size["width"]) if "height" in size else (size["shortest_edge"],) * 2
    print(f"1. checkpoint: {args.checkpoint} (a small Swin Mask2Former trained on synthetic shapes)")
    model = load_model(args.checkpoint)
    print(f"   classes: {', '.join(model.config.id2label.values())}")

    print(f"2. export to ONNX ({height}x{width}, dynamic batch, --msda deform_conv: the CPU's fastest) with the "
          f"validation gate -> {out / 'model.onnx'}")  # fmt: skip
    path = export_onnx(model, out / "model.onnx", height=height, width=width, msda="deform_conv")

    print(f"3. m2f-predict {path} {args.images} --task panoptic --out {out / 'predictions'}")
    code = predict([str(path), str(args.images), "--task", "panoptic", "--out", str(out / "predictions")])

    from m2f_deploy.runtime import Segmenter
    from m2f_deploy.runtime.images import find_images, load_image

    first = find_images([args.images])[0]
    segmenter = Segmenter(path)
    image = load_image(first)
    result = segmenter.predict(image, "panoptic")[0]
    print(f"\n   {first.name}: {len(result['segments_info'])} segments")
    print("   | id | label | score | area px |")
    print("   |---|---|---|---|")
    for seg in result["segments_info"]:
        area = int((result["segmentation"] == seg["id"]).sum())
        print(f"   | {seg['id']} | {segmenter.id2label[seg['label_id']]} | {seg['score']:.3f} | {area} |")
    timings, runs = {}, 10
    for _ in range(runs):
        segmenter.predict(image, "panoptic", timings=timings)
    stages = " | ".join(f"{k} {1000 * v / runs:.1f}" for k, v in timings.items())
    print(f"\n   latency of one image ({segmenter.description}; mean of {runs}, ms): {stages}")
    print(f"   overlays: {out / 'predictions' / 'overlays'}")
    return code


if __name__ == "__main__":
    from m2f_deploy.cli.common import run

    sys.exit(run("python -m m2f_deploy.demo", main))
