"""m2f_deploy.evaluation: panoptic quality (panopticapi's rules), mean IoU and COCO mask AP."""

from __future__ import annotations

import logging
import math
import sys

import numpy as np
import pytest

from m2f_deploy.coco import coco_rle
from m2f_deploy.data import CLASSES, generate_sample, write_dataset
from m2f_deploy.errors import InputError
from m2f_deploy.evaluation import InstanceEvaluator, PanopticEvaluator, mask_ap, mean_iou, panoptic_quality

# two thing and two stuff categories for the hand-made cases
CATEGORIES = [{"id": 0, "isthing": 1}, {"id": 1, "isthing": 1}, {"id": 2, "isthing": 0}, {"id": 3, "isthing": 0}]


def _result(segmentation, segments: dict[int, int], crowd: tuple[int, ...] = ()) -> dict:
    """A panoptic result: ``segments`` maps segment id -> category."""
    info = [{"id": i, "category_id": c, "iscrowd": int(i in crowd)} for i, c in segments.items()]
    return {"segmentation": np.array(segmentation), "segments_info": info}


def _prediction(segmentation, segments: dict[int, int]) -> dict:
    """What the panoptic post-process returns: ``label_id`` and ``score``."""
    info = [{"id": i, "label_id": c, "score": 0.9, "was_fused": False} for i, c in segments.items()]
    return {"segmentation": np.array(segmentation), "segments_info": info}


def _pq(prediction: dict, ground_truth: dict):
    return panoptic_quality([(prediction, ground_truth)], CATEGORIES)


# -- panoptic quality: hand-made cases ---------------------------------------------------------------------------


def test_iou_0_6_gives_sq_60_rq_100():
    gt = _result([[1] * 10 + [0, 0]], {1: 0})  # 10 pixels, then 2 VOID
    result = _pq(_prediction([[7] * 6 + [0] * 6], {7: 0}), gt)
    assert (result.all.pq, result.all.sq, result.all.rq, result.all.n) == pytest.approx((60, 60, 100, 1))
    assert (result.per_class[0].tp, result.per_class[0].fp, result.per_class[0].fn) == (1, 0, 0)


def test_prediction_pixels_on_void_leave_the_union():
    gt = _result([[1] * 10 + [0, 0]], {1: 0})
    # 6 pixels on the segment and 2 on VOID: IoU = 6 / (8 + 10 - 6 - 2) = 0.6
    result = _pq(_prediction([[7] * 6 + [0] * 4 + [7, 7]], {7: 0}), gt)
    assert result.all.sq == pytest.approx(60)


def test_a_missed_segment_gives_rq_two_thirds():
    gt = _result([[1, 1, 1, 2, 2, 2]], {1: 0, 2: 0})
    result = _pq(_prediction([[5, 5, 5, 0, 0, 0]], {5: 0}), gt)
    assert (result.all.pq, result.all.sq, result.all.rq) == pytest.approx((200 / 3, 100, 200 / 3))
    assert (result.per_class[0].tp, result.per_class[0].fn) == (1, 1)


def test_iou_of_one_half_is_not_a_match():
    gt = _result([[1, 1, 1, 1, 2, 2, 2, 2]], {1: 0, 2: 2})
    result = _pq(_prediction([[5, 5, 6, 6, 6, 6, 6, 6]], {5: 0, 6: 2}), gt)  # segment 1: IoU 2/4
    assert (result.per_class[0].tp, result.per_class[0].fp, result.per_class[0].fn) == (0, 1, 1)
    assert result.per_class[0].pq == 0 and result.per_class[0].sq == 0
    assert result.per_class[2].sq == pytest.approx(100 * 4 / 6)  # stuff: IoU 4/6, matched


def test_wrong_category_is_a_false_negative_and_a_false_positive():
    gt = _result([[1, 1, 1, 1]], {1: 0})
    result = _pq(_prediction([[5, 5, 5, 5]], {5: 1}), gt)
    assert (result.per_class[0].fn, result.per_class[1].fp) == (1, 1)
    assert (result.all.pq, result.all.n) == (0, 2)


def test_false_positive_mostly_on_void_is_ignored():
    gt = _result([[1, 1, 1, 0, 0, 0]], {1: 0})
    half_and_more = _pq(_prediction([[5, 5, 5, 6, 6, 6]], {5: 0, 6: 1}), gt)
    assert 1 not in half_and_more.per_class  # segment 6 lies on VOID only: neither TP nor FP
    half = _pq(_prediction([[5, 5, 6, 6, 0, 0]], {5: 0, 6: 1}), gt)  # 1 of 2 pixels on VOID: not more than half
    assert half.per_class[1].fp == 1


