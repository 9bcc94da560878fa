"""m2f-predict over a folder: every file written, COCO JSON that pycocotools loads and that matches the PNGs, and
bad images reported and skipped without losing the good ones."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from factory import decisive_model
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from m2f_deploy.cli.predict import main
from m2f_deploy.coco import rgb_to_id
from m2f_deploy.demo import demo_image
from m2f_deploy.export import export_onnx
from m2f_deploy.processing import ImageProcessor
from m2f_deploy.runtime import Segmenter, available_backends

LOW = ["--threshold", "0.3"]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    path = tmp_path_factory.mktemp("predict") / "model.onnx"
    processor = ImageProcessor(size={"shortest_edge": 96, "longest_edge": 160})
    return export_onnx(decisive_model(), path, height=128, width=160, processor=processor)


@pytest.fixture
def folder(tmp_path):
    """Two good images (one RGBA), and three bad ones: text named .png, a truncated PNG, a corrupt JPEG."""
    images = tmp_path / "images"
    images.mkdir()
    demo_image().save(images / "scene.png")
    demo_image().resize((150, 110)).convert("RGBA").save(images / "small.png")
    (images / "notes.png").write_text("not an image\n")
    data = (images / "scene.png").read_bytes()
    (images / "truncated.png").write_bytes(data[: len(data) // 2])
    (images / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(200))
    (images / "readme.txt").write_text("ignored: not an image suffix\n")
    return images


GOOD = ["scene", "small"]


def run(artifact, folder, out, task, *extra):
    return main([str(artifact), str(folder), "--task", task, "--out", str(out), "-q", *LOW, *extra])


def test_panoptic_png_and_json_agree(artifact, folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(artifact, folder, out, "panoptic") == 1  # some images failed
    err = capsys.readouterr().err
    assert "3 of 5 image(s) failed" in err
    for bad in ("notes.png", "truncated.png", "corrupt.jpg"):
        assert bad in err
    assert "Traceback" not in err
    data = json.loads((out / "panoptic.json").read_text())
    assert [Path(im["file_name"]).stem for im in data["images"]] == GOOD
    assert {c["id"] for c in data["categories"]} == set(range(5))
    total = 0
    for annotation, image in zip(data["annotations"], data["images"]):
        ids = rgb_to_id(np.asarray(Image.open(out / "panoptic" / annotation["file_name"])))
        assert ids.shape == (image["height"], image["width"])
        assert set(np.unique(ids)) - {0} == {s["id"] for s in annotation["segments_info"]}
        for segment in annotation["segments_info"]:
            mask = ids == segment["id"]
            assert segment["area"] == int(mask.sum())
            ys, xs = np.nonzero(mask)
            assert segment["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            total += 1
        assert (out / "overlays" / annotation["file_name"]).is_file()
    assert total > 0


def test_instance_json_loads_in_pycocotools_and_matches_the_runtime(artifact, folder, tmp_path):
    out = tmp_path / "out"
    run(artifact, folder, out, "instance")
    coco = COCO(str(out / "instances.json"))
    assert len(coco.getImgIds()) == 2 and len(coco.getAnnIds()) > 0
    results = coco.loadRes(json.load(open(out / "instances.json"))["annotations"])  # also valid as results
    assert len(results.getAnnIds()) == len(coco.getAnnIds())
    seg = Segmenter(artifact)
    for image_id in coco.getImgIds():
        info = coco.loadImgs(image_id)[0]
        want = seg.predict(Image.open(info["file_name"]), "instance", threshold=0.3, return_binary_maps=True)[0]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        assert [a["category_id"] for a in anns] == [s["label_id"] for s in want["segments_info"]]
        for ann, mask in zip(anns, want["segmentation"]):
            assert np.array_equal(coco.annToMask(ann), mask.astype(np.uint8))
            assert ann["area"] == int(mask_utils.area(ann["segmentation"]))


def test_semantic_pngs_equal_the_runtime(artifact, folder, tmp_path):
    out = tmp_path / "out"
    run(artifact, folder / "scene.png", out, "semantic")
    saved = np.asarray(Image.open(out / "semantic" / "scene.png"))
    want = Segmenter(artifact).predict(Image.open(folder / "scene.png"), "semantic")[0]
    assert np.array_equal(saved, want)
    assert (out / "overlays" / "scene.png").is_file()


def test_all_good_exits_0_and_batches(artifact, folder, tmp_path):
    out = tmp_path / "out"
    good = [str(folder / f"{name}.png") for name in GOOD]
    assert main([str(artifact), *good, "--out", str(out), "-q", "--batch", "2", "--no-overlay", *LOW]) == 0
    assert sorted(p.name for p in (out / "panoptic").iterdir()) == ["scene.png", "small.png"]
    assert not (out / "overlays").exists()


def test_cli_errors_are_one_line(artifact, tmp_path):
    def cli(*args):
        proc = subprocess.run(
            [sys.executable, "-m", "m2f_deploy.cli.predict", *args], capture_output=True, text=True, check=False
        )
        return proc.returncode, proc.stderr.strip()

    code, err = cli(str(tmp_path / "missing.onnx"), str(tmp_path))
    assert code == 1 and err.count("\n") == 0 and "missing.onnx: no such file" in err
    code, err = cli(str(artifact), str(tmp_path / "nope.png"))
    assert code == 1 and "nope.png: no such file or folder" in err
    demo_image().save(tmp_path / "scene.png")
    if "cuda" not in available_backends():
        code, err = cli(str(artifact), str(tmp_path), "--backend", "cuda", "-q")
        assert code == 1 and err.count("\n") == 0 and "CUDAExecutionProvider" in err
    code, err = cli(str(artifact), str(tmp_path), "--fuse", "9")
    assert code == 1 and "--fuse 9: '9' is not a label id" in err
    code, err = cli(str(artifact), str(tmp_path), "--threads", "0")
    assert code == 1 and err.count("\n") == 0 and "threads must be a positive whole number or None, got 0" in err


def test_exact_and_threads_reach_the_post_processing(artifact, folder, tmp_path, monkeypatch):
    from m2f_deploy.processing.postprocess import reference
    from m2f_deploy.runtime import segmenter

    made = []
    original = segmenter.Segmenter.__init__
    monkeypatch.setattr(
        segmenter.Segmenter, "__init__", lambda self, *a, **k: made.append(k) or original(self, *a, **k)
    )
    called = []
    exact = reference.panoptic_segmentation
    monkeypatch.setattr(reference, "panoptic_segmentation", lambda *a: called.append(1) or exact(*a))
    scene = str(folder / "scene.png")
    assert main([str(artifact), scene, "--out", str(tmp_path / "fast"), "-q", "--no-overlay", *LOW]) == 0
    assert not called and made[-1]["postprocess"] == "fast" and made[-1]["threads"] is None
    args = ["--out", str(tmp_path / "exact"), "-q", "--no-overlay", "--exact", "--threads", "2", *LOW]
    assert main([str(artifact), scene, *args]) == 0
    assert called and made[-1]["postprocess"] == "reference" and made[-1]["threads"] == 2
    fast, exact_png = (np.asarray(Image.open(tmp_path / d / "panoptic" / "scene.png")) for d in ("fast", "exact"))
    assert np.array_equal(fast, exact_png)


def test_the_segmenter_is_closed_also_when_images_fail(artifact, folder, tmp_path, monkeypatch):
    from m2f_deploy.runtime import segmenter

    closed = []
    original = segmenter.Segmenter.close
    monkeypatch.setattr(segmenter.Segmenter, "close", lambda self: closed.append(1) or original(self))
    assert main([str(artifact), str(folder / "scene.png"), "--out", str(tmp_path / "a"), "-q", "--no-overlay"]) == 0
    assert closed == [1]
    (tmp_path / "broken.png").write_bytes(b"not an image")
    assert main([str(artifact), str(tmp_path / "broken.png"), "--out", str(tmp_path / "b"), "-q"]) == 1
    assert closed == [1, 1]
