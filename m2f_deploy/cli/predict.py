"""m2f-predict: an artifact and images (or folders of images) -> overlays, label PNGs and COCO-format results."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

from m2f_deploy.cli.common import Parser, Progress, run, setup_logging
from m2f_deploy.errors import InputError, M2FError, OutputError

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
    p.add_argument(
        "--max-pixels",
        type=int,
        default=None,
        metavar="N",
        help="skip (and report) images with more pixels than this, read from the header before decoding "
        "(default: Pillow's MAX_IMAGE_PIXELS, 89478485; 0: no limit)",
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
        base = safe_text(path.stem)
        stem, n = base, 0
        while stem in self.stems:
            n += 1
            stem = f"{base}-{n}"
        self.stems.add(stem)
        return stem

    def add(self, path: Path, image: Any, result: Any) -> None:
        from m2f_deploy import coco, viz

        stem = self._stem(path)
        image_id = len(self.images) + 1
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
        # listed once all its files are written: a failure above leaves it out of the count and the JSON
        self.images.append({"id": image_id, "file_name": safe_text(str(path)), "width": image.width,
                            "height": image.height})  # fmt: skip

    def finish(self, source: str) -> list[Path]:
        from m2f_deploy import coco
        from m2f_deploy.utils import atomic_write_text

        info = {"description": f"m2f-predict results of {safe_text(source)}"}
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


def safe_text(text: str) -> str:
    """``text`` as valid Unicode: a file name's bytes that are not UTF-8 (read by Python as lone surrogates, which
    strict JSON readers refuse) become ``\\xNN`` escapes. UTF-8 names are unchanged."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def check_out(out: Path) -> None:
    """One :class:`OutputError` when ``out`` cannot be the output folder, checked before any work: a file, under a
    file, or a folder this process cannot create files in (permissions, a read-only or full file system). Nothing
    is created: the nearest existing folder is probed with a temporary file."""
    import os
    import tempfile

    existing = out
    while not existing.exists():
        if existing.is_symlink():
            raise OutputError(f"--out {out}: {existing} is a dangling link")
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"--out {out}: {existing} is a file, not a folder")
    try:  # a real probe: permission bits say nothing for root or read-only mounts
        fd, probe = tempfile.mkstemp(prefix=".m2f-probe-", dir=existing)
        try:
            os.write(fd, b"\0" * 4096)  # a full file system refuses data, not always the empty file
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise OutputError(f"--out {out}: cannot write in {existing} ({e.strerror or e})") from None


class OutLock:
    """An exclusive lock on the output folder (``OUT/.m2f-predict.lock``, ``flock``): a second m2f-predict into the
    same folder is refused, instead of both writing and the last ``panoptic.json`` listing only its own images.
    The kernel drops the lock when the process dies, so a killed run never blocks the next one."""

    NAME = ".m2f-predict.lock"

    def __init__(self, out: Path):
        import os

        self.path = out / self.NAME
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            import fcntl
        except ImportError:  # Windows: no flock; no lock
            return
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.pread(self.fd, 32, 0).decode("ascii", "replace").strip() or "?"
                os.close(self.fd)
                raise OutputError(
                    f"--out {out}: another m2f-predict (pid {holder}) is writing there; wait for it or choose "
                    "another folder"
                ) from None
            # a finishing run unlinks the file between our open and flock: that lock guards nothing (a third run
            # creates a new file and locks it too), so lock the file that is there now
            try:
                if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(self.fd)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        import os

        self.path.unlink(missing_ok=True)
        os.close(self.fd)


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
    from m2f_deploy.processing.image_processor import check_thresholds
    from m2f_deploy.runtime.images import MAX_PIXELS, find_images
    from m2f_deploy.runtime.segmenter import check_artifact_path

    if args.batch is not None and args.batch < 1:
        raise InputError(f"--batch must be at least 1, got {args.batch}")
    if args.max_pixels is not None and args.max_pixels < 0:
        raise InputError(f"--max-pixels must be 0 (no limit) or more, got {args.max_pixels}")
    check_thresholds(**{"--threshold": args.threshold, "--mask-threshold": args.mask_threshold,
                        "--overlap-threshold": args.overlap_threshold})  # fmt: skip
    check_artifact_path(args.artifact)
    images = find_images(args.inputs)
    check_out(args.out)
    max_pixels = MAX_PIXELS if args.max_pixels is None else args.max_pixels or None

    from PIL import Image

    from m2f_deploy.runtime import Segmenter

    postprocess = "reference" if args.exact else "fast"
    pillow_limit = Image.MAX_IMAGE_PIXELS
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
        try:
            args.out.mkdir(parents=True, exist_ok=True)
            lock = OutLock(args.out)
        except OSError as e:
            raise OutputError(f"--out {args.out}: cannot write there ({e.strerror or e})") from None
        writer = Writer(args.out, args.task, segmenter.id2label, fuse, not args.no_overlay)
        try:
            # our --max-pixels decides, not Pillow's own (twice MAX_IMAGE_PIXELS) refusal; restored on the way out
            Image.MAX_IMAGE_PIXELS = None if max_pixels is None else max(max_pixels, pillow_limit or 0)
            return _run(args, segmenter, images, thresholds, writer, max_pixels)
        finally:
            Image.MAX_IMAGE_PIXELS = pillow_limit
            lock.release()


def _run(args, segmenter, images: list[Path], thresholds: dict, writer: Writer, max_pixels: int | None) -> int:
    from m2f_deploy.runtime.images import load_image

    failed: list[str] = []
    timings: dict[str, float] = {}
    progress = Progress(len(images), "images", quiet=args.quiet)
    batch = segmenter.batch_size
    try:
        for start in range(0, len(images), batch):
            loaded = []
            for path in images[start : start + batch]:
                try:
                    loaded.append((path, load_image(path, max_pixels=max_pixels)))
                except M2FError as e:
                    failed.append(str(e))
                    progress.step(path.name)
                    log.error("skipped: %s", e)
            for (path, image), result in _predict(segmenter, loaded, args.task, thresholds, timings, failed):
                writer.add(path, image, result)
            progress.step(count=len(loaded))
        progress.close()
        written = writer.finish(str(args.artifact)) if writer.images else []
    except KeyboardInterrupt:  # SIGINT, or SIGTERM through cli.common.run
        progress.close()
        print(f"m2f-predict: interrupted: {_written(writer, args.out)}; no COCO JSON was written", file=sys.stderr)
        return 130
    except OSError as e:  # disk full, folder removed or made read-only mid-run: atomic writes leave whole files only
        raise OutputError(f"--out {args.out}: cannot write ({e.strerror or e}); {_written(writer, args.out)}; "
                          "no COCO JSON was written") from None  # fmt: skip
    for path in written:
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


def _written(writer: Writer, out: Path) -> str:
    return f"the files of {len(writer.images)} image(s) were written to {out}"


def entry() -> None:
    sys.exit(run("m2f-predict", main))


if __name__ == "__main__":
    entry()