def test_crowd_regions_are_not_false_negatives_and_absorb_their_category_only():
    # ground truth: a crowd of category 0 (id 3) and a stuff segment (id 4)
    gt = _result([[3, 3, 3, 3, 4, 4, 4, 4]], {3: 0, 4: 2}, crowd=(3,))
    same = _pq(_prediction([[5, 5, 5, 0, 6, 6, 6, 6]], {5: 0, 6: 2}), gt)
    assert 0 not in same.per_class  # the crowd is no FN, a category-0 prediction on it no FP
    assert same.all.pq == pytest.approx(100) and same.all.n == 1
    other = _pq(_prediction([[5, 5, 5, 0, 6, 6, 6, 6]], {5: 1, 6: 2}), gt)
    assert other.per_class[1].fp == 1  # another category: the crowd does not excuse it


def test_crowd_segments_are_never_matched():
    gt = _result([[3, 3, 3, 3]], {3: 0}, crowd=(3,))
    result = _pq(_prediction([[5, 5, 5, 5]], {5: 0}), gt)
    assert result.per_class == {} and result.all.n == 0 and math.isnan(result.all.pq)


def test_things_stuff_and_classes_without_any_segment():
    gt = _result([[1, 1, 2, 2, 3, 3]], {1: 0, 2: 2, 3: 3})
    pred = _prediction([[5, 5, 6, 6, 0, 0]], {5: 0, 6: 2})
    result = _pq(pred, gt)
    assert (result.things.pq, result.things.n) == (pytest.approx(100), 1)  # category 1 has no segment: not counted
    assert (result.stuff.pq, result.stuff.rq, result.stuff.n) == (pytest.approx(50), pytest.approx(50), 2)
    assert result.all.pq == pytest.approx(200 / 3)
    assert sorted(result.per_class) == [0, 2, 3]


def test_accumulates_counts_over_images_before_averaging():
    perfect = (_prediction([[5, 5]], {5: 0}), _result([[1, 1]], {1: 0}))
    missed = (_prediction([[0, 0]], {}), _result([[1, 1]], {1: 0}))
    result = panoptic_quality([perfect, missed], CATEGORIES)
    assert result.all.rq == pytest.approx(100 * 1 / 1.5)  # TP 1, FN 1 over both images, not the mean of 100 and 0


def test_post_process_maps_float_minus_one_and_instance_ids_from_zero():
    gt = _result([[1, 1, 2, 2]], {1: 0, 2: 2})
    nothing = {"segmentation": np.full((1, 4), -1, np.float32), "segments_info": []}  # HF: nothing found
    assert _pq(nothing, gt).all.rq == 0
    instance_style = _prediction(np.array([[0, 0, -1, -1]], np.float32), {0: 0})  # ids from 0, -1 background
    assert _pq(instance_style, gt).per_class[0].tp == 1


@pytest.mark.parametrize(
    "prediction, message",
    [
        (_prediction([[5, 9]], {5: 0}), "not in segments_info"),
        (_prediction([[5, 5]], {5: 7}), "unknown category 7"),
        (_prediction([[5, 5, 5]], {5: 0}), "size"),
        ({"segmentation": np.array([[5, 5]]), "segments_info": [{"id": 5}]}, "'label_id'"),
        ({"segmentation": np.array([[0.5, 1]]), "segments_info": []}, "whole numbers"),
        ({"segments_info": []}, "'segmentation'"),
    ],
)
def test_bad_predictions_raise_input_error(prediction, message):
    with pytest.raises(InputError, match=message):
        _pq(prediction, _result([[1, 1]], {1: 0}))


def test_a_segment_id_listed_twice_counts_once_with_its_first_category(caplog):
    gt = _result([[1, 1, 2, 2]], {1: 0, 2: 2})
    fused = _prediction([[5, 5, 6, 6]], {5: 0, 6: 2})
    fused["segments_info"].append({"id": 6, "label_id": 2, "score": 0.7})  # HF: a fused segment, once per query
    assert _pq(fused, gt).all.rq == pytest.approx(100)
    clash = _prediction([[5, 5, 6, 6]], {5: 0, 6: 2})
    clash["segments_info"].append({"id": 6, "label_id": 1, "score": 0.7})  # HF: an id reused after a fused one
    with caplog.at_level(logging.WARNING, logger="m2f_deploy"):
        result = _pq(clash, gt)
    assert result.all.rq == pytest.approx(100) and 1 not in result.per_class
    assert "segment id 6 is listed with categories 2 and 1" in caplog.text


