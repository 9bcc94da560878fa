"""The reference post-processes: transformers' three Mask2Former post-processes ported line by line to numpy.

No shortcuts: every mask is resized whole to the working grid and to the target size, as HF does it, with the
torch-equal resampling of :mod:`.resample`. Slow (seconds per image, a few GB for large targets), and the contract
the fast path is tested against (``tests/test_processing_reference.py``); select it with
``ImageProcessor(postprocess="reference")`` or ``m2f-predict --exact`` when a pixel of the fast path looks wrong.

It differs from HF where the fast path does, on purpose (see :mod:`m2f_deploy.processing.postprocess`):
``pixel_mask`` crops the padding (along each padded axis, logits upsampled to the padded input, cropped to the
image, resized to the working grid: two resizes here, one composed map in the fast path), instance segments are
ordered by score descending (ties by query, then class) and the highest score wins overlapping pixels, the top-k
takes class probabilities largest first (ties by query, then class), and arrays are numpy.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import numpy as np

from m2f_deploy.errors import InputError
from m2f_deploy.processing.postprocess.common import (
    WORKING_SIZE,
    Region,
    TargetSizes,
    per_image,
    sigmoid,
    softmax,
)
from m2f_deploy.processing.postprocess.resample import bilinear, nearest, resize_maps
from m2f_deploy.processing.rle import segmentation_to_rle


def working_logits(masks: np.ndarray, region: Region | None) -> np.ndarray:
    """Mask logits ``[Q, h, w]`` resized (bilinear) to the working grid ``[Q, 384, 384]``; with a valid region,
    each axis that has padding is first upsampled to the padded input and cropped to the image (an axis without
    padding is resized directly, as without ``pixel_mask``)."""
    if region is not None:
        (vh, vw), (ph, pw) = region
        h, w = masks.shape[1:]
        if vh < ph:
            masks = resize_maps(masks, bilinear(h, ph), bilinear(w, w))[:, :vh]  # bilinear(n, n): the identity
        if vw < pw:
            masks = resize_maps(masks, bilinear(masks.shape[1], masks.shape[1]), bilinear(w, pw))[:, :, :vw]
    h, w = masks.shape[1:]
    return resize_maps(masks, bilinear(h, WORKING_SIZE[0]), bilinear(w, WORKING_SIZE[1]))


def _bilinear_to(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return resize_maps(maps, bilinear(maps.shape[1], size[0]), bilinear(maps.shape[2], size[1]))


def semantic_segmentation(
    outputs: Any,
    target_sizes: TargetSizes = None,
    return_segmentation_scores: bool = False,
    pixel_mask: np.ndarray | None = None,
) -> list[np.ndarray] | list[dict[str, np.ndarray]]:
    """HF's ``post_process_semantic_segmentation``, literally (same results as the fast path's)."""
    results: list[Any] = []
    for classes, masks, size, region in per_image(outputs, target_sizes, pixel_mask):
        masks_classes = softmax(classes)[:, :-1]  # [Q, C]
        masks_probs = sigmoid(working_logits(masks, region))  # [Q, 384, 384]
        segmentation = np.tensordot(masks_classes, masks_probs, axes=(0, 0)).astype(np.float32)  # [C, 384, 384]
        if size is not None:
            segmentation = _bilinear_to(segmentation, size)
        labels = segmentation.argmax(axis=0)
        if return_segmentation_scores:
            results.append({"segmentation": labels, "segmentation_scores": segmentation})
        else:
            results.append(labels)
    return results


def instance_segmentation(
    outputs: Any,
    threshold: float = 0.5,
    mask_threshold: float = 0.5,
    overlap_mask_area_threshold: float = 0.8,
    target_sizes: TargetSizes = None,
    return_coco_annotation: bool = False,
    return_binary_maps: bool = False,
    pixel_mask: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """HF's ``post_process_instance_segmentation``, literally, in our documented segment order."""
    if return_coco_annotation and return_binary_maps:
        raise InputError("return_coco_annotation and return_binary_maps cannot both be True")
    results = []
    for classes, masks, size, region in per_image(outputs, target_sizes, pixel_mask):
        num_queries, num_classes = classes.shape[0], classes.shape[1] - 1
        scores = softmax(classes)[:, :-1].reshape(-1)
        top = np.argsort(-scores, kind="stable")[:num_queries]  # top-k: largest first, ties by (query, class)
        scores_per_image, labels_per_image = scores[top], top % num_classes
        mask_pred = working_logits(masks, region)[top // num_classes]  # [Q, 384, 384]
        pred_masks = (mask_pred > 0).astype(np.float32)
        mask_scores = (sigmoid(mask_pred.copy()) * pred_masks).reshape(num_queries, -1).sum(axis=1) / (
            pred_masks.reshape(num_queries, -1).sum(axis=1) + np.float32(1e-6)
        )
        pred_scores = scores_per_image * mask_scores
        if size is not None:
            pred_masks = pred_masks[:, nearest(WORKING_SIZE[0], size[0])][:, :, nearest(WORKING_SIZE[1], size[1])]
        kept = [j for j in range(num_queries) if not np.all(pred_masks[j] == 0) and float(pred_scores[j]) >= threshold]
        kept.sort(key=lambda j: (-pred_scores[j], top[j]))  # our order: score descending, ties by (query, class)
        segmentation = np.zeros(size or WORKING_SIZE, np.float32) - 1
        for rank in reversed(range(len(kept))):  # the highest score painted last: it wins overlapping pixels
            segmentation[pred_masks[kept[rank]] == 1] = rank
        segments = [
            {"id": rank, "label_id": int(labels_per_image[j]), "was_fused": False, "score": round(float(score), 6)}
            for rank, (j, score) in enumerate(zip(kept, pred_scores[kept]))
        ]
        if return_coco_annotation:
            segmentation = segmentation_to_rle(segmentation)
        if return_binary_maps and kept:
            segmentation = np.stack([pred_masks[j] for j in kept])
        results.append({"segmentation": segmentation, "segments_info": segments})
    return results


def panoptic_segmentation(
    outputs: Any,
    threshold: float = 0.5,
    mask_threshold: float = 0.5,
    overlap_mask_area_threshold: float = 0.8,
    label_ids_to_fuse: Collection[int] | None = None,
    target_sizes: TargetSizes = None,
    pixel_mask: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """HF's ``post_process_panoptic_segmentation`` (with ``compute_segments``), literally."""
    label_ids_to_fuse = set() if label_ids_to_fuse is None else set(label_ids_to_fuse)
    results = []
    for classes, masks, size, region in per_image(outputs, target_sizes, pixel_mask):
        num_labels = classes.shape[1] - 1
        probs = softmax(classes)
        pred_scores, pred_labels = probs.max(axis=-1), probs.argmax(axis=-1)
        to_keep = (pred_labels != num_labels) & (pred_scores > threshold)
        if not to_keep.any():
            results.append({"segmentation": np.zeros(size or WORKING_SIZE, np.float32) - 1, "segments_info": []})
            continue
        mask_probs = sigmoid(working_logits(masks[to_keep], region))
        pred_scores, pred_labels = pred_scores[to_keep], pred_labels[to_keep]
        if size is not None:
            mask_probs = _bilinear_to(mask_probs, size)
        segmentation = np.zeros(mask_probs.shape[1:], np.int32)
        segments: list[dict[str, Any]] = []
        mask_probs *= pred_scores[:, None, None]
        mask_labels = mask_probs.argmax(axis=0)
        current_segment_id, stuff_memory_list = 0, {}
        for k in range(len(pred_labels)):
            pred_class = int(pred_labels[k])
            should_fuse = pred_class in label_ids_to_fuse
            mask_k = mask_labels == k
            mask_k_area = int(mask_k.sum())
            original_area = int((mask_probs[k] >= mask_threshold).sum())
            mask_exists = mask_k_area > 0 and original_area > 0
            if mask_exists:  # the ratio in float32, as torch divides
                area_ratio = np.float32(mask_k_area) / np.float32(original_area)
                mask_exists = float(area_ratio) > overlap_mask_area_threshold
            if mask_exists:
                if pred_class in stuff_memory_list:
                    current_segment_id = stuff_memory_list[pred_class]
                else:
                    current_segment_id += 1
                segmentation[mask_k] = current_segment_id
                score = round(float(pred_scores[k]), 6)
                segment = {"id": current_segment_id, "label_id": pred_class, "was_fused": should_fuse, "score": score}
                segments.append(segment)
                if should_fuse:
                    stuff_memory_list[pred_class] = current_segment_id
        results.append({"segmentation": segmentation, "segments_info": segments})
    return results
