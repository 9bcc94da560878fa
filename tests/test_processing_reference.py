"""The fast post-processes against the literal reference port (the oracle), and the processor's options that pick
them: no torch, no transformers needed.

Random and adversarial logits: exact ties (flat class distributions, the same mask for several queries), class
probabilities exactly at a threshold, mask logits at and near 0, very peaked and very flat distributions, one
query and many, odd target sizes, padding cropped by ``pixel_mask``. The fast path must give the reference's
results; where the two compute the same value in a different order (float32 rounding), a pixel may differ only
where the reference's own values tie to within a rounding tolerance there.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from m2f_deploy.errors import ConfigError
from m2f_deploy.processing import ImageProcessor
from m2f_deploy.processing.postprocess import reference
from m2f_deploy.processing.postprocess.common import sigmoid, softmax, valid_regions
from m2f_deploy.processing.postprocess.resample import bilinear, nearest, resize_maps
from m2f_deploy.processing.rle import segmentation_to_rle
from m2f_deploy.testing.logits import synthetic_outputs

FAST, REFERENCE = ImageProcessor(), ImageProcessor(postprocess="reference")
TOL = 1e-5  # float32 rounding of sums of up to a few hundred terms, relative to the scores' scale


# -- adversarial outputs -------------------------------------------------------------------------------------------


@st.composite
def _cases(draw):
    batch = draw(st.integers(1, 2))
    queries = draw(st.sampled_from([1, 2, 3, 5, 8, 40]))
    classes = draw(st.sampled_from([1, 2, 4, 19]))
    h, w = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    class_kind = draw(st.sampled_from(["normal", "peaked", "flat", "at-threshold", "scene"]))
    mask_kind = draw(st.sampled_from(["normal", "near-zero", "saturated", "shared", "scene"]))
    if "scene" in (class_kind, mask_kind) and h >= 2 and w >= 2:
        scene = synthetic_outputs(batch, queries, classes, (h, w), "scene", objects=max(1, queries // 2), seed=1)
    else:
        scene = synthetic_outputs(batch, queries, classes, (h, w), "noise", seed=2)
    logits = {
        "normal": lambda: rng.normal(0, 2, (batch, queries, classes + 1)),
        "peaked": lambda: rng.normal(0, 1, (batch, queries, classes + 1)) + 25 * np.eye(classes + 1)[
            rng.integers(0, classes + 1, (batch, queries))
        ],
        "flat": lambda: np.zeros((batch, queries, classes + 1)),  # every class ties, every query ties
        # one class and "no object" at probability 1/2 each (= threshold 0.5), the rest far below
        "at-threshold": lambda: np.broadcast_to(
            np.where(np.arange(classes + 1) % classes == 0, 0.0, -40.0), (batch, queries, classes + 1)
        ),
        "scene": lambda: scene["class_queries_logits"],
    }[class_kind]()
    masks = {
        "normal": lambda: rng.normal(0, 3, (batch, queries, h, w)),
        "near-zero": lambda: rng.choice([0.0, 1e-7, -1e-7, 1e-3, -1e-3], (batch, queries, h, w)),
        "saturated": lambda: rng.choice([-60.0, 60.0], (batch, queries, h, w)),
        "shared": lambda: np.broadcast_to(rng.normal(0, 2, (batch, 1, h, w)), (batch, queries, h, w)),  # ties
        "scene": lambda: scene["masks_queries_logits"],
    }[mask_kind]()
    outputs = {
        "class_queries_logits": np.ascontiguousarray(logits, np.float32),
        "masks_queries_logits": np.ascontiguousarray(masks, np.float32),
    }
    edge = st.sampled_from([1, 3, 7, 97, 383, 385])
    target_sizes = draw(st.one_of(st.none(), st.lists(st.tuples(edge, edge), min_size=batch, max_size=batch)))
    pixel_mask = None
    if draw(st.booleans()):  # the logits of an input padded to 4x their size, the image in its top-left corner
        ph, pw = 4 * h, 4 * w
        pixel_mask = np.zeros((batch, ph, pw), np.int64)
        for i in range(batch):
            pixel_mask[i, : draw(st.integers(1, ph)), : draw(st.integers(1, pw))] = 1
    return outputs, target_sizes, pixel_mask


PROPERTY_SETTINGS = settings(
    max_examples=100, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
THRESHOLDS = st.sampled_from([0.0, 0.3, 0.5, 0.99])


def _reference_working_probabilities(outputs, pixel_mask, b: int, queries=slice(None)) -> np.ndarray:
    masks = outputs["masks_queries_logits"]
    region = valid_regions(pixel_mask, len(masks))[b]
    return sigmoid(reference.working_logits(masks[b][queries], region))


def _to_target(maps: np.ndarray, size) -> np.ndarray:
    if size is None:
        return maps
    return resize_maps(maps, bilinear(maps.shape[1], size[0]), bilinear(maps.shape[2], size[1]))


# -- fast == reference ---------------------------------------------------------------------------------------------


@PROPERTY_SETTINGS
@given(case=_cases())
def test_property_semantic_fast_equals_reference(case):
    _check_semantic(*case)


def _check_semantic(outputs, target_sizes, pixel_mask):
    fast = FAST.post_process_semantic_segmentation(outputs, target_sizes, pixel_mask=pixel_mask)
    ref = REFERENCE.post_process_semantic_segmentation(outputs, target_sizes, True, pixel_mask)
    dense = FAST.post_process_semantic_segmentation(outputs, target_sizes, True, pixel_mask)
    for labels, oracle, scores in zip(fast, ref, dense):
        expected, ref_scores = oracle["segmentation"], oracle["segmentation_scores"]
        assert labels.shape == expected.shape and labels.dtype == expected.dtype == np.int64
        tol = TOL * max(1.0, float(ref_scores.max()))
        differ = labels != expected  # only where the reference's best two classes tie to rounding
        chosen = np.take_along_axis(ref_scores, labels[None], axis=0)[0]
        assert (chosen[differ] >= ref_scores.max(axis=0)[differ] - tol).all()
        np.testing.assert_allclose(scores["segmentation_scores"], ref_scores, rtol=0, atol=tol)


@PROPERTY_SETTINGS
@given(case=_cases(), threshold=THRESHOLDS)
def test_property_instance_fast_equals_reference(case, threshold):
    _check_instance(*case, threshold)


def _check_instance(outputs, target_sizes, pixel_mask, threshold):
    options = {"threshold": threshold, "target_sizes": target_sizes, "pixel_mask": pixel_mask}
    plain = FAST.post_process_instance_segmentation(outputs, **options)
    for extra in ({}, {"return_binary_maps": True}, {"return_coco_annotation": True}):
        fast = FAST.post_process_instance_segmentation(outputs, **options, **extra)
        ref = REFERENCE.post_process_instance_segmentation(outputs, **options, **extra)
        for b, (mine, oracle) in enumerate(zip(fast, ref)):
            assert [(s["id"], s["label_id"], s["was_fused"]) for s in mine["segments_info"]] == [
                (s["id"], s["label_id"], s["was_fused"]) for s in oracle["segments_info"]
            ]
            for a, o in zip(mine["segments_info"], oracle["segments_info"]):
                assert abs(a["score"] - o["score"]) <= TOL
            if extra.get("return_coco_annotation"):
                if pixel_mask is None:
                    assert mine["segmentation"] == oracle["segmentation"]
                else:  # masks may differ at logits ~0 (below): the RLE is that of the fast path's own map
                    assert mine["segmentation"] == segmentation_to_rle(plain[b]["segmentation"])
                    assert len(mine["segmentation"]) == len(oracle["segmentation"])
                continue
            got, want = mine["segmentation"], oracle["segmentation"]
            assert got.dtype == want.dtype == np.float32 and got.shape == want.shape
            if pixel_mask is None:  # the same resize of the same logits: identical masks
                np.testing.assert_array_equal(got, want)
            else:  # two resizes (reference) or one composed map (fast): mask logits at ~0 may go either way
                size = target_sizes[b] if target_sizes else (384, 384)
                logits = reference.working_logits(
                    outputs["masks_queries_logits"][b], valid_regions(pixel_mask, len(fast))[b]
                )
                near_zero = (np.abs(logits) < 1e-4).any(axis=0)[nearest(384, size[0])][:, nearest(384, size[1])]
                assert (got == want)[..., ~near_zero].all()


@PROPERTY_SETTINGS
@given(
    case=_cases(),
    threshold=THRESHOLDS,
    mask_threshold=st.sampled_from([0.0, 0.5, 0.9]),
    overlap=st.sampled_from([0.0, 0.5, 0.8, 1.0]),
    fuse=st.booleans(),
)
def test_property_panoptic_fast_equals_reference(case, threshold, mask_threshold, overlap, fuse):
    _check_panoptic(*case, threshold, mask_threshold, overlap, fuse)


def _check_panoptic(outputs, target_sizes, pixel_mask, threshold, mask_threshold, overlap, fuse):
    options = {
        "threshold": threshold,
        "mask_threshold": mask_threshold,
        "overlap_mask_area_threshold": overlap,
        "label_ids_to_fuse": set(range(0, outputs["class_queries_logits"].shape[2], 2)) if fuse else None,
        "target_sizes": target_sizes,
        "pixel_mask": pixel_mask,
    }
    fast = FAST.post_process_panoptic_segmentation(outputs, **options)
    ref = REFERENCE.post_process_panoptic_segmentation(outputs, **options)
    for b, (mine, oracle) in enumerate(zip(fast, ref)):
        assert mine["segments_info"] == oracle["segments_info"]
        got, want = mine["segmentation"], oracle["segmentation"]
        assert got.dtype == want.dtype and got.shape == want.shape
        if not oracle["segments_info"] or (got == want).all():
            continue
        # owners may differ only where the reference's two best weighted probabilities tie to rounding
        probs = softmax(outputs["class_queries_logits"][b])
        keep = (probs.argmax(axis=1) != probs.shape[1] - 1) & (probs.max(axis=1) > threshold)
        size = target_sizes[b] if target_sizes else None
        weighted = _to_target(_reference_working_probabilities(outputs, pixel_mask, b, keep), size)
        weighted *= probs.max(axis=1)[keep][:, None, None]
        top = np.sort(weighted, axis=0)[-2:] if len(weighted) > 1 else np.concatenate([weighted, weighted])
        assert (top[1] - top[0] <= TOL)[got != want].all()


def _fixed(classes: np.ndarray, masks: np.ndarray) -> dict[str, np.ndarray]:
    return {
        "class_queries_logits": classes.astype(np.float32)[None],
        "masks_queries_logits": masks.astype(np.float32)[None],
    }


_RNG = np.random.default_rng(12)
# Every (query, class) pair ties: which pairs make the top-k, and the segments' order, rest on the tie rules alone.
FLAT_CLASSES = _fixed(np.zeros((6, 3)), _RNG.normal(0, 3, (6, 9, 7)))
# Confident queries with saturated masks (+-60) on stripes that tile the image: each owns exactly the pixels it
# reaches (ratio 1.0); a hesitant query with flat classes, and one whose class ties "no object" at probability 1/2.
_STRIPES = np.where(np.arange(6)[None, :, None] // 2 == np.array([0, 1, 9, 2, 9])[:, None, None], 60.0, -60.0)
SATURATED = _fixed(
    np.array([[30.0, 0, 0], [0, 30, 0], [0, 0, 0], [30, 0, 0], [0, -40, 0]]),
    np.broadcast_to(_STRIPES, (5, 6, 6)),
)


@pytest.mark.parametrize("target_sizes", [None, [(7, 97)]])
def test_adversarial_ties_fast_equals_reference(target_sizes):
    for outputs in (FLAT_CLASSES, SATURATED):
        _check_semantic(outputs, target_sizes, None)
        for threshold in (0.0, 0.3, 0.5):
            _check_instance(outputs, target_sizes, None, threshold)
            for overlap in (0.5, 1.0):
                _check_panoptic(outputs, target_sizes, None, threshold, 0.5, overlap, False)
    # the cases are what they claim: the ties decide something
    flat = REFERENCE.post_process_instance_segmentation(FLAT_CLASSES, threshold=0.0)[0]["segments_info"]
    assert len(flat) == 6 and {s["label_id"] for s in flat} == {0, 1}  # 6 of the 12 tied pairs
    saturated = REFERENCE.post_process_panoptic_segmentation(SATURATED, threshold=0.0, overlap_mask_area_threshold=1.0)
    loose = REFERENCE.post_process_panoptic_segmentation(SATURATED, threshold=0.0, overlap_mask_area_threshold=0.99)
    assert len(saturated[0]["segments_info"]) < len(loose[0]["segments_info"])  # ratio 1.0 is not > 1.0


@settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(case=_cases())
def test_property_threads_change_nothing(case):
    from m2f_deploy.processing.postprocess import resample, threads

    outputs, target_sizes, pixel_mask = case
    calls = []
    original = threads.Workers.run
    with pytest.MonkeyPatch.context() as patch, ImageProcessor(threads=2) as threaded:
        # every step splits (these cases are far below PARALLEL_MIN): the threaded code runs on every case
        patch.setattr(threads, "PARALLEL_MIN", 1)
        patch.setattr(resample, "PARALLEL_MIN", 1)
        patch.setattr(threads.Workers, "run", lambda self, tasks: calls.append(len(tasks)) or original(self, tasks))
        for task in ("semantic", "instance", "panoptic"):
            options = {"target_sizes": target_sizes, "pixel_mask": pixel_mask}
            one = getattr(FAST, f"post_process_{task}_segmentation")(outputs, **options)
            two = getattr(threaded, f"post_process_{task}_segmentation")(outputs, **options)
            assert len(one) == len(two)
            for a, b in zip(one, two):
                if task == "semantic":
                    np.testing.assert_array_equal(a, b)
                else:
                    np.testing.assert_array_equal(a["segmentation"], b["segmentation"])
                    assert a["segments_info"] == b["segments_info"]
    if np.prod(outputs["masks_queries_logits"].shape[1:]) > 1:  # one query of one pixel: nothing to split
        assert max(calls) > 1  # the pool ran several tasks at once


def test_large_steps_run_on_the_processor_threads_and_give_the_same_labels(monkeypatch):
    # noise: semantic goes to dense scores on the whole working grid, the step that splits across threads
    outputs = synthetic_outputs(num_queries=100, num_classes=133, kind="noise", seed=5)
    from m2f_deploy.processing.postprocess import threads

    calls = []
    original = threads.Workers.run
    monkeypatch.setattr(threads.Workers, "run", lambda self, tasks: calls.append(len(tasks)) or original(self, tasks))
    with ImageProcessor(threads=2) as threaded:
        two = threaded.post_process_semantic_segmentation(outputs, target_sizes=[(97, 130)])[0]
        assert threaded.workers._pool is not None  # started...
    assert threaded.workers._pool is None  # ...and closed with the processor
    assert max(calls) >= 2
    calls.clear()
    one = FAST.post_process_semantic_segmentation(outputs, target_sizes=[(97, 130)])[0]
    assert FAST.workers._pool is None and max(calls) == 1  # threads=1: never more than one task at a time
    np.testing.assert_array_equal(one, two)


# -- the options ---------------------------------------------------------------------------------------------------


def test_reference_option_runs_the_reference(monkeypatch):
    outputs = synthetic_outputs(num_queries=6, num_classes=4, mask_size=(8, 8), seed=3)
    called = []
    for name in ("semantic", "instance", "panoptic"):
        original = getattr(reference, f"{name}_segmentation")
        monkeypatch.setattr(
            reference, f"{name}_segmentation", lambda *a, _o=original, _n=name, **k: called.append(_n) or _o(*a, **k)
        )
    for task in ("semantic", "instance", "panoptic"):
        getattr(FAST, f"post_process_{task}_segmentation")(outputs)
    assert called == []
    for task in ("semantic", "instance", "panoptic"):
        getattr(REFERENCE, f"post_process_{task}_segmentation")(outputs)
    assert called == ["semantic", "instance", "panoptic"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"postprocess": "exact"}, r"postprocess='exact' is not a post-processing path; choose one of fast, reference"),
        ({"postprocess": "refrence"}, r"did you mean 'reference'"),
        ({"threads": 0}, "threads must be a positive whole number or None, got 0"),
        ({"threads": 2.0}, "threads must be a positive whole number or None"),
        ({"threads": True}, "threads must be a positive whole number or None"),
    ],
)
def test_bad_runtime_options_raise_config_error(options, message):
    with pytest.raises(ConfigError, match=message):
        ImageProcessor(**options)


def test_runtime_options_are_not_saved_and_not_read_from_files(tmp_path):
    processor = ImageProcessor(postprocess="reference", threads=3, size={"shortest_edge": 64, "longest_edge": 96})
    assert (processor.postprocess, processor.workers.threads) == ("reference", 3)
    assert "postprocess" not in processor.to_dict() and "threads" not in processor.to_dict()
    saved = json.loads(processor.save_pretrained(tmp_path).read_text())
    assert "postprocess" not in saved and "threads" not in saved and saved["size"]["shortest_edge"] == 64
    loaded = ImageProcessor.from_pretrained(tmp_path)
    assert (loaded.postprocess, loaded.workers.threads) == ("fast", 1)  # the defaults
    assert ImageProcessor.from_pretrained(tmp_path, postprocess="reference", threads=2).workers.threads == 2
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**saved, "postprocess": "x", "threads": -1}))
    loaded = ImageProcessor.from_pretrained(tmp_path)  # a file cannot set them: ignored, not an error
    assert (loaded.postprocess, loaded.workers.threads) == ("fast", 1)
    assert "postprocess" not in loaded.to_dict()