# -- panoptic quality: against a transcription of panopticapi's pq_compute_single_core ---------------------------


def _panopticapi(pairs, categories) -> dict:
    """panopticapi's per-image loop, transcribed (dicts and np.unique as there), and its pq_average."""
    OFFSET, VOID = 256 * 256 * 256, 0
    stat = {c["id"]: {"iou": 0.0, "tp": 0, "fp": 0, "fn": 0} for c in categories}
    for pred_ann, gt_ann in pairs:
        pan_gt, pan_pred = gt_ann["segmentation"], pred_ann["segmentation"]
        gt_segms = {el["id"]: dict(el) for el in gt_ann["segments_info"]}
        pred_segms = {el["id"]: {"category_id": el["label_id"]} for el in pred_ann["segments_info"]}
        for label, count in zip(*np.unique(pan_gt, return_counts=True)):
            if label in gt_segms:
                gt_segms[label]["area"] = count
        for label, count in zip(*np.unique(pan_pred, return_counts=True)):
            if label != VOID:
                pred_segms[label]["area"] = count
        pan_gt_pred = pan_gt.astype(np.uint64) * OFFSET + pan_pred.astype(np.uint64)
        gt_pred_map = {
            (int(k) // OFFSET, int(k) % OFFSET): v for k, v in zip(*np.unique(pan_gt_pred, return_counts=True))
        }
        gt_matched, pred_matched = set(), set()
        for (gt_label, pred_label), intersection in gt_pred_map.items():
            if gt_label not in gt_segms or pred_label not in pred_segms or gt_segms[gt_label]["iscrowd"] == 1:
                continue
            if gt_segms[gt_label]["category_id"] != pred_segms[pred_label]["category_id"]:
                continue
            union = (
                pred_segms[pred_label]["area"]
                + gt_segms[gt_label]["area"]
                - intersection
                - gt_pred_map.get((VOID, pred_label), 0)
            )
            iou = intersection / union
            if iou > 0.5:
                stat[gt_segms[gt_label]["category_id"]]["tp"] += 1
                stat[gt_segms[gt_label]["category_id"]]["iou"] += iou
                gt_matched.add(gt_label)
                pred_matched.add(pred_label)
        crowd_labels_dict = {}
        for gt_label, gt_info in gt_segms.items():
            if gt_label in gt_matched:
                continue
            if gt_info["iscrowd"] == 1:
                crowd_labels_dict[gt_info["category_id"]] = gt_label
                continue
            stat[gt_info["category_id"]]["fn"] += 1
        for pred_label, pred_info in pred_segms.items():
            if pred_label in pred_matched:
                continue
            intersection = gt_pred_map.get((VOID, pred_label), 0)
            if pred_info["category_id"] in crowd_labels_dict:
                intersection += gt_pred_map.get((crowd_labels_dict[pred_info["category_id"]], pred_label), 0)
            if intersection / pred_info["area"] > 0.5:
                continue
            stat[pred_info["category_id"]]["fp"] += 1
    averages = {}
    for name, isthing in (("all", None), ("things", True), ("stuff", False)):
        pq = sq = rq = n = 0
        for c in categories:
            if isthing is not None and bool(c["isthing"]) != isthing:
                continue
            s = stat[c["id"]]
            if s["tp"] + s["fp"] + s["fn"] == 0:
                continue
            n += 1
            pq += s["iou"] / (s["tp"] + 0.5 * s["fp"] + 0.5 * s["fn"])
            sq += s["iou"] / s["tp"] if s["tp"] != 0 else 0
            rq += s["tp"] / (s["tp"] + 0.5 * s["fp"] + 0.5 * s["fn"])
        averages[name] = (100 * pq / n, 100 * sq / n, 100 * rq / n, n) if n else None
    return averages


def _random_panoptic(rng: np.random.Generator, size: int, crowd: bool) -> tuple[dict, dict]:
    """A ground truth of random rectangles (some VOID, maybe crowds) and a prediction made by jittering it."""
    gt_map = np.zeros((size, size), np.int64)
    categories, crowds = {}, []
    for segment in range(1, rng.integers(2, 8)):
        y, x = rng.integers(0, size - 2, 2)
        h, w = rng.integers(2, size // 2 + 2, 2)
        gt_map[y : y + h, x : x + w] = segment
        categories[segment] = int(rng.integers(0, 4))
        if crowd and rng.random() < 0.3:
            crowds.append(segment)
    present = set(np.unique(gt_map).tolist()) - {0}
    gt = _result(gt_map, {i: c for i, c in categories.items() if i in present}, tuple(crowds))
    pred_map = np.where(rng.random((size, size)) < 0.04, rng.integers(0, 9, (size, size)), gt_map)
    pred_map = np.roll(pred_map, rng.integers(-1, 2, 2), axis=(0, 1)) + 10 * (pred_map > 0)
    labels = {
        int(i): (categories.get(int(i) - 10, 0) if rng.random() < 0.8 else int(rng.integers(0, 4)))
        for i in np.unique(pred_map)
        if i > 0
    }
    return _prediction(pred_map, labels), gt


@pytest.mark.parametrize("crowd", [False, True], ids=["plain", "crowds"])
def test_matches_panopticapi_on_random_cases(crowd):
    rng = np.random.default_rng(7)
    pairs = [_random_panoptic(rng, 16, crowd) for _ in range(40)]
    expected = _panopticapi(pairs, CATEGORIES)
    result = panoptic_quality(pairs, CATEGORIES)
    for name in ("all", "things", "stuff"):
        ours = getattr(result, name)
        assert (ours.pq, ours.sq, ours.rq, ours.n) == pytest.approx(expected[name], rel=1e-12), name


# -- panoptic quality and mean IoU on generated data -------------------------------------------------------------


def test_ground_truth_fed_back_scores_100():
    samples = [generate_sample((3, i), (96, 128)) for i in range(3)]
    evaluator = PanopticEvaluator(CLASSES)
    for s in samples:
        prediction = _prediction(s.panoptic, s.category_of)
        evaluator.update(prediction, {"segmentation": s.panoptic, "segments_info": s.segments})
    result = evaluator.compute()
    for group in (result.all, result.things, result.stuff):
        assert (group.pq, group.sq, group.rq) == pytest.approx((100, 100, 100))
    assert result.things.n + result.stuff.n == result.all.n == len(result.per_class)
    semantic = mean_iou([(s.semantic, s.semantic) for s in samples], num_classes=len(CLASSES))
    assert semantic.mean_iou == semantic.pixel_accuracy == semantic.mean_accuracy == pytest.approx(100)


# -- mean IoU ----------------------------------------------------------------------------------------------------


def test_mean_iou_by_hand():
    gt = np.array([[0, 0, 0, 1], [1, 1, 255, 255]])
    pred = np.array([[0, 0, 1, 1], [1, 2, 0, 2]])  # the two pixels under 255 do not count
    result = mean_iou([(pred, gt)], num_classes=4)
    # class 0: I 2, U 3; class 1: I 2, U 4; class 2: I 0, U 1; class 3: never seen
    np.testing.assert_allclose(result.per_class_iou, [200 / 3, 50, 0, np.nan])
    assert result.mean_iou == pytest.approx((200 / 3 + 50 + 0) / 3)
    assert result.pixel_accuracy == pytest.approx(100 * 4 / 6)
    np.testing.assert_allclose(result.per_class_accuracy, [200 / 3, 200 / 3, np.nan, np.nan])
    assert result.mean_accuracy == pytest.approx(200 / 3)


def test_mean_iou_sums_over_the_dataset_and_takes_post_process_dicts():
    big = (np.zeros((10, 10), np.int64), np.zeros((10, 10), np.int64))  # class 0 right on 100 pixels
    small = ({"segmentation": np.array([[0, 1]])}, np.array([[1, 1]]))  # class 1 half right
    result = mean_iou([big, small], num_classes=2)
    np.testing.assert_allclose(result.per_class_iou, [100 * 100 / 101, 50])


@pytest.mark.parametrize(
    "pred, gt, message",
    [
        (np.array([[0, 5]]), np.array([[0, 0]]), "prediction holds class id 5"),
        (np.array([[0, 0]]), np.array([[0, 7]]), "ground truth holds class id 7"),
        (np.array([[0, 0, 0]]), np.array([[0, 0]]), "size"),
        (np.zeros(3), np.zeros(3), r"\[H, W\]"),
    ],
)
def test_mean_iou_rejects_bad_maps(pred, gt, message):
    with pytest.raises(InputError, match=message):
        mean_iou([(pred, gt)], num_classes=3)


# -- mask AP -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def instances(tmp_path_factory):
    """A small dataset's instances.json path and its samples."""
    folder = write_dataset(tmp_path_factory.mktemp("ap") / "set", 3, seed=5, size=(96, 96))
    return folder / "instances.json", [generate_sample((5, i), (96, 96)) for i in range(3)]


def _instance_prediction(sample, binary: bool = False) -> dict:
    things = [s for s in sample.segments if CLASSES[s["category_id"]]["isthing"]]
    info = [{"id": k, "label_id": s["category_id"], "score": 0.9} for k, s in enumerate(things)]
    masks = np.stack([sample.panoptic == s["id"] for s in things]).astype(np.float32)
    if binary:
        return {"segmentation": masks, "segments_info": info}
    segmentation = np.full(sample.panoptic.shape, -1, np.float32)
    for k, mask in enumerate(masks):
        segmentation[mask > 0] = k
    return {"segmentation": segmentation, "segments_info": info}


@pytest.mark.parametrize("binary", [False, True], ids=["id-map", "binary-maps"])
def test_ground_truth_instances_score_ap_100(instances, binary):
    path, samples = instances
    result = mask_ap({i: _instance_prediction(s, binary) for i, s in enumerate(samples)}, path)
    assert (result.ap, result.ap50, result.ap75) == pytest.approx((100, 100, 100))
    present = {s["category_id"] for sample in samples for s in sample.segments if CLASSES[s["category_id"]]["isthing"]}
    assert {c for c, v in result.per_class_ap.items() if not math.isnan(v)} == present


def test_one_instance_at_iou_0_62_scores_ap_30():
    gt_mask = np.zeros((10, 10), bool)
    gt_mask[:, :10] = True  # 100 pixels
    truth = {
        "images": [{"id": 1, "height": 10, "width": 10}],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 3,
                "segmentation": coco_rle(gt_mask),
                "area": 100,
                "bbox": [0, 0, 10, 10],
                "iscrowd": 0,
            }
        ],
        "categories": [{"id": 3, "name": "circle"}],
    }
    segmentation = np.full((10, 10), -1.0, np.float32)
    segmentation.reshape(-1)[:62] = 0  # IoU 0.62: a match at thresholds 0.50, 0.55, 0.60 of the ten
    prediction = {"segmentation": segmentation, "segments_info": [{"id": 0, "label_id": 3, "score": 0.8}]}
    result = mask_ap([(1, prediction)], truth)
    assert (result.ap, result.ap50, result.ap75) == pytest.approx((30, 100, 0))


