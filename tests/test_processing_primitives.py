"""The building blocks of m2f_deploy.processing against torch: resampling, cell certification, top-k, threads, RLE."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from m2f_deploy.processing.postprocess.cells import CellGrid, leaders
from m2f_deploy.processing.postprocess.instance import segment_order, top_pairs
from m2f_deploy.processing.postprocess.resample import (
    bilinear,
    bilinear_cropped,
    nearest,
    product,
    resize_in_strips,
    resize_maps,
    sample_maps,
)
from m2f_deploy.processing.postprocess.threads import PARALLEL_MIN, Workers
from m2f_deploy.processing.rle import binary_mask_to_rle, segmentation_to_rle

SIZES = [
    ((96, 128), (384, 384)),  # mask logits -> HF's working grid
    ((384, 384), (480, 640)),  # working grid -> a typical target
    ((384, 384), (100, 37)),  # downsampling
    ((384, 384), (1, 700)),  # a 1-pixel-high target
    ((7, 5), (384, 384)),
    ((384, 384), (384, 384)),  # identity
]


def _torch_resize(maps: np.ndarray, size: tuple[int, int], mode: str = "bilinear") -> np.ndarray:
    kwargs = {"align_corners": False} if mode == "bilinear" else {}
    return F.interpolate(torch.from_numpy(maps)[None], size=size, mode=mode, **kwargs)[0].numpy()


@pytest.mark.parametrize(("src", "dst"), SIZES)
def test_bilinear_resize_equals_torch(src, dst):
    maps = np.random.default_rng(0).normal(0, 4, (3, *src)).astype(np.float32)
    ours = resize_maps(maps, bilinear(src[0], dst[0]), bilinear(src[1], dst[1]))
    np.testing.assert_allclose(ours, _torch_resize(maps, dst), rtol=0, atol=2e-6)


@pytest.mark.parametrize(("src", "dst"), SIZES + [((384, 384), (1, 1)), ((5, 9), (17, 3))])
def test_nearest_indices_equal_torch(src, dst):
    maps = np.arange(np.prod(src), dtype=np.float32).reshape(1, *src)
    ours = maps[:, nearest(src[0], dst[0])][:, :, nearest(src[1], dst[1])]
    np.testing.assert_array_equal(ours, _torch_resize(maps, dst, mode="nearest"))


def test_sampled_pixels_equal_the_resized_maps():
    rng = np.random.default_rng(1)
    maps = rng.normal(0, 3, (4, 96, 128)).astype(np.float32)
    for rows, cols in [
        (bilinear(96, 384), bilinear(128, 384)),
        (bilinear_cropped(96, 384, 301, 384), bilinear_cropped(128, 512, 450, 384)),
    ]:
        ys, xs = rng.integers(0, 384, 500), rng.integers(0, 384, 500)
        np.testing.assert_allclose(
            sample_maps(maps, rows, cols, ys, xs), resize_maps(maps, rows, cols)[:, ys, xs], rtol=0, atol=1e-6
        )


def test_cropped_resampling_is_upsample_then_crop_then_resize():
    maps = np.random.default_rng(2).normal(0, 3, (2, 24, 32)).astype(np.float32)
    padded = _torch_resize(maps, (96, 128))[:, :70, :101]  # the valid region of a 96x128 padded input
    expected = _torch_resize(np.ascontiguousarray(padded), (50, 60))
    ours = resize_maps(maps, bilinear_cropped(24, 96, 70, 50), bilinear_cropped(32, 128, 101, 60))
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-5)
    assert bilinear_cropped(24, 96, 96, 50) is bilinear(24, 50)  # no padding: plain resampling


def test_strips_make_up_the_resized_maps():
    rng = np.random.default_rng(4)
    maps = rng.normal(0, 3, (40, 24, 32)).astype(np.float32)
    for rows, cols in [(bilinear(24, 384), bilinear(32, 384)), (bilinear_cropped(24, 96, 70, 50), bilinear(32, 384))]:
        for threads in (1, 2):
            out = np.full((40, rows.n_out, cols.n_out), np.nan, np.float32)
            seen = []

            def each(part, strip, out=out, seen=seen):
                seen.append(part.start)
                out[:, part] = strip

            with_threads = Workers(threads)
            resize_in_strips(maps, rows, cols, each, with_threads)
            with_threads.close()
            np.testing.assert_array_equal(out, resize_maps(maps, rows, cols))
            assert len(seen) > 1 and len(set(seen)) == len(seen)  # several strips, each once


@pytest.mark.parametrize(("s", "m", "n"), [(133, 100, 9216), (5, 3, 1000), (1, 1, 1), (7, 60, 0)])
def test_product_equals_matmul_also_into_columns(s, m, n):
    rng = np.random.default_rng(5)
    left, right = rng.random((s, m), np.float32), rng.random((m, n), np.float32)
    expected = left.astype(np.float64) @ right
    np.testing.assert_allclose(product(left, right), expected, rtol=1e-5)
    np.testing.assert_allclose(product(left.T.copy().T, right), expected, rtol=1e-5)  # a transposed view
    wide = np.zeros((s, n + 9), np.float32)
    assert product(left, right, out=wide[:, 4 : 4 + n]).base is wide
    np.testing.assert_allclose(wide[:, 4 : 4 + n], expected, rtol=1e-5)
    assert not wide[:, :4].any() and not wide[:, 4 + n :].any()
    with Workers(2) as workers:  # below PARALLEL_MIN output values: the same blocks, the same values
        np.testing.assert_array_equal(product(left, right, workers=workers), product(left, right))


def test_large_products_go_to_blas_whole_only_when_threads_are_allowed(monkeypatch):
    from m2f_deploy.processing.postprocess import resample

    rng = np.random.default_rng(6)
    left, right = rng.random((64, 10), np.float32), rng.random((10, PARALLEL_MIN // 64), np.float32)
    blocked = []
    original = resample._column_blocks
    monkeypatch.setattr(resample, "_column_blocks", lambda *a: blocked.append(1) or original(*a))
    one = product(left, right)
    assert blocked  # one thread: blocks that BLAS keeps on the calling thread
    blocked.clear()
    with Workers(2) as workers:
        whole = product(left, right, workers=workers)
    assert not blocked  # threads allowed and a large product: one matmul on BLAS' threads
    np.testing.assert_allclose(whole, one, rtol=1e-5)
    product(left, right[:, :1000], workers=Workers(2))
    assert blocked  # a small one stays in blocks


def test_cropped_resampling_multiplies_in_blocks_on_the_calling_thread(monkeypatch):
    from m2f_deploy.processing.postprocess import resample

    blocked = []
    original = resample._column_blocks
    monkeypatch.setattr(resample, "_column_blocks", lambda *a: blocked.append(a[0].shape) or original(*a))
    # [384, 480] @ [480, 160]: ~30M multiply-adds, which a plain ``@`` would hand to BLAS' threads
    taps = bilinear_cropped.__wrapped__(160, 640, 480, 384)  # uncached: the product runs here
    assert blocked
    np.testing.assert_allclose(taps.matrix, bilinear(480, 384).matrix @ bilinear(160, 640).matrix[:480], atol=1e-6)


def test_workers_split_only_large_steps_and_only_when_given_threads():
    assert Workers(2).shares(10, PARALLEL_MIN - 1) == [slice(0, 10)]
    assert Workers(1).shares(10, PARALLEL_MIN) == [slice(0, 10)]
    assert Workers(2).shares(10, PARALLEL_MIN) == [slice(0, 5), slice(5, 10)]
    assert Workers(3).shares(2, PARALLEL_MIN) == [slice(0, 1), slice(1, 2)]  # no empty share
    assert Workers(None).threads == 1  # None: the calling thread only
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="threads must be a positive whole number or None"):
            Workers(bad)


def test_workers_run_tasks_on_the_pool_and_close_it():
    import threading

    seen = set()
    workers = Workers(2)
    workers.run([lambda: seen.add(threading.current_thread().name)] * 8)
    assert seen and all(name.startswith("m2f-postprocess") for name in seen)
    pool = workers._pool
    workers.close()
    assert workers._pool is None and pool._shutdown
    seen.clear()
    Workers(1).run([lambda: seen.add(threading.current_thread().name)] * 3)
    assert seen == {threading.current_thread().name}  # one thread: the caller's
    with Workers(2) as failing, pytest.raises(ZeroDivisionError):  # a task's error reaches the caller
        failing.run([lambda: None, lambda: 1 / 0])


def test_a_failing_task_is_raised_only_after_every_task_ended():
    import time

    ended = []

    def slow():
        time.sleep(0.3)
        ended.append(1)  # e.g. still writing into a shared array

    with Workers(2) as workers:
        with pytest.raises(ZeroDivisionError):
            workers.run([lambda: 1 / 0, slow])
        assert ended  # the caller sees the error once nothing writes any more (before close() waits for it)


def test_threads_first_using_one_processor_start_one_pool(monkeypatch):
    import threading
    import time

    from m2f_deploy.processing.postprocess import threads

    started = []

    class SlowToStart(threads.ThreadPoolExecutor):
        def __init__(self, *args, **kwargs):
            time.sleep(0.2)  # widens the window in which a second caller could start its own pool
            super().__init__(*args, **kwargs)
            started.append(self)

    monkeypatch.setattr(threads, "ThreadPoolExecutor", SlowToStart)
    workers = Workers(2)
    callers = [threading.Thread(target=workers.run, args=([lambda: None] * 2,)) for _ in range(2)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()
    for pool in started:
        pool.shutdown()
    assert len(started) == 1  # none leaked


def _run_in_child(workers: Workers) -> None:
    out = []
    workers.run([lambda: out.append(1)] * 4)
    assert out == [1] * 4


def test_a_forked_child_starts_its_own_pool():
    import multiprocessing

    workers = Workers(2)
    workers.run([lambda: None] * 2)  # the parent's pool is running: its threads do not survive a fork
    child = multiprocessing.get_context("fork").Process(target=_run_in_child, args=(workers,))
    child.start()
    child.join(60)
    if child.is_alive():  # a pool inherited through a fork may never run its tasks
        child.kill()
    assert child.exitcode == 0
    import threading

    inherited = workers._pool
    old_threads = set(inherited._threads)
    workers._pid = -1  # what a forked child sees: a pool started by another process
    ran_on = set()
    workers.run([lambda: ran_on.add(threading.current_thread())] * 4)
    try:
        assert ran_on and not ran_on & old_threads  # the tasks ran on a new pool, not on the inherited one
        assert all(t.name.startswith("m2f-postprocess") for t in ran_on)
    finally:
        workers.close()
        inherited.shutdown()  # in a real child it has no threads; here it does


def test_leaders_on_threads_equal_leaders_on_one():
    rng = np.random.default_rng(11)
    lower = rng.normal(0, 1, (8, PARALLEL_MIN // 8 + 3)).astype(np.float32)
    upper = lower + np.float32(0.1)
    with Workers(2) as workers:
        for a, b in zip(leaders(lower, upper, -1.0, workers), leaders(lower, upper, -1.0)):
            np.testing.assert_array_equal(a, b)
    best, lead, rival = leaders(lower[:, :5], lower[:, :5], -np.inf)
    np.testing.assert_array_equal(best, lower[:, :5].argmax(axis=0))
    np.testing.assert_array_equal(rival, np.sort(lower[:, :5], axis=0)[-2])


def _dense_argmax(scores: np.ndarray, grid: CellGrid) -> np.ndarray:
    return _torch_resize(scores, grid.dst).argmax(axis=0)


@pytest.mark.parametrize("dst", [(480, 640), (100, 37), (384, 384), (1, 1)])
@pytest.mark.parametrize("kind", ["smooth", "ties"])
def test_certified_argmax_equals_dense_argmax(dst, kind):
    rng = np.random.default_rng(3)
    coarse = rng.normal(0, 1, (6, 12, 12)).astype(np.float32)
    scores = resize_maps(coarse, bilinear(12, 64), bilinear(12, 64))  # [C, 64, 64], smooth regions
    if kind == "ties":  # channel 4 equals channel 1 exactly: ties must go to the lower id
        scores[4] = scores[1]
    grid = CellGrid((64, 64), dst)
    flat = scores.reshape(len(scores), -1)
    # exact bounds for channels 0..3 and 5; channel 4 is "untracked", capped by its true maximum
    tracked = np.array([0, 1, 2, 3, 5])
    labels = grid.certified_argmax(
        flat[tracked],
        flat[tracked],
        tracked,
        flat[4],
        1e-6,
        lambda points, everything: flat[:, points] if everything else flat[tracked][:, points],
    )
    dense = _dense_argmax(scores, grid)
    assert labels.shape == dst
    assert (labels == dense).mean() > 0.999


def test_certified_argmax_with_loose_bounds_still_exact():
    rng = np.random.default_rng(4)
    scores = resize_maps(rng.normal(0, 1, (5, 10, 10)).astype(np.float32), bilinear(10, 48), bilinear(10, 48))
    flat = scores.reshape(5, -1)
    slack = rng.uniform(0, 0.3, flat.shape).astype(np.float32)
    grid = CellGrid((48, 48), (200, 150))
    labels = grid.certified_argmax(
        flat - slack,
        flat + slack,
        np.arange(5),
        np.float32(np.finfo(np.float32).min),
        1e-6,
        lambda points, _: flat[:, points],
    )
    assert (labels == _dense_argmax(scores, grid)).mean() > 0.999


def _count_at_least(grid, maps, scale, threshold, tol):
    """Per map ``k``: target pixels where ``resized(maps[k]) * scale[k] >= threshold``, through count_reaching."""
    counts = np.zeros(len(maps), np.int64)
    for k, (values, factor) in enumerate(zip(maps, scale)):
        scaled, flat = values * factor, values.reshape(-1)
        counts[k] = grid.count_reaching(scaled, scaled, factor, threshold, tol, lambda points, flat=flat: flat[points])[0]
    return counts


@pytest.mark.parametrize("dst", [(480, 640), (100, 37), (384, 384)])
def test_count_at_least_equals_dense_count(dst):
    rng = np.random.default_rng(5)
    logits = resize_maps(rng.normal(0, 4, (4, 8, 8)).astype(np.float32), bilinear(8, 384), bilinear(8, 384))
    sig = (1 / (1 + np.exp(-logits))).astype(np.float32)
    scale = np.array([0.9, 0.6, 1.0, 0.75], np.float32)
    counts = _count_at_least(CellGrid((384, 384), dst), sig, scale, 0.5, 1e-5)
    dense = (_torch_resize(sig, dst) * scale[:, None, None] >= 0.5).sum(axis=(1, 2))
    np.testing.assert_array_equal(counts, dense)
    assert counts.min() > 0 and counts.max() < dst[0] * dst[1]  # a real test: some in, some out


@pytest.mark.parametrize("dst", [(480, 640), (100, 37)])
def test_count_reaching_from_window_bounds_equals_dense_count(dst):
    # bounds per logit window (as panoptic segmentation passes them), exact values sampled where they decide
    from m2f_deploy.processing.postprocess.common import sigmoid as _sigmoid
    from m2f_deploy.processing.postprocess.windows import working_grid as _working_grid

    rng = np.random.default_rng(7)
    logits = resize_maps(rng.normal(0, 6, (3, 6, 8)).astype(np.float32), bilinear(6, 48), bilinear(8, 64))
    grid, cells = _working_grid((48, 64), None), CellGrid((384, 384), dst)
    low, high = grid.window_range(_sigmoid(logits.copy()))
    sig = _sigmoid(grid.resize(logits))
    dense = (_torch_resize(sig, dst) * 0.9 >= 0.5).sum(axis=(1, 2))
    for k in range(3):
        bounds = (low[k].reshape(48, 64) * np.float32(0.9), high[k].reshape(48, 64) * np.float32(0.9))

        def values_at(points, k=k):
            return _sigmoid(grid.sample(logits[k : k + 1], points))[0]

        exact = cells.count_reaching(*bounds, 0.9, 0.5, 1e-5, values_at, via=grid.windows)
        assert exact == (dense[k], dense[k])
        lo, hi = cells.count_reaching(*bounds, 0.9, 0.5, 1e-5, values_at, via=grid.windows, settled=lambda *_: True)
        assert lo <= dense[k] <= hi and lo < hi  # bounds only: they hold, and they are not exact here
    assert 0 < dense.min() and dense.max() < dst[0] * dst[1]


@pytest.mark.parametrize("exact", [False, True])
def test_certified_argmax_from_decided_cells_equals_dense_argmax(exact):
    rng = np.random.default_rng(8)
    scores = resize_maps(rng.normal(0, 1, (4, 10, 10)).astype(np.float32), bilinear(10, 64), bilinear(10, 64))
    flat = scores.reshape(4, -1)
    grid = CellGrid((64, 64), (200, 150))
    # step 1 done by the caller with the exact values: what certified_argmax must accept as `decided`
    best = flat.argmax(axis=0).reshape(64, 64)
    second = np.sort(flat, axis=0)[-2]
    margin = (flat.max(axis=0) - second).reshape(64, 64)
    lowest = grid.reduce(best, np.minimum)
    sure = (lowest == grid.reduce(best, np.maximum)) & (grid.reduce(margin, np.minimum) > 1e-6)
    points = grid.corners(~sure)
    at = flat[:, points]
    labels = grid.certified_argmax(
        at,
        at,
        np.arange(4),
        np.float32(np.finfo(np.float32).min),
        1e-6,
        lambda p, _: flat[:, p],
        decided=(sure, lowest, points),
        exact=exact,
    )
    assert 0 < (~sure).sum() < sure.size
    assert (labels == _dense_argmax(scores, grid)).mean() > 0.999


@pytest.mark.parametrize(("queries", "classes"), [(100, 133), (100, 20), (30, 8), (5, 1), (1, 64)])
@pytest.mark.parametrize("ties", [False, True])
def test_top_pairs_are_torch_topk_as_a_set_largest_first_ties_by_index(queries, classes, ties):
    rng = np.random.default_rng(queries * classes)
    values = rng.random(queries * classes).astype(np.float32)
    if ties:
        values = np.round(values * 4) / 4
    ours = top_pairs(values.reshape(queries, classes), queries)
    expected = torch.topk(torch.from_numpy(values), queries, sorted=False)
    # the same values (a tie at the k-th value may pick other indices of that value, as torch's own order does)
    np.testing.assert_array_equal(np.sort(values[ours]), np.sort(expected.values.numpy()))
    if not ties:
        assert set(ours.tolist()) == set(expected.indices.tolist())
    order = np.lexsort((np.arange(values.size), -values))[:queries]  # largest first, ties by index
    np.testing.assert_array_equal(ours, order)


def test_segment_order_is_score_descending_ties_by_pair():
    scores = np.array([0.5, 0.9, 0.5, 0.7], np.float32)
    pairs = np.array([7, 3, 2, 9])
    np.testing.assert_array_equal(segment_order(scores, pairs), [1, 3, 2, 0])


def test_rle_matches_transformers():
    from transformers.models.mask2former.image_processing_pil_mask2former import (
        binary_mask_to_rle as hf_binary_mask_to_rle,
    )
    from transformers.models.mask2former.image_processing_pil_mask2former import (
        convert_segmentation_to_rle as hf_segmentation_to_rle,
    )

    rng = np.random.default_rng(6)
    segmentation = rng.integers(-1, 4, (37, 53)).astype(np.float32)
    segmentation[:5] = -1
    assert segmentation_to_rle(segmentation) == hf_segmentation_to_rle(torch.from_numpy(segmentation))
    for mask in [np.zeros((4, 4)), np.ones((3, 5)), segmentation == 2]:
        assert binary_mask_to_rle(mask) == hf_binary_mask_to_rle(torch.from_numpy(mask.astype(np.int64)))
    assert binary_mask_to_rle(np.array([[0, 1, 1], [1, 0, 1]])) == [2, 3, 6, 1]  # 1-based starts, row-major
