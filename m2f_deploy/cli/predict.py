"""m2f-predict: an artifact and images (or folders of images) -> overlays, label PNGs and COCO-format results."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

from m2f_deploy.cli.common import Parser, Progress, run, setup_logging
from m2f_deploy.errors import InputError, M2FError

log = logging.getLogger("m2f_deploy.cli")



def build_parser() -> Parser:
    from m2f_deploy.runtime import BACKENDS, TASKS

    p = Parser(
        prog="m2f-predict",
        description="Segment images with an exported Mask2Former (.onnx or TensorRT .engine); no PyTorch needed.",
        epilog="Example: m2f-predict model.onnx photos/ --task panoptic --out results/",
    )
    p.add_argument("artifact", type=Path, help="an .onnx file from m2f-export, or a TensorRT .engine with its .json")
    p.add_argument("inputs", nargs="+", type=Path, help="image files and/or folders of images (not recursive)")
    p.add_argument("--task", default=None, choices=TASKS,
                   help="panoptic (default; a fused-head artifact's own task), instance or semantic")
    p.add_argument("-o", "--out", type=Path, default=Path("predictions"), help="output folder (default: predictions)")
    p.add_argument(
        "--backend",
        default="auto",
        choices=BACKENDS,
        help="auto (default: the fastest present), tensorrt (engines), ort-tensorrt, cuda, cpu",
    )
    p.add_argument("--threshold", type=float, default=0.5, help="min segment score (instance, panoptic; default 0.5)")
    p.add_argument("--mask-threshold", type=float, default=0.5, help="mask probability threshold (panoptic; 0.5)")
    p.add_argument(
        "--overlap-threshold",
        type=float,
        default=0.8,
        help="min share of a mask a segment must keep after overlaps (panoptic; default 0.8)",
    )
    p.add_argument(
        "--fuse",
        default="",
        metavar="IDS",
        help="panoptic: comma-separated label ids whose segments merge into one per image (stuff)",
    )
    p.add_argument("--batch", type=int, default=None, help="images per run (default: the artifact's batch)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for onnxruntime and post-processing, at least 1 (default: onnxruntime's; post-processing 1)",
    )
    p.add_argument(
        "--exact",
        action="store_true",
        help="post-process with the literal port of transformers' code (slow) instead of the fast path",
    )
    p.add_argument("--no-overlay", action="store_true", help="skip the overlay PNGs")
    p.add_argument("-q", "--quiet", action="store_true", help="only errors")
    return p  # fmt: skip


def _fuse_ids(text: str, id2label: dict[int, str]) -> set[int]:
    ids = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        if not part.lstrip("-").isdigit() or int(part) not in id2label:
            raise InputError(f"--fuse {text}: {part!r} is not a label id of this model (0..{len(id2label) - 1})")
        ids.add(int(part))
    return ids


class Writer:
    """Per-image files as they come, and the COCO JSON files at the end (all written atomically)."""

    def __init__(self, out: Path, task: str, id2label: dict[int, str], stuff: set[int], overlays: bool):
        self.out, self.task, self.id2label, self.stuff, self.overlays = out, task, id2label, stuff, overlays
        self.stems: set[str] = set()
        self.images: list[dict[str, Any]] = []
        self.annotations: list[dict[str, Any]] = []

    def _stem(self, path: Path) -> str:
        stem, n = path.stem, 0
        while stem in self.stems:
            n += 1
            stem = f"{path.stem}-{n}"
        self.stems.add(stem)
        return stem

    def add(self, path: Path, image: Any, result: Any) -> None:
        from m2f_deploy import coco, viz

        stem = self._stem(path)
        image_id = len(self.images) + 1
        self.images.append({"id": image_id, "file_name": str(path), "width": image.width, "height": image.height})
        if self.task == "semantic":
            labels = np.asarray(result)
            dtype = np.uint8 if max(self.id2label) < 256 else np.uint16
            _save_png(self.out / "semantic" / f"{stem}.png", labels.astype(dtype))
            drawing = (viz.draw_semantic, labels)
        elif self.task == "panoptic":
            ids, segments = coco.panoptic_record(result)
            _save_png(self.out / "panoptic" / f"{stem}.png", coco.id_to_rgb(ids))
            self.annotations.append({"image_id": image_id, "file_name": f"{stem}.png", "segments_info": segments})
            drawing = (viz.draw_panoptic, result)
        else:
            self.annotations += coco.instance_annotations(result, image_id, first_id=len(self.annotations) + 1)
            drawing = (viz.draw_instance, result)
        if self.overlays:
            draw, what = drawing
            _save_png(self.out / "overlays" / f"{stem}.png", draw(image, what, self.id2label))

    def finish(self, source: str) -> list[Path]:
        from m2f_deploy import coco
        from m2f_deploy.utils import atomic_write_text

        info = {"description": f"m2f-predict results of {source}"}
        written = []
        if self.task == "panoptic":
            data = {"info": info, "images": self.images, "annotations": self.annotations,
                    "categories": coco.categories(self.id2label, sorted(self.stuff))}  # fmt: skip
            written.append(atomic_write_text(self.out / "panoptic.json", json.dumps(data) + "\n"))
        elif self.task == "instance":
            data = {"info": info, "images": self.images, "annotations": self.annotations,
                    "categories": coco.categories(self.id2label)}  # fmt: skip
            written.append(atomic_write_text(self.out / "instances.json", json.dumps(data) + "\n"))
        return written


def _save_png(path: Path, picture: Any) -> None:
    from PIL import Image

    from m2f_deploy.utils import atomic_output

    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(picture, np.ndarray):
        picture = Image.fromarray(picture)
    with atomic_output(path) as tmp:
        picture.save(tmp, format="PNG")


def _predict(segmenter: Any, loaded: list, task: str, thresholds: dict, timings: dict, failed: list) -> list:
    """``((path, image), result)`` for the images that worked; a failing batch is retried image by image, so
    that one bad image does not sink the others. Failures are appended to ``failed``."""
    if not loaded:
        return []
    try:
        results = segmenter.predict([image for _, image in loaded], task, timings=timings, **thresholds)
    except M2FError as e:
        if len(loaded) > 1:
            return [done for item in loaded for done in _predict(segmenter, [item], task, thresholds, timings, failed)]
        failed.append(f"{loaded[0][0]}: {e}")
        return []
    return list(zip(loaded, results))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.quiet)
    if args.batch is not None and args.batch < 1:
        raise InputError(f"--batch must be at least 1, got {args.batch}")
    if not args.artifact.is_file():
        raise InputError(f"{args.artifact}: no such file")
    from m2f_deploy.runtime.images import find_images

    images = find_images(args.inputs)

    from m2f_deploy.runtime import Segmenter
    from m2f_deploy.runtime.images import load_image

    postprocess = "reference" if args.exact else "fast"
    with Segmenter(
        args.artifact, args.backend, threads=args.threads, batch_size=args.batch, postprocess=postprocess
    ) as segmenter:  # closed on every way out: onnxruntime session, post-processing threads
        log.info("%s: %s; %d image(s) -> %s", args.artifact.name, segmenter.description, len(images), args.out)
        args.task = args.task or segmenter.head or "panoptic"
        if segmenter.head and args.task != segmenter.head:
            raise InputError(f"{args.artifact}: returns {segmenter.head} results (exported with --heads "
                             f"{segmenter.head}), not {args.task}: use --task {segmenter.head}")  # fmt: skip
        fuse = _fuse_ids(args.fuse, segmenter.id2label)
        thresholds = {"threshold": args.threshold, "mask_threshold": args.mask_threshold,
                      "overlap_mask_area_threshold": args.overlap_threshold}  # fmt: skip
        if args.task == "panoptic":
            thresholds["label_ids_to_fuse"] = fuse
        elif args.task == "instance":
            thresholds["return_binary_maps"] = True
        args.out.mkdir(parents=True, exist_ok=True)
        writer = Writer(args.out, args.task, segmenter.id2label, fuse, not args.no_overlay)
        failed: list[str] = []
        timings: dict[str, float] = {}
        progress = Progress(len(images), "images", quiet=args.quiet)
        batch = segmenter.batch_size
        for start in range(0, len(images), batch):
            loaded = []
            for path in images[start : start + batch]:
                try:
                    loaded.append((path, load_image(path)))
                except M2FError as e:
                    failed.append(str(e))
                    progress.step(path.name)
                    log.error("skipped: %s", e)
            for (path, image), result in _predict(segmenter, loaded, args.task, thresholds, timings, failed):
                writer.add(path, image, result)
            progress.step(count=len(loaded))
        progress.close()
        for path in writer.finish(str(args.artifact)):
            log.info("wrote %s", path)
        done = len(images) - len(failed)
        total = sum(timings.values())
        if done:
            parts = ", ".join(f"{k} {1000 * v / done:.1f}" for k, v in timings.items())
            log.info("%d image(s) in %.2f s: per image (ms) %s", done, total, parts)
        if failed:
            print(f"m2f-predict: {len(failed)} of {len(images)} image(s) failed:", file=sys.stderr)
            for line in failed:
                print(f"  {line}", file=sys.stderr)
            return 1
        return 0


def entry() -> None:
    sys.exit(run("m2f-predict", main))


if __name__ == "__main__":
    entry()
