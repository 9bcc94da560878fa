"""m2f_deploy.export.agreement: two models' results compared, with panopticapi's match rule (IoU > 0.5, as PQ)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from m2f_deploy.errors import InputError
from m2f_deploy.evaluation import panoptic_quality
from m2f_deploy.export.agreement import matched_segments, semantic_agreement


def _panoptic(row: list[int], labels: dict[int, int]) -> dict:
    info = [{"id": i, "label_id": c, "score": 0.9, "was_fused": False} for i, c in labels.items()]
    return {"segmentation": np.array([row]), "segments_info": info}


@pytest.mark.parametrize(
    ("other_row", "matched"),
    [
        ([5, 5, 5, 6, 6, 6, 6, 6], 1),  # IoU 3/4
        ([5, 5, 5, 5, 6, 6, 6, 6], 1),  # IoU 1
        ([5, 5, 6, 6, 6, 6, 6, 6], 0),  # IoU 2/4: exactly one half is not a match
        ([5, 5, 5, 5, 5, 5, 5, 5], 0),  # IoU 4/8
        ([5, 5, 5, 5, 5, 6, 6, 6], 1),  # IoU 4/5
    ],
)
def test_match_at_iou_above_one_half_as_panoptic_quality(other_row, matched):
    reference = _panoptic([1, 1, 1, 1, 2, 2, 2, 2], {1: 0, 2: 1})
    other = _panoptic(other_row, {5: 0, 6: 2})
    assert matched_segments([reference], [other]) == (matched, 2)
    # the same pair scored by PQ (reference as ground truth): a match there exactly when it is one here
    truth = {"segmentation": reference["segmentation"],
             "segments_info": [{"id": 1, "category_id": 0}, {"id": 2, "category_id": 1}]}  # fmt: skip
    categories = [{"id": c, "isthing": 1} for c in (0, 1, 2)]
    assert panoptic_quality([(other, truth)], categories).per_class[0].tp == matched


def test_a_segment_of_another_label_is_no_match():
    reference = _panoptic([1, 1, 2, 2], {1: 0, 2: 1})
    other = _panoptic([3, 3, 4, 4], {3: 1, 4: 1})
    assert matched_segments([reference], [other]) == (1, 2)


def test_results_of_unequal_length_are_an_error_not_truncated():
    one = _panoptic([1, 1], {1: 0})
    with pytest.raises(InputError, match="2 reference results against 1"):
        matched_segments([one, one], [one])
    with pytest.raises(InputError, match="1 reference results against 2"):
        semantic_agreement([np.zeros((2, 2))], [np.zeros((2, 2))] * 2)
    with pytest.raises(InputError, match="shapes"):
        matched_segments([one], [_panoptic([1, 1, 1], {1: 0})])


def test_semantic_agreement_averages_per_image():
    a = [np.zeros((2, 2), np.int64), np.zeros((1, 4), np.int64)]
    b = [np.array([[0, 1], [1, 1]]), np.zeros((1, 4), np.int64)]
    assert semantic_agreement(a, b) == pytest.approx((0.25 + 1.0) / 2)
    with pytest.raises(InputError, match="shapes"):
        semantic_agreement([np.zeros((2, 2))], [np.zeros((2, 3))])
    with pytest.raises(InputError, match="no images"):
        semantic_agreement([], [])


def test_agreement_and_the_stand_in_import_without_torch():
    code = (
        "import sys, m2f_deploy.export.agreement, m2f_deploy.runtime.plugin_standin; "
        "heavy = [m for m in ('torch', 'torchvision', 'transformers') if m in sys.modules]; assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
