"""Semantic segmentation, fast: HF's class map from far fewer values than HF computes.

HF: per-class scores ``einsum(softmax(classes)[:, :-1], sigmoid(masks))`` on the working grid, resized (bilinear)
to the target size, argmax over classes (see :mod:`.reference`). Here, without changing the result:

* The first decisions are taken per logit window (:mod:`.windows`): a cell of the target resize is decided when
  the windows that its corners read agree by a margin; exact working-grid values are computed only at the pixels
  that the undecided cells read, and exact target values only for the pixels of cells still in doubt
  (:meth:`.cells.CellGrid.certified_argmax`).
* Queries that add little to any class anywhere ("minor") and classes that cannot come near the strongest, or
  score less everywhere than another scores anywhere ("weak"), enter through bounds only; per window, minor
  queries are bounded over tiles of windows (taken from the logits directly), and at the pixels of undecided
  cells by their own windows, next to the exact major queries. Where a window's bounds do not decide, the
  leader's lead over each other class is bounded directly, which only pays for the queries where the two classes
  differ (tight when all queries favour the same classes, as a random-weight model's do). Exact scores of every
  query are computed only where those bounds do not decide.
* When a sample of windows shows that their bounds decide little (e.g. noise), the strong classes' scores are
  computed on the whole working grid instead (:func:`_labels_from_dense_scores`), strip by strip (resize,
  sigmoid, product), so that the mask probabilities are never held whole; weak classes still enter through
  bounds, and every pixel they could win is settled with exact scores: the labels are HF's either way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from m2f_deploy.processing.postprocess.cells import TOL, CellGrid, leaders
from m2f_deploy.processing.postprocess.common import (
    FLOAT32_MIN,
    WORKING_SIZE,
    Size,
    TargetSizes,
    per_image,
    sigmoid,
    softmax,
)
from m2f_deploy.processing.postprocess.resample import bilinear, product, resize_maps
from m2f_deploy.processing.postprocess.threads import SERIAL, Workers
from m2f_deploy.processing.postprocess.windows import WorkingGrid, agreeing_cells, cells_to, working_grid

# Semantic: a query is minor when, added to the other minor queries, it moves no class score by more than
# _BOUND_BUDGET; a class is weak when it can score at most _WEAK_SHARE of what the strongest class can. Only
# speed knobs: results do not depend on them.
_BOUND_BUDGET = 0.1
_WEAK_SHARE = 0.25
_WEAK_WINDOWED = 8
# Semantic: minor queries are first bounded over tiles of this many logits per side.
_TILE = 8
# Semantic: bounds per window are used when they decide at least _WINDOWS_DECIDE of a sample of about
# _SAMPLE_WINDOWS windows, else scores are computed everywhere (a speed knob: on noise they decide almost no
# window, on a scene most).
_SAMPLE_WINDOWS = 1024
_WINDOWS_DECIDE = 0.5

# Per group of queries: (query ids [k], the sigmoids of their smallest and of their largest logits [k, n'], index):
# per logit window (index None), or per tile of windows (index: the tile of each window [n]).
_Ranges = Sequence[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]]


def semantic_segmentation(
    outputs: Any,
    target_sizes: TargetSizes = None,
    return_segmentation_scores: bool = False,
    pixel_mask: np.ndarray | None = None,
    workers: Workers = SERIAL,
) -> list[np.ndarray] | list[dict[str, np.ndarray]]:
    """Per image: the class of every pixel, ``[H, W]`` int64 (``[384, 384]`` without ``target_sizes``).

    With ``return_segmentation_scores``, per image a dict with ``segmentation`` and ``segmentation_scores``
    ``[C, H, W]`` float32 (computed densely at the target size, as HF does). ``workers``: see :mod:`.threads`.
    """
    results = []
    for classes, masks, size, region in per_image(outputs, target_sizes, pixel_mask):
        grid = working_grid(masks.shape[1:], region)
        probs = softmax(classes)[:, :-1]  # [Q, C]
        if return_segmentation_scores:
            results.append(_semantic_dense(probs, masks, size, grid, workers))
        else:
            results.append(_semantic_labels(probs, masks, size, grid, workers))
    return results


def _semantic_dense(
    probs: np.ndarray, masks: np.ndarray, size: Size | None, grid: WorkingGrid, workers: Workers
) -> dict:
    scores = grid.mixed_probabilities(probs, masks, workers).reshape(-1, *WORKING_SIZE)  # [C, 384, 384]
    if size is not None:
        scores = resize_maps(scores, bilinear(WORKING_SIZE[0], size[0]), bilinear(WORKING_SIZE[1], size[1]))
    return {"segmentation": scores.argmax(axis=0), "segmentation_scores": scores}


def _semantic_labels(
    probs: np.ndarray, masks: np.ndarray, size: Size | None, grid: WorkingGrid, workers: Workers
) -> np.ndarray:
    # [Q, h / _TILE, w / _TILE]: the extreme logits of each tile of windows, i.e. of the logits they read
    tile_low, tile_high = grid.tile_range(masks, _TILE)
    split = _SemanticSplit.of(probs, sigmoid(tile_low.min(axis=(1, 2))), sigmoid(tile_high.max(axis=(1, 2))))
    if not _windows_decide(probs, masks, grid, split):  # e.g. noise: go exact
        return _labels_from_dense_scores(probs, masks, size, grid, split, workers)
    cells = cells_to(size or WORKING_SIZE)
    tiles = (sigmoid(tile_low[split.minor]), sigmoid(tile_high[split.minor]))
    decided = _semantic_per_window(probs, masks, grid, cells, split, tiles, workers)
    lower, upper = _semantic_at_points(probs, masks, grid, split, decided[2], workers)

    # 3. Exact scores where the bounds do not decide: every query sampled (kept for a second call on a subset).
    known = {"at": np.empty(0, np.int64), "sig": np.empty((len(probs), 0), np.float32)}

    def scores_at(at: np.ndarray, everything: bool) -> np.ndarray:
        seen = np.minimum(np.searchsorted(known["at"], at), max(known["at"].size - 1, 0))
        if known["at"].size and (known["at"][seen] == at).all():
            sig = known["sig"][:, seen]
        else:
            sig = sigmoid(grid.sample(masks, at))
            known.update(at=at, sig=sig)
        return _mix(probs if everything else probs[:, split.tracked], sig, workers)

    return cells.certified_argmax(
        lower, upper, split.tracked, split.far_cap, split.tol, scores_at, decided=decided, workers=workers
    )


@dataclass(frozen=True)
class _SemanticSplit:
    """Which queries and classes semantic segmentation treats exactly, and which only through bounds.

    ``major`` / ``minor``: query ids (minor: the longest run of the weakest queries whose summed reach stays
    within ``_BOUND_BUDGET`` for every class, used only when it spares a good share of the queries).
    ``strong``: classes that can come near the strongest; of the others (weak), ``near`` are tracked with
    bounds per window, and the rest (far) never score above ``far_cap``. ``tracked``: strong and near, sorted.
    ``tol``: the lead that decisions from bounds need, relative to the scale of the scores.
    """

    major: np.ndarray
    minor: np.ndarray
    strong: np.ndarray
    near: np.ndarray
    tracked: np.ndarray
    far_cap: float
    tol: float

    @classmethod
    def of(cls, probs: np.ndarray, trough: np.ndarray, peak: np.ndarray) -> _SemanticSplit:
        """From class probabilities ``[Q, C]`` and a lower and an upper bound on each query's mask probability
        ``[Q]``."""
        num_queries = len(probs)
        reach = probs * peak[:, None]  # [Q, C]: the most a query adds to a class score anywhere
        upper = reach.sum(axis=0)  # [C]: the most a class can score anywhere
        floor = (probs * trough[:, None]).sum(axis=0)  # [C]: the least a class scores everywhere
        weakest_first = np.argsort(reach.sum(axis=1), kind="stable")
        n_minor = int(np.searchsorted(np.cumsum(reach[weakest_first], axis=0).max(axis=1), _BOUND_BUDGET, "right"))
        n_minor = 0 if n_minor < max(1, num_queries // 4) else min(n_minor, num_queries - 1)
        weak = upper < max(_WEAK_SHARE * float(upper.max()), float(floor.max()))  # or never the best anywhere
        strong = np.flatnonzero(~weak)
        weak_first = np.flatnonzero(weak)[np.argsort(-upper[weak], kind="stable")]
        near, far = weak_first[:_WEAK_WINDOWED], weak_first[_WEAK_WINDOWED:]
        return cls(
            major=np.sort(weakest_first[n_minor:]),
            minor=np.sort(weakest_first[:n_minor]),
            strong=strong,
            near=near,
            tracked=np.union1d(strong, near),
            far_cap=float(upper[far].max(initial=FLOAT32_MIN)),
            tol=TOL * max(1.0, float(upper.max())),
        )


def _windows_decide(probs: np.ndarray, masks: np.ndarray, grid: WorkingGrid, split: _SemanticSplit) -> bool:
    """Whether bounds per logit window decide the leading class in most windows, judged on a sample of windows
    (every query bounded by its window's extreme logits, as step 1 bounds the major ones)."""
    size = masks.shape[1] * masks.shape[2]
    sample = np.arange(0, size, max(1, size // _SAMPLE_WINDOWS))
    low, high = grid.window_range_at(masks, np.arange(len(masks)), sample)  # [Q, n]: extreme logits
    _, margin = _window_leaders(probs, split, [(np.arange(len(masks)), sigmoid(low), sigmoid(high), None)], SERIAL)
    return np.count_nonzero(margin > split.tol) >= _WINDOWS_DECIDE * sample.size


def _semantic_per_window(
    probs: np.ndarray,
    masks: np.ndarray,
    grid: WorkingGrid,
    cells: CellGrid,
    split: _SemanticSplit,
    tiles: tuple[np.ndarray, np.ndarray],
    workers: Workers,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Step 1, per logit window (every working-grid pixel reads one): bounds on the class scores from the window's
    extreme logits (major queries), or from those of its tile of windows (minor queries: ``tiles``, the sigmoids
    of their tiles' extreme logits ``[m, tile rows, tile cols]``), see :func:`_window_leaders`.

    Returns the cells decided ``[n_row_cells, n_col_cells]`` (bool): those whose corners read windows where one
    strong class leads by more than ``tol``; their class ids; and the working-grid pixels ``[n]`` (ascending flat
    indices) that the other cells read.
    """
    major, minor = split.major, split.minor
    sig_low, sig_high = grid.window_range(sigmoid(masks[major]))  # [M, h * w]
    ranges = [(major, sig_low, sig_high, None)]
    if minor.size:
        ranges.append((minor, *(t.reshape(minor.size, -1) for t in tiles), grid.tile_of(_TILE)))
    best, margin = _window_leaders(probs, split, ranges, workers)
    sure, lowest = agreeing_cells(cells, grid, best, margin, split.tol)
    return sure, split.strong[lowest], cells.corners(~sure)


def _window_leaders(
    probs: np.ndarray, split: _SemanticSplit, ranges: _Ranges, workers: Workers
) -> tuple[np.ndarray, np.ndarray]:
    """Per window ``[n]``: the strong class with the highest lower bound (its index in ``split.strong``), and a lower
    bound on its lead over every other class (it leads where this exceeds ``split.tol``).

    ``ranges``: the queries' sigmoid ranges, per window or per tile of windows (see ``_Ranges``).

    A class scores between its lower and upper bound in a window, so the leader leads at least by its lower bound
    minus the others' upper bounds (and the weak classes' cap). Where that does not decide, its lead over each
    tracked class ``c`` is bounded directly: ``score - score_c = sum_q (p_q - p_qc) * sigmoid_q`` is smallest with
    each sigmoid at the end of its range that favours ``c``, which costs only where the two classes' probabilities
    differ: much tighter when classes draw on the same queries (a random-weight model's outputs, where every query
    favours the same few classes).
    """
    strong, tracked = split.strong, split.tracked
    low, high = _bound(ranges, probs[:, strong], 1, workers), _bound(ranges, probs[:, strong], 2, workers)  # [S, n]
    cap = np.full(low.shape[1], split.far_cap, np.float32)
    if split.near.size:
        np.maximum(cap, _bound(ranges, probs[:, split.near], 2, workers).max(axis=0), out=cap)
    best, lead, rival = leaders(low, high, cap, workers)
    margin = lead - rival
    undecided = np.flatnonzero(margin <= split.tol)
    # pairwise bounds, per leader: the undecided windows grouped by leader, each range gathered once
    order = undecided[np.argsort(best[undecided], kind="stable")]
    leading, starts = np.unique(best[order], return_index=True)
    gathered = [
        (queries, np.take(lo, order, axis=1), np.take(hi, order, axis=1), None)
        if index is None
        else (queries, lo, hi, index[order])
        for queries, lo, hi, index in ranges
    ]
    for k, part in zip(leading, map(slice, starts, [*starts[1:], order.size])):
        diff = probs[:, strong[k], None] - probs[:, tracked[tracked != strong[k]]]  # [Q, T - 1]
        paired = _bound(gathered, np.maximum(diff, 0), 1, workers, part)
        paired -= _bound(gathered, np.maximum(-diff, 0), 2, workers, part)
        at = order[part]
        paired = np.minimum(paired.min(axis=0, initial=np.inf), low[k, at] - np.float32(split.far_cap))
        margin[at] = np.maximum(margin[at], paired)
    return best, margin


def _bound(
    ranges: _Ranges, weights: np.ndarray, end: int, workers: Workers, part: slice = slice(None)
) -> np.ndarray:
    """``weights.T @ sigmoids`` ``[T, n]`` summed over the groups of ``ranges``, each sigmoid at the low (``end`` 1)
    or high (2) end of its range, at the windows ``part`` only; ``weights`` ``[Q, T]`` non-negative."""
    total = None
    for group in ranges:
        queries, values, index = group[0], group[end], group[3]
        if index is None:
            term = _mix(weights[queries], values[:, part], workers)
        else:
            term = np.take(_mix(weights[queries], values, workers), index[part], axis=1)
        total = term if total is None else np.add(total, term, out=total)
    return total


def _semantic_at_points(
    probs: np.ndarray,
    masks: np.ndarray,
    grid: WorkingGrid,
    split: _SemanticSplit,
    points: np.ndarray,
    workers: Workers,
) -> tuple[np.ndarray, np.ndarray]:
    """Step 2, at working-grid pixels ``points`` ``[n]``: bounds ``[T, n]`` on the tracked classes' scores from
    the exact major queries and the minor ones bounded by their windows' extreme logits (the strongest weak
    classes are tracked here too, so that only the rest is capped, by a constant)."""
    major, minor, tracked = split.major, split.minor, split.tracked
    lower = _mix(probs[np.ix_(major, tracked)], sigmoid(grid.sample(masks[major], points)), workers)  # [T, n]
    if not minor.size:
        return lower, lower
    windows, where = _distinct(grid.window_of[points], masks.shape[1] * masks.shape[2])
    minor_low, minor_high = grid.window_range_at(masks, minor, windows)  # [m, windows]: extreme logits
    weights = probs[np.ix_(minor, tracked)]
    upper = np.take(_mix(weights, sigmoid(minor_high), workers), where, axis=1)
    upper += lower
    lower += np.take(_mix(weights, sigmoid(minor_low), workers), where, axis=1)
    return lower, upper


def _distinct(values: np.ndarray, bound: int) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(values, return_inverse=True)`` for integers in ``[0, bound)``, by marking instead of sorting."""
    marked = np.zeros(bound, bool)
    marked[values] = True
    distinct = np.flatnonzero(marked)
    position = np.zeros(bound, np.int64)
    position[distinct] = np.arange(distinct.size)
    return distinct, position[values]


def _labels_from_dense_scores(
    probs: np.ndarray,
    masks: np.ndarray,
    size: Size | None,
    grid: WorkingGrid,
    split: _SemanticSplit,
    workers: Workers,
) -> np.ndarray:
    """Semantic labels from the strong classes' scores computed on the whole working grid (where bounds per window
    decide little); the weak classes enter through bounds per window, and exact scores of every class settle the
    pixels where one of them could still win."""
    strong, near = split.strong, split.near
    lower = grid.mixed_probabilities(probs[:, strong], masks, workers)  # [S, P]
    cap = FLOAT32_MIN
    if near.size:  # no weak class scores more than its queries' window maxima allow (per window for the
        # strongest few weak classes, anywhere for the rest)
        cap = _mix(probs[:, near], sigmoid(grid.window_extreme(masks, np.maximum)), workers).max(axis=0)
        cap = np.take(np.maximum(cap, split.far_cap), grid.window_of)

    def scores_at(points: np.ndarray, everything: bool) -> np.ndarray:
        if not everything:
            return lower[:, points]
        return _mix(probs, sigmoid(grid.sample(masks, points)), workers)

    return cells_to(size or WORKING_SIZE).certified_argmax(
        lower, lower, strong, cap, split.tol, scores_at, workers=workers
    )


def _mix(weights: np.ndarray, maps: np.ndarray, workers: Workers) -> np.ndarray:
    """``weights.T @ maps``: ``[M, S]``, ``[M, N]`` -> ``[S, N]`` float32 by :func:`.resample.product`: in blocks on
    the calling thread, or, when ``workers`` allow threads and the product is large, whole to BLAS' own threads
    (see :mod:`.threads`)."""
    return product(weights.T, maps, workers=workers)
