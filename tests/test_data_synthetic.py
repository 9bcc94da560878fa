"""m2f_deploy.data: a deterministic shapes generator (data.shapes), COCO files that agree with each other, a strict
reader (data.coco_folder)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from m2f_deploy.data import CLASSES, generate_sample, load_dataset, write_dataset
from m2f_deploy.errors import InputError
from m2f_deploy.processing import ImageProcessor

SIZE = (96, 112)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("synthetic") / "set", 4, seed=11, size=SIZE)


# -- the generator -----------------------------------------------------------------------------------------------


def test_same_seed_same_bytes_other_seed_other_images(dataset, tmp_path):
    again = _files(write_dataset(tmp_path / "again", 4, seed=11, size=SIZE))
    assert again == _files(dataset)
    other = _files(write_dataset(tmp_path / "other", 4, seed=12, size=SIZE))
    assert sorted(other) == sorted(again)
    assert all(other[f"images/{i:06d}.png"] != again[f"images/{i:06d}.png"] for i in range(4))


def test_sample_i_of_a_dataset_is_generate_sample_of_seed_and_index(dataset):
    record = load_dataset(dataset)[2]
    sample = generate_sample((11, 2), SIZE)
    np.testing.assert_array_equal(record.image(), sample.image)
    np.testing.assert_array_equal(record.panoptic(), sample.panoptic)
    assert [dict(s) for s in record.segments] == sample.segments


def test_samples_have_every_stuff_pixel_labelled_and_one_to_five_things():
    for index in range(12):
        sample = generate_sample((0, index))
        assert sample.image.shape == (160, 160, 3) and sample.image.dtype == np.uint8
        assert sample.panoptic.dtype == np.int32 and (sample.panoptic > 0).all()
        things = [s for s in sample.segments if CLASSES[s["category_id"]]["isthing"]]
        assert 1 <= len(things) <= 5
        assert min(s["area"] for s in things) >= 150
        assert [s["id"] for s in sample.segments] == list(range(1, len(sample.segments) + 1))


def test_data_and_evaluation_never_import_torch(tmp_path):
    script = textwrap.dedent(
        f"""
        import sys
        from m2f_deploy.data import CLASSES, load_dataset, write_dataset
        from m2f_deploy.evaluation import panoptic_quality

        record = load_dataset(write_dataset({str(tmp_path / "set")!r}, 1, size=(64, 64)))[0]
        truth = record.ground_truth()
        prediction = {{"segmentation": truth["segmentation"],
                       "segments_info": [{{"id": s["id"], "label_id": s["category_id"]}} for s in record.segments]}}
        assert panoptic_quality([(prediction, truth)], CLASSES).all.pq == 100
        heavy = sorted(m for m in ("torch", "torchvision", "transformers") if m in sys.modules)
        assert not heavy, heavy
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)


def test_classes_are_coco_categories_from_zero():
    assert [c["id"] for c in CLASSES] == list(range(len(CLASSES)))
    assert {c["name"] for c in CLASSES if c["isthing"]} == {"circle", "square", "triangle", "star"}
    assert all(set(c) >= {"id", "name", "isthing", "color"} for c in CLASSES)


def test_samples_encode_with_the_image_processor():
    sample = generate_sample(3)
    processor = ImageProcessor(size={"height": 160, "width": 160}, ignore_index=255)
    encoded = processor.preprocess(sample.image, sample.panoptic, instance_id_to_semantic_id=sample.category_of)
    masks, classes = encoded["mask_labels"][0], encoded["class_labels"][0]
    assert masks.shape == (len(sample.segments), 160, 160)
    assert classes.tolist() == [s["category_id"] for s in sample.segments]
    assert masks.sum(axis=(1, 2)).tolist() == [s["area"] for s in sample.segments]


# -- the files agree ---------------------------------------------------------------------------------------------


def test_panoptic_png_and_json_agree(dataset):
    document = json.loads((dataset / "panoptic.json").read_text())
    assert document["categories"] == CLASSES
    assert [image["id"] for image in document["images"]] == list(range(4))
    for record in load_dataset(dataset):
        panoptic = record.panoptic()
        assert panoptic.shape == SIZE
        assert sorted(np.unique(panoptic).tolist()) == sorted(s["id"] for s in record.segments)
        for segment in record.segments:
            rows, cols = np.nonzero(panoptic == segment["id"])
            assert segment["area"] == rows.size
            x, y = cols.min(), rows.min()
            assert segment["bbox"] == [x, y, cols.max() - x + 1, rows.max() - y + 1]
            assert segment["iscrowd"] == 0


def test_semantic_png_matches_the_panoptic_map(dataset):
    for record in load_dataset(dataset):
        expected = np.full(SIZE, 255, np.uint8)
        panoptic = record.panoptic()
        for segment in record.segments:
            expected[panoptic == segment["id"]] = segment["category_id"]
        np.testing.assert_array_equal(record.semantic(), expected)


