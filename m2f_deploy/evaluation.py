"""Segmentation metrics: panoptic quality, mean IoU and mask AP, for predictions against ground truth.

numpy only; pycocotools is imported by mask AP alone, when the result is computed.

* **Panoptic quality** (:func:`panoptic_quality`, :class:`PanopticEvaluator`) follows COCO's panopticapi
  ``pq_compute``: a predicted and a ground-truth segment of the same category match when their IoU is above 0.5,
  the prediction's pixels on VOID (ground-truth id 0) left out of the union; unmatched ground truth is a false
  negative except crowd segments; an unmatched prediction is a false positive unless more than half of it lies
  on VOID plus the crowd segment of its category (panopticapi's rule: the *last* crowd segment of that category
  listed). PQ, SQ and RQ are averaged over the categories that have any TP, FP or FN.
* **Mean IoU** (:func:`mean_iou`, :class:`SemanticEvaluator`) as mmseg and HF ``evaluate``'s ``mean_iou``:
  intersection and union per class summed over the whole dataset, then averaged over the classes seen.
* **Mask AP** (:func:`mask_ap`, :class:`InstanceEvaluator`): pycocotools' ``COCOeval`` with ``iouType="segm"``.

Predictions are what ``ImageProcessor``'s post-processes return. Panoptic: ``{"segmentation": [H, W] ids,
"segments_info": [{"id", "label_id", ...}]}``; a pixel whose value is 0 or -1 and not a listed id has no
segment. Ground truth: the same structure with ``category_id`` (``label_id`` is accepted too) and optionally
``iscrowd``, id 0 for VOID, as COCO panoptic PNGs hold it (``m2f_deploy.data`` reads them). All numbers are in
percent (0-100); an average over no category is NaN.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from m2f_deploy.coco import coco_rle
from m2f_deploy.errors import InputError

IOU_MATCH = 0.5
"""Two segments match when their IoU is above this, strictly (panopticapi's ``iou > 0.5``); PQ and
:func:`m2f_deploy.export.agreement.matched_segments` both use it."""

log = logging.getLogger("m2f_deploy")

_NO_SEGMENT = (0, -1)
_NAN = float("nan")


# -- panoptic quality --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PQ:
    """PQ, SQ, RQ (percent) averaged over ``n`` categories (NaN when ``n`` is 0)."""

    pq: float
    sq: float
    rq: float
    n: int


@dataclass(frozen=True)
class ClassPQ:
    """One category's PQ, SQ, RQ (percent) and its counts of true positives, false positives, false negatives."""

    pq: float
    sq: float
    rq: float
    tp: int
    fp: int
    fn: int


@dataclass(frozen=True)
class PanopticResult:
    """Panoptic quality overall, over thing and over stuff categories, and per category (those counted only)."""

    all: PQ
    things: PQ
    stuff: PQ
    per_class: dict[int, ClassPQ]


@dataclass(frozen=True)
class _Segments:
    """One image's segmentation: ``index`` ``[H, W]`` (0: none, k: ``ids[k - 1]``), category and crowd per segment."""

    index: np.ndarray
    ids: np.ndarray
    categories: np.ndarray
    crowd: np.ndarray


class PanopticEvaluator:
    """Accumulates panopticapi's per-category counts one image at a time; :meth:`compute` gives the result.

    ``categories``: COCO panoptic categories, dicts with ``id`` and ``isthing``.
    """

    def __init__(self, categories: Sequence[Mapping[str, Any]]):
        try:
            self._isthing = {int(c["id"]): bool(c["isthing"]) for c in categories}
        except (KeyError, TypeError, ValueError):
            raise InputError("categories must be dicts with 'id' and 'isthing'") from None
        if not self._isthing:
            raise InputError("categories is empty")
        self._position = {category: k for k, category in enumerate(self._isthing)}
        count = len(self._isthing)
        self._tp, self._fp, self._fn = (np.zeros(count, np.int64) for _ in range(3))
        self._iou = np.zeros(count, np.float64)

    def update(self, prediction: Mapping[str, Any], ground_truth: Mapping[str, Any]) -> None:
        """Add one image: ``prediction`` and ``ground_truth`` as in the module docstring, maps of one size."""
        gt = self._segments(ground_truth, "ground truth")
        pred = self._segments(prediction, "prediction")
        if gt.index.shape != pred.index.shape:
            raise InputError(f"prediction of size {pred.index.shape} for ground truth of size {gt.index.shape}")
        rows, columns = len(gt.ids) + 1, len(pred.ids) + 1
        joint = np.bincount((gt.index * columns + pred.index).ravel(), minlength=rows * columns)
        overlap = joint.reshape(rows, columns)  # [1 + G, 1 + P]: row 0 VOID, column 0 no segment
        gt_area, pred_area = overlap.sum(axis=1), overlap.sum(axis=0)

        gt_matched, pred_matched = np.zeros(rows, bool), np.zeros(columns, bool)
        for g, p in zip(*np.nonzero(overlap[1:, 1:])):
            category = gt.categories[g]
            if gt.crowd[g] or category != pred.categories[p]:
                continue
            g, p = g + 1, p + 1
            union = pred_area[p] + gt_area[g] - overlap[g, p] - overlap[0, p]
            iou = overlap[g, p] / union
            if iou > IOU_MATCH:
                self._tp[self._position[category]] += 1
                self._iou[self._position[category]] += iou
                gt_matched[g] = pred_matched[p] = True

        crowd_of: dict[int, int] = {}  # category -> row of its crowd segment (the last one, as panopticapi)
        for g, (category, crowd) in enumerate(zip(gt.categories, gt.crowd), start=1):
            if crowd:
                crowd_of[category] = g
            elif not gt_matched[g]:
                self._fn[self._position[category]] += 1
        for p, category in enumerate(pred.categories, start=1):
            if pred_matched[p] or pred_area[p] == 0:  # a listed segment without pixels is not counted
                continue
            ignored = overlap[0, p] + (overlap[crowd_of[category], p] if category in crowd_of else 0)
            if ignored / pred_area[p] <= IOU_MATCH:
                self._fp[self._position[category]] += 1

    def compute(self) -> PanopticResult:
        """PQ, SQ, RQ over all, thing and stuff categories, and per category, from the images added so far."""
        counted = (self._tp + self._fp + self._fn) > 0
        denominator = np.maximum(self._tp + 0.5 * self._fp + 0.5 * self._fn, 1e-12)
        pq = 100 * self._iou / denominator
        sq = 100 * np.where(self._tp > 0, self._iou / np.maximum(self._tp, 1), 0.0)
        rq = 100 * self._tp / denominator
        things = np.array(list(self._isthing.values()))

        def average(selected: np.ndarray) -> PQ:
            chosen = counted & selected
            if not chosen.any():
                return PQ(_NAN, _NAN, _NAN, 0)
            return PQ(float(pq[chosen].mean()), float(sq[chosen].mean()), float(rq[chosen].mean()), int(chosen.sum()))

        per_class = {
            category: ClassPQ(
                float(pq[k]), float(sq[k]), float(rq[k]), int(self._tp[k]), int(self._fp[k]), int(self._fn[k])
            )
            for category, k in self._position.items()
            if counted[k]
        }
        return PanopticResult(average(np.ones_like(things)), average(things), average(~things), per_class)

    def _segments(self, result: Mapping[str, Any], name: str) -> _Segments:
        """Check one panoptic result and number its segments 1..N in listed order.

        An id listed twice is one segment (HF lists a fused segment once per query); with two categories (HF's
        numbering after fused labels can reuse an id) the first is kept, with a warning, as ``coco.panoptic_record``
        does: the map cannot tell the two apart.
        """
        segmentation = _id_map(result, name)
        ids: dict[int, int] = {}  # segment id -> category
        crowd: dict[int, bool] = {}
        for info in _segments_info(result, name):
            try:
                segment = int(info["id"])
                category = int(info["category_id"] if "category_id" in info else info["label_id"])
            except (KeyError, TypeError, ValueError):
                raise InputError(
                    f"{name}: each segments_info entry needs an 'id' and a 'category_id' or 'label_id', got {info!r}"
                ) from None
            if category not in self._position:
                raise InputError(f"{name}: segment {segment} has unknown category {category}")
            if ids.setdefault(segment, category) != category:
                log.warning(
                    "%s: segment id %d is listed with categories %d and %d (transformers' numbering after fused "
                    "labels); counted as category %d",
                    name,
                    segment,
                    ids[segment],
                    category,
                    ids[segment],
                )
            crowd[segment] = crowd.get(segment, False) or bool(info.get("iscrowd", 0))
        listed = np.array(list(ids), np.int64)
        return _Segments(
            index=_index_map(segmentation, listed, name),
            ids=listed,
            categories=np.array(list(ids.values()), np.int64),
            crowd=np.array([crowd[i] for i in ids], bool),
        )


def _index_map(segmentation: np.ndarray, listed: np.ndarray, name: str) -> np.ndarray:
    """``[H, W]`` int64: ``k + 1`` where ``segmentation`` holds ``listed[k]``, 0 where it holds an unlisted 0 or -1.

    Any other unlisted value raises ``InputError`` (panopticapi's check of a PNG against its JSON).
    """
    if not len(listed):
        found, index = np.zeros(segmentation.shape, bool), np.zeros(segmentation.shape, np.int64)
    else:
        order = np.argsort(listed)
        position = np.searchsorted(listed[order], segmentation).clip(0, len(listed) - 1)
        found = listed[order][position] == segmentation
        index = np.where(found, order[position] + 1, 0)
    stray = np.unique(segmentation[~found & ~np.isin(segmentation, _NO_SEGMENT)])
    if stray.size:
        raise InputError(f"{name}: segment ids {stray[:10].tolist()} are in the segmentation but not in segments_info")
    return index.astype(np.int64)


def panoptic_quality(
    pairs: Iterable[tuple[Mapping[str, Any], Mapping[str, Any]]], categories: Sequence[Mapping[str, Any]]
) -> PanopticResult:
    """COCO panoptic quality of ``(prediction, ground_truth)`` pairs (see :class:`PanopticEvaluator`)."""
    evaluator = PanopticEvaluator(categories)
    for prediction, ground_truth in pairs:
        evaluator.update(prediction, ground_truth)
    return evaluator.compute()


# -- mean IoU ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SemanticResult:
    """Mean IoU and accuracies in percent; per-class values are indexed by class id, NaN for classes never seen.

    ``pixel_accuracy``: correct pixels over labelled pixels; ``mean_accuracy``: mean over classes of the recall.
    """

    mean_iou: float
    pixel_accuracy: float
    mean_accuracy: float
    per_class_iou: tuple[float, ...]
    per_class_accuracy: tuple[float, ...]


class SemanticEvaluator:
    """Accumulates a ``[num_classes, num_classes]`` confusion matrix (ground truth x prediction) over images."""

    def __init__(self, num_classes: int, ignore_index: int | None = 255):
        if num_classes < 1:
            raise InputError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self._confusion = np.zeros((num_classes, num_classes), np.int64)

    def update(self, prediction: Any, ground_truth: Any) -> None:
        """Add one image: ``prediction`` ``[H, W]`` class ids (or a dict with ``"segmentation"``), ``ground_truth``
        ``[H, W]`` class ids, ``ignore_index`` where unlabelled."""
        gt = _label_map(ground_truth, "ground truth")
        pred = _label_map(prediction["segmentation"] if isinstance(prediction, Mapping) else prediction, "prediction")
        if gt.shape != pred.shape:
            raise InputError(f"prediction of size {pred.shape} for ground truth of size {gt.shape}")
        if self.ignore_index is not None:
            labelled = gt != self.ignore_index
            gt, pred = gt[labelled], pred[labelled]
        for values, name in ((gt, "ground truth"), (pred, "prediction")):
            bad = values[(values < 0) | (values >= self.num_classes)]
            if bad.size:
                raise InputError(f"{name} holds class id {int(bad[0])}, outside 0..{self.num_classes - 1}")
        n = self.num_classes
        self._confusion += np.bincount(gt.ravel() * n + pred.ravel(), minlength=n * n).reshape(n, n)

    def compute(self) -> SemanticResult:
        """Mean IoU, pixel accuracy and mean accuracy from the images added so far."""
        intersection = np.diag(self._confusion).astype(np.float64)
        gt_area, pred_area = self._confusion.sum(axis=1), self._confusion.sum(axis=0)
        union = gt_area + pred_area - intersection
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = 100 * intersection / union
            accuracy = 100 * intersection / gt_area
            pixel_accuracy = 100 * intersection.sum() / gt_area.sum()
        return SemanticResult(
            mean_iou=_nanmean(iou),
            pixel_accuracy=float(pixel_accuracy),
            mean_accuracy=_nanmean(accuracy),
            per_class_iou=tuple(float(v) for v in iou),
            per_class_accuracy=tuple(float(v) for v in accuracy),
        )


def mean_iou(pairs: Iterable[tuple[Any, Any]], num_classes: int, ignore_index: int | None = 255) -> SemanticResult:
    """Mean IoU of ``(prediction, ground_truth)`` label-map pairs (see :class:`SemanticEvaluator`)."""
    evaluator = SemanticEvaluator(num_classes, ignore_index)
    for prediction, ground_truth in pairs:
        evaluator.update(prediction, ground_truth)
    return evaluator.compute()


# -- mask AP -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InstanceResult:
    """COCO mask AP in percent: over IoU 0.50:0.95, at 0.50, at 0.75, and per category (NaN: no ground truth)."""

    ap: float
    ap50: float
    ap75: float
    per_class_ap: dict[int, float]


class InstanceEvaluator:
    """Collects instance predictions as COCO results (RLE) per image; :meth:`compute` runs ``COCOeval``.

    ``gt_instances_json``: a COCO instances file (path) or its dict, with RLE or polygon segmentations.
    Predictions of categories absent from it (e.g. stuff) are ignored, as ``COCOeval`` does.
    """

    def __init__(self, gt_instances_json: str | os.PathLike | Mapping[str, Any]):
        self._gt = _instances(gt_instances_json)
        self._sizes = {int(image["id"]): (int(image["height"]), int(image["width"])) for image in self._gt["images"]}
        self._results: list[dict[str, Any]] = []
        self._seen: set[int] = set()

    def update(self, image_id: int, prediction: Mapping[str, Any]) -> None:
        """Add the instance post-process's result for ``image_id``: ``segmentation`` ``[H, W]`` ids (-1: none) or
        ``[N, H, W]`` masks (``return_binary_maps``), ``segments_info`` with ``id``, ``label_id``, ``score``."""
        name = f"prediction for image {image_id}"
        if image_id not in self._sizes:
            raise InputError(f"{name}: no such image in the ground truth")
        if image_id in self._seen:
            raise InputError(f"{name}: given twice")
        segmentation = _array(prediction, name)
        binary = segmentation.ndim == 3
        if segmentation.ndim not in (2, 3) or segmentation.shape[-2:] != self._sizes[image_id]:
            raise InputError(
                f"{name}: segmentation of shape {segmentation.shape}, expected [H, W] or [N, H, W] "
                f"with (H, W) = {self._sizes[image_id]}"
            )
        results = []
        for info in _segments_info(prediction, name):
            try:
                segment, category, score = int(info["id"]), int(info["label_id"]), float(info["score"])
            except (KeyError, TypeError, ValueError):
                raise InputError(f"{name}: each segments_info entry needs 'id', 'label_id' and 'score'") from None
            if binary and not 0 <= segment < len(segmentation):
                raise InputError(f"{name}: segment id {segment} has no mask among {len(segmentation)}")
            mask = segmentation[segment] > 0.5 if binary else segmentation == segment
            if mask.any():
                results.append(
                    {"image_id": image_id, "category_id": category, "segmentation": coco_rle(mask), "score": score}
                )
        self._results += results
        self._seen.add(image_id)

    def compute(self) -> InstanceResult:
        """Run pycocotools' ``COCOeval`` (segm) on the predictions added so far."""
        try:
            from pycocotools.coco import COCO
            from pycocotools.cocoeval import COCOeval
        except ImportError:
            raise InputError("mask AP needs pycocotools: pip install pycocotools") from None
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
            truth = COCO()
            truth.dataset = {key: list(value) for key, value in self._gt.items() if isinstance(value, list)}
            truth.createIndex()
            if not self._results:
                return self._nothing_found()
            results = truth.loadRes([dict(r) for r in self._results])  # loadRes adds keys to its dicts
            evaluation = COCOeval(truth, results, iouType="segm")
            evaluation.evaluate()
            evaluation.accumulate()
            evaluation.summarize()
        precision = evaluation.eval["precision"][:, :, :, 0, -1]  # [IoU thresholds, recall, category], all areas
        per_class = {}
        for k, category in enumerate(evaluation.params.catIds):
            values = precision[:, :, k]
            per_class[int(category)] = float(100 * values[values > -1].mean()) if (values > -1).any() else _NAN
        ap, ap50, ap75 = (float(100 * v) if v >= 0 else _NAN for v in evaluation.stats[:3])
        return InstanceResult(ap, ap50, ap75, per_class)

    def _nothing_found(self) -> InstanceResult:
        """The result without any prediction (pycocotools cannot load an empty result list): 0, or NaN where there
        is no ground truth either."""
        present = {int(a["category_id"]) for a in self._gt["annotations"]}
        per_class = {int(c["id"]): 0.0 if int(c["id"]) in present else _NAN for c in self._gt["categories"]}
        value = 0.0 if present else _NAN
        return InstanceResult(value, value, value, per_class)


def mask_ap(
    predictions: Mapping[int, Mapping[str, Any]] | Iterable[tuple[int, Mapping[str, Any]]],
    gt_instances_json: str | os.PathLike | Mapping[str, Any],
) -> InstanceResult:
    """COCO mask AP of instance predictions, ``{image_id: result}`` or ``(image_id, result)`` pairs, against a COCO
    instances file (see :class:`InstanceEvaluator`)."""
    evaluator = InstanceEvaluator(gt_instances_json)
    for image_id, prediction in predictions.items() if isinstance(predictions, Mapping) else predictions:
        evaluator.update(int(image_id), prediction)
    return evaluator.compute()


# -- input checks ------------------------------------------------------------------------------------------------


def _nanmean(values: np.ndarray) -> float:
    seen = values[~np.isnan(values)]
    return float(seen.mean()) if seen.size else _NAN


def _array(result: Mapping[str, Any], name: str) -> np.ndarray:
    if not isinstance(result, Mapping) or "segmentation" not in result:
        raise InputError(f"{name}: expected a dict with 'segmentation' and 'segments_info'")
    segmentation = result["segmentation"]
    if isinstance(segmentation, list):
        raise InputError(
            f"{name}: segmentation is a list (run-length encoded?); pass the post-process's array "
            "(return_coco_annotation=False)"
        )
    array = np.asarray(segmentation)
    if array.dtype.kind not in "biuf":
        raise InputError(f"{name}: segmentation must be a numeric array, got {array.dtype}")
    return array


def _segments_info(result: Mapping[str, Any], name: str) -> list[Mapping[str, Any]]:
    infos = result.get("segments_info")
    if not isinstance(infos, (list, tuple)) or not all(isinstance(info, Mapping) for info in infos):
        raise InputError(f"{name}: segments_info must be a list of dicts")
    return list(infos)


def _integers(array: np.ndarray, name: str) -> np.ndarray:
    """``array`` as int64; float maps (HF's -1 maps) must hold whole numbers."""
    if array.dtype.kind == "f" and not (np.isfinite(array).all() and (array == np.round(array)).all()):
        raise InputError(f"{name}: segmentation holds values that are not whole numbers")
    return array.astype(np.int64)


def _id_map(result: Mapping[str, Any], name: str) -> np.ndarray:
    array = _array(result, name)
    if array.ndim != 2:
        raise InputError(f"{name}: segmentation must be [H, W], got shape {array.shape}")
    return _integers(array, name)


def _label_map(value: Any, name: str) -> np.ndarray:
    array = np.asarray(value)
    if array.ndim != 2 or array.dtype.kind not in "biuf":
        raise InputError(f"{name}: expected an [H, W] array of class ids, got {array.dtype} {array.shape}")
    return _integers(array, name)


def _instances(source: str | os.PathLike | Mapping[str, Any]) -> Mapping[str, Any]:
    """A COCO instances dict, read from ``source`` when it is a path; the keys ``COCOeval`` needs are checked."""
    where = "ground-truth instances"
    if not isinstance(source, Mapping):
        where = str(source)
        try:
            source = json.loads(Path(source).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as err:
            raise InputError(f"{where}: cannot read it ({err.strerror or err})") from None
        except json.JSONDecodeError as err:
            raise InputError(f"{where}: not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(source, Mapping):
        raise InputError(f"{where}: expected a JSON object")
    for key, fields in (
        ("images", ("id", "height", "width")),
        ("annotations", ("image_id", "category_id")),
        ("categories", ("id",)),
    ):
        entries = source.get(key)
        if not isinstance(entries, list) or not all(isinstance(e, Mapping) and set(fields) <= set(e) for e in entries):
            raise InputError(f"{where}: '{key}' must be a list of objects with {', '.join(fields)}")
    return source
