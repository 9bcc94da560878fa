"""Threshold boundaries pinned against transformers: a score (and an overlap ratio) exactly at the threshold.

transformers keeps a panoptic query whose class probability is strictly above ``threshold`` and a segment whose
kept share of its mask is strictly above ``overlap_mask_area_threshold``; an instance pair whose score is at least
``threshold`` (``>=``). The logits are built so that the values at stake are exact: masks at the working size
(384x384, no resampling), regions of whole columns, probabilities read back from float32 as both libraries do.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transformers

from m2f_deploy.processing import ImageProcessor

transformers.logging.set_verbosity_error()
HF = transformers.Mask2FormerImageProcessorPil()
OURS = {"fast": ImageProcessor(), "reference": ImageProcessor(postprocess="reference")}


def _outputs() -> dict[str, np.ndarray]:
    """Query 0: label 0 over the whole image; query 1: label 1, surer, over the first 96 of 384 columns. Query 0
    keeps 288/384 = 0.75 of its mask (exact in binary)."""
    cls = np.full((1, 2, 3), -4.0, np.float32)
    cls[0, 0, 0], cls[0, 1, 1] = 2.0, 3.0
    # +-20: sigmoid is exactly 1 or 0 in float32, so an instance pair's mean mask probability is exactly 1 and its
    # score is its class probability, whatever order a library sums in
    masks = np.full((1, 2, 384, 384), 20.0, np.float32)
    masks[0, 1, :, 96:] = -20.0
    return {"class_queries_logits": cls, "masks_queries_logits": masks}


def _torch(outputs):
    return SimpleNamespace(**{k: torch.from_numpy(v) for k, v in outputs.items()})


def _panoptic_scores(outputs) -> np.ndarray:
    return torch.softmax(torch.from_numpy(outputs["class_queries_logits"][0]), -1).max(-1).values.numpy()


def _labels(results) -> list[int]:
    return sorted(s["label_id"] for s in results[0]["segments_info"])


@pytest.mark.parametrize("path", OURS)
def test_panoptic_score_exactly_at_the_threshold_is_dropped(path):
    outputs = _outputs()
    score0 = float(_panoptic_scores(outputs)[0])  # query 0's probability, as float32 gives it
    below = float(np.nextafter(np.float32(score0), np.float32(0)))  # both compare in float32
    for threshold, kept in ((score0, [1]), (below, [0, 1])):
        options = {"threshold": threshold, "overlap_mask_area_threshold": 0.5}
        theirs = HF.post_process_panoptic_segmentation(_torch(outputs), **options)
        ours = OURS[path].post_process_panoptic_segmentation(outputs, **options)
        assert _labels(theirs) == _labels(ours) == kept, threshold


@pytest.mark.parametrize("path", OURS)
def test_panoptic_overlap_exactly_at_the_threshold_is_dropped(path):
    outputs = _outputs()
    for overlap, kept in ((0.75, [1]), (math.nextafter(0.75, 0.0), [0, 1])):
        options = {"threshold": 0.1, "overlap_mask_area_threshold": overlap}
        theirs = HF.post_process_panoptic_segmentation(_torch(outputs), **options)
        ours = OURS[path].post_process_panoptic_segmentation(outputs, **options)
        assert _labels(theirs) == _labels(ours) == kept, overlap
        ids = ours[0]["segmentation"]
        assert (ids == 0).sum() == (0 if kept == [0, 1] else 384 * 288)  # a dropped segment leaves its pixels at 0


@pytest.mark.parametrize("path", OURS)
def test_instance_score_exactly_at_the_threshold_is_kept(path):
    outputs = _outputs()
    score = float(_panoptic_scores(outputs).min())  # the weakest pair's score: its class probability (see above)
    for threshold, count in ((score, 2), (math.nextafter(score, 1.0), 1)):
        theirs = HF.post_process_instance_segmentation(_torch(outputs), threshold=threshold)
        ours = OURS[path].post_process_instance_segmentation(outputs, threshold=threshold)
        assert len(theirs[0]["segments_info"]) == len(ours[0]["segments_info"]) == count, threshold
