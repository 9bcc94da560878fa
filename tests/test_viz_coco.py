"""COCO encodings (RLE against pycocotools, panoptic PNG ids, records) and overlays."""

from __future__ import annotations

import logging

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from pycocotools import mask as mask_utils

from m2f_deploy import coco, viz
from m2f_deploy.coco import coco_rle


@settings(max_examples=60, deadline=None)
@given(arrays(bool, st.tuples(st.integers(1, 40), st.integers(1, 40))))
def test_coco_rle_equals_pycocotools(mask):
    want = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    got = coco_rle(mask)
    assert got["counts"] == want["counts"].decode() and got["size"] == list(want["size"])
    assert np.array_equal(mask_utils.decode({"size": got["size"], "counts": got["counts"]}), mask)


def test_panoptic_png_ids_round_trip():
    ids = np.array([[0, 1, 255], [256, 65535, 70000]])
    assert np.array_equal(coco.rgb_to_id(coco.id_to_rgb(ids)), ids)
    assert coco.id_to_rgb(ids).dtype == np.uint8


def test_panoptic_record_merges_repeated_ids(caplog):
    """transformers' numbering after a fused label can give two classes one id: kept once, with a warning."""
    segmentation = np.array([[1, 1, 2], [0, 2, 2]], np.int32)
    infos = [
        {"id": 1, "label_id": 4, "score": 0.9}, {"id": 2, "label_id": 1, "score": 0.8},
        {"id": 1, "label_id": 4, "score": 0.7}, {"id": 2, "label_id": 3, "score": 0.6},
    ]  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="m2f_deploy"):
        ids, records = coco.panoptic_record({"segmentation": segmentation, "segments_info": infos})
    assert [(r["id"], r["category_id"], r["area"], r["bbox"]) for r in records] == [
        (1, 4, 2, [0, 0, 2, 1]), (2, 1, 3, [1, 0, 2, 2])
    ]  # fmt: skip
    assert "shared by classes 1 and 3" in caplog.text
    empty_ids, empty = coco.panoptic_record({"segmentation": np.full((2, 2), -1.0, np.float32), "segments_info": []})
    assert empty == [] and not empty_ids.any()


def test_overlay_tints_segments_and_adds_a_legend():
    image = np.full((40, 60, 3), 200, np.uint8)
    segmentation = np.zeros((40, 60), np.int32)
    segmentation[10:30, 5:25] = 1
    segmentation[5:15, 40:55] = 2
    result = {"segmentation": segmentation, "segments_info": [
        {"id": 1, "label_id": 2, "score": 0.9}, {"id": 2, "label_id": 2, "score": 0.8}]}  # fmt: skip
    picture = np.asarray(viz.draw_panoptic(image, result, {2: "circle"}))
    assert picture.shape[0] >= 40 and picture.shape[1] > 60  # the legend is right of the image (and may be taller)
    assert np.array_equal(picture[0, 0], [200, 200, 200])  # void pixels untouched
    inside_1, inside_2 = picture[20, 15], picture[10, 47]
    assert not np.array_equal(inside_1, [200, 200, 200])
    assert not np.array_equal(inside_1, inside_2)  # two instances of one class: two shades
    legend = picture[:, 60:]
    assert (legend != 255).any(axis=2).sum() > 100  # swatches and text
    no_legend = viz.draw_semantic(image, segmentation, {0: "sky", 1: "a", 2: "b"}, legend=False)
    assert no_legend.size == (60, 40)


def test_class_colours_are_stable_and_distinct():
    colours = [viz.class_colour(k) for k in range(20)]
    assert len(set(colours)) == 20
    assert viz.class_colour(7) == colours[7]
    assert viz.class_colour(7, shade=1) != colours[7]