def test_mask_ap_without_predictions_is_zero(instances):
    assert mask_ap({}, instances[0]).ap == 0


@pytest.mark.parametrize(
    "predictions, message",
    [
        ({99: {"segmentation": np.zeros((96, 96)), "segments_info": []}}, "no such image"),
        ({0: {"segmentation": np.zeros((50, 96)), "segments_info": []}}, "expected"),
        ({0: {"segmentation": [[1, 2]], "segments_info": []}}, "return_coco_annotation=False"),
        ({0: {"segmentation": np.zeros((96, 96)), "segments_info": [{"id": 0}]}}, "'label_id' and 'score'"),
        (
            {0: {"segmentation": np.zeros((1, 96, 96)), "segments_info": [{"id": 3, "label_id": 3, "score": 1}]}},
            "no mask",
        ),
    ],
)
def test_mask_ap_rejects_bad_predictions(instances, predictions, message):
    with pytest.raises(InputError, match=message):
        mask_ap(predictions, instances[0])


def test_an_image_predicted_twice_is_rejected(instances):
    path, samples = instances
    evaluator = InstanceEvaluator(path)
    evaluator.update(0, _instance_prediction(samples[0]))
    with pytest.raises(InputError, match="image 0: given twice"):
        evaluator.update(0, _instance_prediction(samples[0]))


def test_mask_ap_names_a_bad_ground_truth_file(tmp_path):
    bad = tmp_path / "instances.json"
    bad.write_text("{")
    with pytest.raises(InputError, match="instances.json: not valid JSON"):
        mask_ap({}, bad)
    with pytest.raises(InputError, match="'annotations' must be a list"):
        mask_ap({}, {"images": [], "categories": []})


def test_mask_ap_without_pycocotools_says_so(instances, monkeypatch):
    monkeypatch.setitem(sys.modules, "pycocotools", None)
    monkeypatch.setitem(sys.modules, "pycocotools.coco", None)
    with pytest.raises(InputError, match="pip install pycocotools"):
        mask_ap({}, instances[0])