def test_instances_json_loads_in_pycocotools_and_matches_the_panoptic_things(dataset):
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    coco = COCO(str(dataset / "instances.json"))
    assert sorted(coco.getCatIds()) == [c["id"] for c in CLASSES if c["isthing"]]
    for record in load_dataset(dataset):
        panoptic = record.panoptic()
        things = [s for s in record.segments if CLASSES[s["category_id"]]["isthing"]]
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=[record.image_id]))
        assert len(annotations) == len(things)
        for annotation, segment in zip(annotations, things):
            assert annotation["category_id"] == segment["category_id"] and annotation["id"] >= 1
            np.testing.assert_array_equal(coco.annToMask(annotation), panoptic == segment["id"])
            rle = coco.annToRLE(annotation)
            assert mask_utils.area(rle) == annotation["area"] == segment["area"]
            assert mask_utils.toBbox(rle).tolist() == annotation["bbox"] == segment["bbox"]


# -- atomic writing ----------------------------------------------------------------------------------------------


def test_an_interrupted_write_leaves_nothing(tmp_path):
    def stop_after_two(done: int, total: int) -> None:
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_dataset(tmp_path / "set", 5, seed=0, size=(64, 64), progress=stop_after_two)
    assert list(tmp_path.iterdir()) == []


def test_refuses_a_folder_that_is_not_empty_and_fills_an_empty_one(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="already exists and is not an empty folder"):
        write_dataset(tmp_path / "full", 1)
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    (tmp_path / "empty").mkdir()
    progress = []
    write_dataset(tmp_path / "empty", 2, size=(64, 64), progress=lambda done, total: progress.append((done, total)))
    assert progress == [(1, 2), (2, 2)] and len(load_dataset(tmp_path / "empty")) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "full"]


# -- reading bad folders -----------------------------------------------------------------------------------------


def _broken(dataset: Path, tmp_path: Path, damage) -> Path:
    folder = tmp_path / "copy"
    shutil.copytree(dataset, folder)
    damage(folder)
    return folder


def _edit_json(name: str, edit):
    def damage(folder: Path) -> None:
        document = json.loads((folder / name).read_text())
        edit(document)
        (folder / name).write_text(json.dumps(document))

    return damage


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda f: (f / "panoptic.json").unlink(), r"panoptic\.json: missing"),
        (lambda f: (f / "panoptic.json").write_text("{oops"), r"panoptic\.json: not valid JSON"),
        (lambda f: (f / "panoptic.json").write_text("[]"), r"panoptic\.json: expected a JSON object"),
        (lambda f: (f / "instances.json").unlink(), r"instances\.json: missing"),
        (lambda f: (f / "images" / "000001.png").unlink(), r"images/000001\.png: missing \(listed in .*json\)"),
        (lambda f: (f / "semantic" / "000003.png").unlink(), r"semantic/000003\.png: missing"),
        (_edit_json("panoptic.json", lambda d: d.pop("categories")), r"'categories' must be a list of objects"),
        (_edit_json("panoptic.json", lambda d: d["annotations"].pop(1)), r"image 1 has no annotation"),
        (_edit_json("panoptic.json", lambda d: d["images"][0].update(height="96")), r"must be integers"),
        (
            _edit_json("panoptic.json", lambda d: d["annotations"][0]["segments_info"][0].update(category_id=42)),
            r"unknown categories \{42\}",
        ),
        (_edit_json("instances.json", lambda d: d.update(annotations={})), r"instances\.json: 'annotations' must be"),
    ],
)
def test_bad_folders_give_one_clear_error_naming_the_file(dataset, tmp_path, damage, message):
    folder = _broken(dataset, tmp_path, damage)
    with pytest.raises(InputError, match=message):
        load_dataset(folder)


def test_no_folder(tmp_path):
    with pytest.raises(InputError, match="no such dataset folder"):
        load_dataset(tmp_path / "nothing")


@pytest.mark.parametrize(
    "damage, read, message",
    [
        (lambda f: (f / "panoptic" / "000000.png").write_bytes(b"not a png"), "panoptic", "cannot read the image"),
        (lambda f: Image.new("RGB", (8, 8)).save(f / "images" / "000000.png"), "image", "expected 96 x 112 pixels"),
        (lambda f: Image.new("L", SIZE[::-1]).save(f / "panoptic" / "000000.png"), "panoptic", "expected a RGB"),
    ],
)
def test_bad_pngs_are_named_when_read(dataset, tmp_path, damage, read, message):
    record = load_dataset(_broken(dataset, tmp_path, damage))[0]
    with pytest.raises(InputError, match=message) as error:
        getattr(record, read)()
    assert "000000.png" in str(error.value)
