"""HF's three Mask2Former post-processes in numpy: same arguments, same results, much less work.

What HF computes (``transformers`` ``Mask2FormerImageProcessor``), and what is kept here on purpose:

* Mask logits ``[Q, h, w]`` are first resized (bilinear) to a fixed 384x384 *working grid*, whatever the
  input size was, and sigmoid is applied there.
* Semantic: per-class scores ``einsum(softmax(classes)[:, :-1], sigmoid(masks))`` on the working grid,
  resized (bilinear) to the target size, argmax over classes.
* Instance: the top-``Q`` (query, class) pairs of the class probabilities, walked in ``torch.topk(...,
  sorted=False)`` order; each pair's mask is ``logits > 0`` on the working grid, its score the class probability
  times the mean mask probability inside the mask; masks are resized (nearest) to the target size and painted
  in walking order (ids from 0, background -1, a float map). ``mask_threshold`` and
  ``overlap_mask_area_threshold`` are accepted but unused, as in HF.
* Panoptic: queries whose best class is not "no object" and scores above ``threshold``; their mask
  probabilities resized (bilinear) to the target size, weighted by the score; every pixel goes to the query
  with the highest weighted probability; a query becomes a segment when it owns pixels and owns more than
  ``overlap_mask_area_threshold`` of the pixels where its weighted probability reaches ``mask_threshold`` (the
  ratio in float32, as torch divides). Segment ids from 1, a fused label reuses its id (and HF then continues
  counting from that id, so later ids can repeat: kept). An int32 map, or a float map of -1 without segments.

How the work is cut without changing results:

* Queries that cannot pass a threshold are dropped before anything is resized (instance: the class
  probability bounds the final score; panoptic: the score filter comes first anyway).
* Nothing is resized to the target size. A target pixel is a convex combination of a 2x2 cell of working-grid
  pixels, so argmax and threshold decisions are taken once per cell when the corners agree by a margin, and
  exact values are computed only for the target pixels of the other cells (see :class:`.resize.CellGrid`).
* Per logit window: a working-grid value is a convex combination of a small window of logits, so the sigmoid
  of the window's smallest and largest logit bound a query's mask probability there (sigmoid is increasing:
  the extremes of the logits' sigmoids are the same bounds). The first decisions of semantic and panoptic
  segmentation are taken per window, a cell being decided when the windows that its corners read agree by a
  margin; exact working-grid values are computed only at the pixels that the undecided cells read.
* Semantic: queries that add little to any class anywhere ("minor") and classes that cannot come near the
  strongest, or score less everywhere than another scores anywhere ("weak"), enter through bounds only; per
  window, minor queries are bounded over tiles of windows (taken from the logits directly), and at the pixels of
  undecided cells by their own windows, next to the exact major queries. Where a window's bounds do not decide,
  the leader's lead over each other class is bounded directly, which only pays for the queries where the two
  classes differ (tight when all queries favour the same classes, as a random-weight model's do). Exact scores
  of every query are computed only where those bounds do not decide. When a sample of windows shows that their
  bounds decide little (e.g. noise), the strong classes' scores are computed on the whole working grid instead,
  strip by strip (resize, sigmoid, product, on two threads), so that the mask probabilities are never held whole.
* Panoptic: the weighted probabilities of the kept queries are bounded per window likewise. The segment test
  needs, per query, the pixels it owns (exact, from the owner map) and the pixels where it reaches
  ``mask_threshold``: the latter are bounded from the windows, then from the exact values at the corners of
  the cells in doubt, and counted pixel by pixel only when the test still depends on them (the test can only
  turn from true to false as the count grows).

Where we differ from HF: results are numpy arrays (HF: torch tensors; same dtypes); values agree with torch to
float32 rounding, so a pixel whose two best scores tie to ~1e-7 may go either way; passing ``pixel_mask`` (from
``preprocess``) crops each image's padding away before the first resize (HF resizes padded logits as they
are, which stretches the padding into the result); NaN or infinite logits are rejected.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from m2f_deploy.errors import InputError
from m2f_deploy.processing.resize import (
    FLOAT32_MIN,
    CellGrid,
    Resample1D,
    _leaders,
    bilinear,
    bilinear_cropped,
    nearest,
    product,
    resize_in_strips,
    resize_maps,
    sample_maps,
)
from m2f_deploy.processing.rle import segmentation_to_rle
from m2f_deploy.processing.topk import topk_order

WORKING_SIZE = (384, 384)
"""HF resizes mask logits to this grid before anything else, for every model and input size."""

# Decisions taken from bounds need a lead larger than the rounding differences to torch (relative to the scale
# of the scores); smaller leads are resolved with exact values.
_TOL = 1e-4
# Semantic: a query is minor when, added to the other minor queries, it moves no class score by more than
# _BOUND_BUDGET; a class is weak when it can score at most _WEAK_SHARE of what the strongest class can. Only
# speed knobs: results do not depend on them.
_BOUND_BUDGET = 0.1
_WEAK_SHARE = 0.25
_WEAK_WINDOWED = 8
# Semantic: minor queries are first bounded over tiles of this many logits per side.
_TILE = 8
# Largest class-score product (multiply-adds) computed without BLAS' thread pool.
_ONE_THREAD_MAX = 2e8
# Semantic: bounds per window are used when they decide at least _WINDOWS_DECIDE of a sample of about
# _SAMPLE_WINDOWS windows, else scores are computed everywhere (a speed knob: on noise they decide almost no
# window, on a scene most).
_SAMPLE_WINDOWS = 1024
_WINDOWS_DECIDE = 0.5

_Size = tuple[int, int]
# Per group of queries: (query ids [k], the sigmoids of their smallest and of their largest logits [k, n'], index):
# per logit window (index None), or per tile of windows (index: the tile of each window [n]).
_Ranges = Sequence[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]]


# -- inputs --------------------------------------------------------------------------------------------------------


def read_outputs(outputs: Any) -> tuple[np.ndarray, np.ndarray]:
    """``class_queries_logits`` ``[B, Q, C+1]`` and ``masks_queries_logits`` ``[B, Q, h, w]`` as float32.

    ``outputs`` is a mapping (e.g. onnxruntime results by name) or an object with the two attributes (e.g.
    ``Mask2FormerForUniversalSegmentationOutput``); values are numpy arrays or anything ``np.asarray`` takes.
    """
    arrays = []
    for name, shape in (("class_queries_logits", "[B, Q, C+1]"), ("masks_queries_logits", "[B, Q, h, w]")):
        try:
            value = outputs[name] if isinstance(outputs, Mapping) else getattr(outputs, name)
        except (KeyError, AttributeError):
            raise InputError(f"outputs has no {name!r} (expected {shape} logits)") from None
        array = np.asarray(value)
        if array.dtype.kind not in "fiu":
            raise InputError(f"{name} must hold real numbers, got dtype {array.dtype}")
        if array.ndim != len(shape.split(",")):
            raise InputError(f"{name} must have shape {shape}, got {array.shape}")
        if 0 in array.shape:
            raise InputError(f"{name} is empty: shape {array.shape}")
        array = array.astype(np.float32, copy=False)
        if not (np.isfinite(array.min()) and np.isfinite(array.max())):  # min and max propagate NaN
            raise InputError(f"{name} contains NaN or infinite values")
        arrays.append(array)
    classes, masks = arrays
    if classes.shape[:2] != masks.shape[:2]:
        raise InputError(
            f"class_queries_logits {classes.shape} and masks_queries_logits {masks.shape} disagree on batch or "
            "query count"
        )
    if classes.shape[2] < 2:
        raise InputError(f"class_queries_logits needs at least one class plus 'no object', got {classes.shape}")
    return classes, masks


def _target_sizes(target_sizes: Sequence[Sequence[int]] | np.ndarray | None, batch: int) -> list[_Size | None]:
    if target_sizes is None:
        return [None] * batch
    try:
        sizes = np.asarray(target_sizes)
    except (TypeError, ValueError) as err:
        raise InputError(f"target_sizes must be {batch} (height, width) pairs: {err}") from None
    if sizes.ndim != 2 or sizes.shape[1] != 2 or sizes.dtype.kind not in "iuf":
        raise InputError(f"target_sizes must be {batch} (height, width) pairs, got {sizes.tolist()!r}")
    if len(sizes) != batch:
        raise InputError(f"target_sizes has {len(sizes)} entries but the outputs hold {batch} images")
    if (sizes != np.round(sizes)).any() or (sizes < 1).any():
        raise InputError(f"target_sizes must be positive whole numbers, got {sizes.tolist()!r}")
    return [(int(h), int(w)) for h, w in sizes]


def _valid_regions(pixel_mask: np.ndarray | None, batch: int) -> list[tuple[_Size, _Size] | None]:
    """Per image: ((valid height, valid width), (padded height, padded width)), from preprocess' pixel_mask."""
    if pixel_mask is None:
        return [None] * batch
    mask = np.asarray(pixel_mask)
    if mask.ndim != 3 or mask.shape[0] != batch:
        raise InputError(f"pixel_mask must have shape [{batch}, H, W] (one per image), got {mask.shape}")
    regions: list[tuple[_Size, _Size] | None] = []
    for i, m in enumerate(mask != 0):
        height, width = int(m.any(axis=1).sum()), int(m.any(axis=0).sum())
        if height == 0 or not m[:height, :width].all() or m.sum() != height * width:
            raise InputError(f"pixel_mask[{i}] must be a non-empty top-left rectangle of ones, as preprocess makes")
        regions.append(((height, width), m.shape))
    return regions


# -- shared steps --------------------------------------------------------------------------------------------------


def _softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, float32."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    np.exp(shifted, out=shifted)
    shifted /= shifted.sum(axis=-1, keepdims=True)
    return shifted


def _sigmoid(values: np.ndarray) -> np.ndarray:
    """Sigmoid, in place."""
    with np.errstate(over="ignore"):  # exp overflows to inf for logits below about -88: 1 / inf = 0 is right
        np.negative(values, out=values)
        np.exp(values, out=values)
    values += 1
    np.reciprocal(values, out=values)
    return values


class _WorkingGrid:
    """Maps one image's mask logits ``[Q, h, w]`` onto the 384x384 working grid.

    With a valid region, the logits are taken to cover the padded input: they are upsampled to it, cropped to
    the valid region, and that is resized to the working grid (all in one linear map per axis).
    """

    def __init__(self, logits_size: _Size, region: tuple[_Size, _Size] | None):
        (h, w), (gh, gw) = logits_size, WORKING_SIZE
        if region is None:
            self.rows, self.cols = bilinear(h, gh), bilinear(w, gw)
        else:
            (vh, vw), (ph, pw) = region
            self.rows, self.cols = bilinear_cropped(h, ph, vh, gh), bilinear_cropped(w, pw, vw, gw)

        # Each working-grid pixel is a convex combination of the logits in a small window: rows
        # first_row[i] .. first_row[i] + row_span - 1, likewise for columns.
        self._first_row, self._row_span = _window(self.rows)
        self._first_col, self._col_span = _window(self.cols)
        self.logits_size = (h, w)
        self.window_of = (self._first_row[:, None] * w + self._first_col[None, :]).reshape(-1)  # [P]
        self.windows = (self._first_row, self._first_col)  # CellGrid's ``via`` for per-window values [h, w]

    def window_range(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Smallest and largest of ``values`` ``[K, h, w]`` in every window, ``[K, h * w]`` each (index with
        ``window_of``).

        A working-grid value lies between the smallest and largest logit of its window: it is a convex
        combination of them. Given the logits' sigmoids, the two bound its sigmoid (sigmoid is increasing).
        """
        return self.window_extreme(values, np.minimum), self.window_extreme(values, np.maximum)

    def window_extreme(self, values: np.ndarray, op: np.ufunc) -> np.ndarray:
        """``op`` (``np.minimum`` or ``np.maximum``) over every window of ``values`` ``[K, h, w]``: ``[K, h * w]``."""
        out = _spread(_spread(values, op, 1, self._row_span), op, 2, self._col_span)
        return out.reshape(len(values), -1)

    def window_range_at(
        self, values: np.ndarray, maps: np.ndarray, windows: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`window_range` of ``values[maps]`` at the flat window indices ``windows`` only: ``[M, n]`` each."""
        h, w = values.shape[1:]
        rows, cols = np.divmod(windows, w)
        flat = values.reshape(len(values), -1)
        low = np.take(flat, windows, axis=1)  # all maps: np.take is much faster than np.ix_ indexing
        high, taken = low.copy(), np.empty_like(low)
        for dr in range(self._row_span):
            for dc in range(1 if dr == 0 else 0, self._col_span):
                at = np.minimum(rows + dr, h - 1) * w + np.minimum(cols + dc, w - 1)
                np.take(flat, at, axis=1, out=taken, mode="clip")  # indices are in range: "clip" writes directly
                np.minimum(low, taken, out=low)
                np.maximum(high, taken, out=high)
        return low[maps], high[maps]

    def tile_of(self, tile: int) -> np.ndarray:
        """The tile of every window ``[h * w]``, for tiles of ``tile`` x ``tile`` windows (row-major)."""
        (h, w), cols = self.logits_size, -(-self.logits_size[1] // tile)
        return ((np.arange(h) // tile)[:, None] * cols + (np.arange(w) // tile)[None, :]).reshape(-1)

    def tile_range(self, values: np.ndarray, tile: int) -> tuple[np.ndarray, np.ndarray]:
        """Smallest and largest of ``values`` ``[K, h, w]`` over the windows of every tile (see :meth:`tile_of`):
        ``[K, ceil(h / tile), ceil(w / tile)]`` each.

        Computed from ``values`` directly (blocks of ``tile`` samples, extended by the window span), without the
        per-window arrays: only the small results are allocated.
        """
        out = []
        for op in (np.minimum, np.maximum):
            rows = _block_reduce(values, op, 1, tile, self._row_span)
            out.append(_block_reduce(rows, op, 2, tile, self._col_span))
        return out[0], out[1]

    def resize(self, logits: np.ndarray) -> np.ndarray:
        """``[K, h, w]`` -> ``[K, 384, 384]``."""
        return resize_maps(logits, self.rows, self.cols)

    def mixed_probabilities(self, weights: np.ndarray, logits: np.ndarray) -> np.ndarray:
        """``weights.T @ sigmoid(resize(logits))``: ``[K, S]``, ``[K, h, w]`` -> ``[S, 384 * 384]``, computed strip by
        strip (see :func:`.resize.resize_in_strips`): the mask probabilities are never held whole."""
        left, width = np.ascontiguousarray(weights.T, np.float32), WORKING_SIZE[1]
        out = np.empty((left.shape[0], WORKING_SIZE[0] * width), np.float32)

        def each(rows: slice, strip: np.ndarray) -> None:
            product(left, _sigmoid(strip).reshape(len(strip), -1), out=out[:, rows.start * width : rows.stop * width])

        resize_in_strips(logits, self.rows, self.cols, each)
        return out

    def sample(self, logits: np.ndarray, points: np.ndarray) -> np.ndarray:
        """``[K, h, w]`` at flat working-grid indices ``points`` ``[n]`` -> ``[K, n]``."""
        ys, xs = np.divmod(points, WORKING_SIZE[1])
        return sample_maps(logits, self.rows, self.cols, ys, xs)


def _window(taps: Resample1D) -> tuple[np.ndarray, int]:
    """First source sample read by each output sample ``[n_out]``, and the widest span read."""
    first, last = taps.index.min(axis=1), taps.index.max(axis=1)
    return first, int((last - first).max()) + 1


def _spread(values: np.ndarray, op: np.ufunc, axis: int, span: int) -> np.ndarray:
    """``op`` over ``values[i], ..., values[min(i + span - 1, n - 1)]`` along ``axis`` (a new array).

    Neighbours along ``axis`` are ``step`` elements apart in the flat (C-order) array, so ``op`` runs over the
    whole flat array shifted by ``step``: long contiguous loops, much faster than slices along the last axis.
    The last ``span - 1`` samples along ``axis`` took values from beyond their end (the next row or map) and are
    redone.
    """
    if span <= 1:
        return values
    n = values.shape[axis]
    step = int(np.prod(values.shape[axis + 1 :], dtype=np.int64))
    flat = np.ascontiguousarray(values).reshape(-1)
    out = np.empty(values.shape, values.dtype)
    run = out.reshape(-1)
    op(flat[:-step], flat[step:], out=run[:-step])
    for shift in range(2, min(span, n)):
        op(run[: -shift * step], flat[shift * step :], out=run[: -shift * step])
    index = [slice(None)] * values.ndim
    for i in range(max(0, n - span + 1), n):
        index[axis] = slice(i, n)
        tail = op.reduce(values[tuple(index)], axis=axis, keepdims=True)
        index[axis] = slice(i, i + 1)
        out[tuple(index)] = tail
    return out


def _block_reduce(values: np.ndarray, op: np.ufunc, axis: int, block: int, span: int) -> np.ndarray:
    """``op`` along ``axis`` over samples ``[i * block, (i + 1) * block + span - 1)`` (clipped to the axis), for
    every ``i < ceil(n / block)``: the extreme of ``block`` consecutive windows of ``span`` samples."""
    n = values.shape[axis]
    full, blocks = n // block, -(-n // block)

    def along(part: slice) -> tuple[slice, ...]:
        return (slice(None),) * axis + (part,)

    head = values[along(slice(0, full * block))].reshape(*values.shape[:axis], full, block, *values.shape[axis + 1 :])
    inner = (slice(None),) * (axis + 1)
    first = head[(*inner, 0)].copy()
    for i in range(1, block):  # one op per offset in the block: long strided loops, faster than op.reduce
        op(first, head[(*inner, i)], out=first)
    parts = [first]
    if blocks > full:
        parts.append(op.reduce(values[along(slice(full * block, n))], axis=axis, keepdims=True))
    out = np.concatenate(parts, axis=axis) if len(parts) > 1 else parts[0]
    for extra in range(min(span - 1, n)):  # the first samples of the next block, read by the last windows
        following = values[along(slice(block + extra, None, block))]
        count = following.shape[axis]
        op(out[along(slice(0, count))], following, out=out[along(slice(0, count))])
    return out


def _agreeing_cells(
    cells: CellGrid, grid: _WorkingGrid, best: np.ndarray, margin: np.ndarray, tol: float
) -> tuple[np.ndarray, np.ndarray]:
    """Cells whose four corners read windows with the same leader, ahead by more than ``tol`` in each: a convex
    combination of values inside those windows keeps that leader. From the leader ``best`` and its ``margin``
    per window ``[h * w]``; returns the cells ``[n_row_cells, n_col_cells]`` (bool) and their leader (-1 where
    not decided)."""
    key = np.where(margin > tol, best, -1)  # -1: no safe leader in this window
    key = key.astype(np.int16 if key.max(initial=0) < np.iinfo(np.int16).max else np.int64).reshape(grid.logits_size)
    lowest = cells.reduce(key, np.minimum, via=grid.windows)
    return (lowest >= 0) & (lowest == cells.reduce(key, np.maximum, via=grid.windows)), lowest


@lru_cache(maxsize=8)
def _working_grid(logits_size: _Size, region: tuple[_Size, _Size] | None) -> _WorkingGrid:
    return _WorkingGrid(logits_size, region)


@lru_cache(maxsize=32)
def _cells(target: _Size) -> CellGrid:
    return CellGrid(WORKING_SIZE, target)


def _per_image(
    outputs: Any, target_sizes: Sequence[Sequence[int]] | np.ndarray | None, pixel_mask: np.ndarray | None
) -> Iterator[tuple[np.ndarray, np.ndarray, _Size | None, _WorkingGrid]]:
    """Per image: class logits ``[Q, C+1]``, mask logits ``[Q, h, w]``, target size, working-grid mapping."""
    classes, masks = read_outputs(outputs)
    batch = classes.shape[0]
    sizes = _target_sizes(target_sizes, batch)
    regions = _valid_regions(pixel_mask, batch)
    for b in range(batch):
        yield classes[b], masks[b], sizes[b], _working_grid(masks.shape[2:], regions[b])


# -- semantic ------------------------------------------------------------------------------------------------------


def semantic_segmentation(
    outputs: Any,
    target_sizes: Sequence[Sequence[int]] | np.ndarray | None = None,
    return_segmentation_scores: bool = False,
    pixel_mask: np.ndarray | None = None,
) -> list[np.ndarray] | list[dict[str, np.ndarray]]:
    """Per image: the class of every pixel, ``[H, W]`` int64 (``[384, 384]`` without ``target_sizes``).

    With ``return_segmentation_scores``, per image a dict with ``segmentation`` and ``segmentation_scores``
    ``[C, H, W]`` float32 (computed densely at the target size, as HF does).
    """
    results = []
    for classes, masks, size, grid in _per_image(outputs, target_sizes, pixel_mask):
        probs = _softmax(classes)[:, :-1]  # [Q, C]
        if return_segmentation_scores:
            results.append(_semantic_dense(probs, masks, size, grid))
        else:
            results.append(_semantic_labels(probs, masks, size, grid))
    return results


def _semantic_dense(probs: np.ndarray, masks: np.ndarray, size: _Size | None, grid: _WorkingGrid) -> dict:
    scores = grid.mixed_probabilities(probs, masks).reshape(-1, *WORKING_SIZE)  # [C, 384, 384]
    if size is not None:
        scores = resize_maps(scores, bilinear(WORKING_SIZE[0], size[0]), bilinear(WORKING_SIZE[1], size[1]))
    return {"segmentation": scores.argmax(axis=0), "segmentation_scores": scores}


def _semantic_labels(probs: np.ndarray, masks: np.ndarray, size: _Size | None, grid: _WorkingGrid) -> np.ndarray:
    # [Q, h / _TILE, w / _TILE]: the extreme logits of each tile of windows, i.e. of the logits they read
    tile_low, tile_high = grid.tile_range(masks, _TILE)
    split = _SemanticSplit.of(probs, _sigmoid(tile_low.min(axis=(1, 2))), _sigmoid(tile_high.max(axis=(1, 2))))
    if not _windows_decide(probs, masks, grid, split):  # e.g. noise: go exact
        return _semantic_labels_exact(probs, masks, size, grid, split)
    cells = _cells(size or WORKING_SIZE)
    tiles = (_sigmoid(tile_low[split.minor]), _sigmoid(tile_high[split.minor]))
    decided = _semantic_per_window(probs, masks, grid, cells, split, tiles)
    lower, upper = _semantic_at_points(probs, masks, grid, split, decided[2])

    # 3. Exact scores where the bounds do not decide: every query sampled (kept for a second call on a subset).
    known = {"at": np.empty(0, np.int64), "sig": np.empty((len(probs), 0), np.float32)}

    def scores_at(at: np.ndarray, everything: bool) -> np.ndarray:
        seen = np.minimum(np.searchsorted(known["at"], at), max(known["at"].size - 1, 0))
        if known["at"].size and (known["at"][seen] == at).all():
            sig = known["sig"][:, seen]
        else:
            sig = _sigmoid(grid.sample(masks, at))
            known.update(at=at, sig=sig)
        return _mix(probs if everything else probs[:, split.tracked], sig)

    return cells.certified_argmax(lower, upper, split.tracked, split.far_cap, split.tol, scores_at, decided=decided)


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
            tol=_TOL * max(1.0, float(upper.max())),
        )


def _windows_decide(probs: np.ndarray, masks: np.ndarray, grid: _WorkingGrid, split: _SemanticSplit) -> bool:
    """Whether bounds per logit window decide the leading class in most windows, judged on a sample of windows
    (every query bounded by its window's extreme logits, as step 1 bounds the major ones)."""
    size = masks.shape[1] * masks.shape[2]
    sample = np.arange(0, size, max(1, size // _SAMPLE_WINDOWS))
    low, high = grid.window_range_at(masks, np.arange(len(masks)), sample)  # [Q, n]: extreme logits
    _, margin = _window_leaders(probs, split, [(np.arange(len(masks)), _sigmoid(low), _sigmoid(high), None)])
    return np.count_nonzero(margin > split.tol) >= _WINDOWS_DECIDE * sample.size


def _semantic_per_window(
    probs: np.ndarray,
    masks: np.ndarray,
    grid: _WorkingGrid,
    cells: CellGrid,
    split: _SemanticSplit,
    tiles: tuple[np.ndarray, np.ndarray],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Step 1, per logit window (every working-grid pixel reads one): bounds on the class scores from the window's
    extreme logits (major queries), or from those of its tile of windows (minor queries: ``tiles``, the sigmoids
    of their tiles' extreme logits ``[m, tile rows, tile cols]``), see :func:`_window_leaders`.

    Returns the cells decided ``[n_row_cells, n_col_cells]`` (bool): those whose corners read windows where one
    strong class leads by more than ``tol``; their class ids; and the working-grid pixels ``[n]`` (ascending flat
    indices) that the other cells read.
    """
    major, minor = split.major, split.minor
    sig_low, sig_high = grid.window_range(_sigmoid(masks[major]))  # [M, h * w]
    ranges = [(major, sig_low, sig_high, None)]
    if minor.size:
        ranges.append((minor, *(t.reshape(minor.size, -1) for t in tiles), grid.tile_of(_TILE)))
    best, margin = _window_leaders(probs, split, ranges)
    sure, lowest = _agreeing_cells(cells, grid, best, margin, split.tol)
    return sure, split.strong[lowest], cells.corners(~sure)


def _window_leaders(probs: np.ndarray, split: _SemanticSplit, ranges: _Ranges) -> tuple[np.ndarray, np.ndarray]:
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
    low, high = _bound(ranges, probs[:, strong], 1), _bound(ranges, probs[:, strong], 2)  # [S, n]
    cap = np.full(low.shape[1], split.far_cap, np.float32)
    if split.near.size:
        np.maximum(cap, _bound(ranges, probs[:, split.near], 2).max(axis=0), out=cap)
    best, lead, rival = _leaders(low, high, cap)
    margin = lead - rival
    undecided = np.flatnonzero(margin <= split.tol)
    # pairwise bounds, per leader: the undecided windows grouped by leader, each range gathered once
    order = undecided[np.argsort(best[undecided], kind="stable")]
    leaders, starts = np.unique(best[order], return_index=True)
    gathered = [
        (queries, np.take(lo, order, axis=1), np.take(hi, order, axis=1), None)
        if index is None
        else (queries, lo, hi, index[order])
        for queries, lo, hi, index in ranges
    ]
    for k, part in zip(leaders, map(slice, starts, [*starts[1:], order.size])):
        diff = probs[:, strong[k], None] - probs[:, tracked[tracked != strong[k]]]  # [Q, T - 1]
        paired = _bound(gathered, np.maximum(diff, 0), 1, part) - _bound(gathered, np.maximum(-diff, 0), 2, part)
        at = order[part]
        paired = np.minimum(paired.min(axis=0, initial=np.inf), low[k, at] - np.float32(split.far_cap))
        margin[at] = np.maximum(margin[at], paired)
    return best, margin


def _bound(ranges: _Ranges, weights: np.ndarray, end: int, part: slice = slice(None)) -> np.ndarray:
    """``weights.T @ sigmoids`` ``[T, n]`` summed over the groups of ``ranges``, each sigmoid at the low (``end`` 1)
    or high (2) end of its range, at the windows ``part`` only; ``weights`` ``[Q, T]`` non-negative."""
    total = None
    for group in ranges:
        queries, values, index = group[0], group[end], group[3]
        if index is None:
            term = _mix(weights[queries], values[:, part])
        else:
            term = np.take(_mix(weights[queries], values), index[part], axis=1)
        total = term if total is None else np.add(total, term, out=total)
    return total


def _semantic_at_points(
    probs: np.ndarray, masks: np.ndarray, grid: _WorkingGrid, split: _SemanticSplit, points: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Step 2, at working-grid pixels ``points`` ``[n]``: bounds ``[T, n]`` on the tracked classes' scores from
    the exact major queries and the minor ones bounded by their windows' extreme logits (the strongest weak
    classes are tracked here too, so that only the rest is capped, by a constant)."""
    major, minor, tracked = split.major, split.minor, split.tracked
    lower = _mix(probs[np.ix_(major, tracked)], _sigmoid(grid.sample(masks[major], points)))  # [T, n]
    if not minor.size:
        return lower, lower
    windows, where = _distinct(grid.window_of[points], masks.shape[1] * masks.shape[2])
    minor_low, minor_high = grid.window_range_at(masks, minor, windows)  # [m, windows]: extreme logits
    weights = probs[np.ix_(minor, tracked)]
    upper = np.take(_mix(weights, _sigmoid(minor_high)), where, axis=1)
    upper += lower
    lower += np.take(_mix(weights, _sigmoid(minor_low)), where, axis=1)
    return lower, upper


def _distinct(values: np.ndarray, bound: int) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(values, return_inverse=True)`` for integers in ``[0, bound)``, by marking instead of sorting."""
    marked = np.zeros(bound, bool)
    marked[values] = True
    distinct = np.flatnonzero(marked)
    position = np.zeros(bound, np.int64)
    position[distinct] = np.arange(distinct.size)
    return distinct, position[values]


def _semantic_labels_exact(
    probs: np.ndarray, masks: np.ndarray, size: _Size | None, grid: _WorkingGrid, split: _SemanticSplit
) -> np.ndarray:
    """Semantic labels from exact strong-class scores on the whole working grid (where bounds per window decide
    little)."""
    strong, near = split.strong, split.near
    lower = grid.mixed_probabilities(probs[:, strong], masks)  # [S, P]
    cap = FLOAT32_MIN
    if near.size:  # no weak class scores more than its queries' window maxima allow (per window for the
        # strongest few weak classes, anywhere for the rest)
        cap = _mix(probs[:, near], _sigmoid(grid.window_extreme(masks, np.maximum))).max(axis=0)
        cap = np.take(np.maximum(cap, split.far_cap), grid.window_of)

    def scores_at(points: np.ndarray, everything: bool) -> np.ndarray:
        if not everything:
            return lower[:, points]
        return _mix(probs, _sigmoid(grid.sample(masks, points)))

    return _cells(size or WORKING_SIZE).certified_argmax(lower, lower, strong, cap, split.tol, scores_at)


def _mix(weights: np.ndarray, maps: np.ndarray) -> np.ndarray:
    """``weights.T @ maps``: ``[M, S]``, ``[M, N]`` -> ``[S, N]`` float32.

    Small products stay on the calling thread (:func:`.resize.product`): waking BLAS' thread pool slows down
    what follows (see ``resize``); for large ones it is worth it.
    """
    if weights.size * maps.shape[1] <= _ONE_THREAD_MAX:
        return product(weights.T, maps)
    return weights.T @ maps


# -- instance ------------------------------------------------------------------------------------------------------


def instance_segmentation(
    outputs: Any,
    threshold: float = 0.5,
    mask_threshold: float = 0.5,
    overlap_mask_area_threshold: float = 0.8,
    target_sizes: Sequence[Sequence[int]] | np.ndarray | None = None,
    return_coco_annotation: bool = False,
    return_binary_maps: bool = False,
    pixel_mask: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """Per image: ``{"segmentation", "segments_info"}``.

    ``segmentation``: ``[H, W]`` float32 segment ids (-1: none); or HF's run-length encoding per distinct id
    with ``return_coco_annotation``; or the instance masks ``[N, H, W]`` float32 with ``return_binary_maps``
    (when there is at least one). ``segments_info``: ``{"id", "label_id", "was_fused": False, "score"}`` per
    segment, in HF's order.
    """
    if return_coco_annotation and return_binary_maps:
        raise InputError("return_coco_annotation and return_binary_maps cannot both be True")
    results = []
    for classes, masks, size, grid in _per_image(outputs, target_sizes, pixel_mask):
        segmentation, segments, instance_masks = _instance(classes, masks, threshold, size, grid, return_binary_maps)
        if return_coco_annotation:
            segmentation = segmentation_to_rle(segmentation)
        elif instance_masks:
            segmentation = np.stack(instance_masks).astype(np.float32)
        results.append({"segmentation": segmentation, "segments_info": segments})
    return results


def _instance(
    classes: np.ndarray,
    masks: np.ndarray,
    threshold: float,
    size: _Size | None,
    grid: _WorkingGrid,
    with_masks: bool,
) -> tuple[np.ndarray, list[dict[str, Any]], list[np.ndarray]]:
    """Segmentation ``[H, W]``, segments, and (``with_masks``) the instance masks ``[H, W]`` bool of one image."""
    probs = _softmax(classes)[:, :-1]
    num_queries, num_classes = probs.shape
    flat = probs.reshape(-1)
    pairs = topk_order(flat, num_queries)  # HF's walking order over (query, class) pairs
    # A pair's score is its class probability times a mean mask probability (at most 1): pairs below the
    # threshold already cannot pass.
    pairs = pairs[flat[pairs] >= threshold]
    queries, inverse = np.unique(pairs // num_classes, return_inverse=True)

    gh, gw = WORKING_SIZE
    rows, cols = (np.arange(gh), np.arange(gw)) if size is None else (nearest(gh, size[0]), nearest(gw, size[1]))
    segmentation = np.full(WORKING_SIZE, -1, np.float32)
    segments: list[dict[str, Any]] = []
    instance_masks: list[np.ndarray] = []
    if queries.size:
        logits = grid.resize(masks[queries])  # [U, 384, 384]
        inside = logits > 0
        area = inside.sum(axis=(1, 2))
        prob_sum = np.array([_sigmoid(lg[m]).sum(dtype=np.float32) for lg, m in zip(logits, inside)], np.float32)
        mask_score = prob_sum / (area.astype(np.float32) + np.float32(1e-6))
        # a mask that nearest resizing reduces to nothing is dropped, as in HF
        used_rows, used_cols = np.unique(rows), np.unique(cols)
        if used_rows.size == gh and used_cols.size == gw:
            visible = area > 0
        else:
            visible = inside[:, used_rows][:, :, used_cols].any(axis=(1, 2))
        for pair, u in zip(pairs, inverse):
            score = float(flat[pair] * mask_score[u])
            if visible[u] and score >= threshold:
                segmentation[inside[u]] = len(segments)
                label = int(pair % num_classes)
                segment = {"id": len(segments), "label_id": label, "was_fused": False, "score": round(score, 6)}
                segments.append(segment)
                if with_masks:
                    instance_masks.append(inside[u][np.ix_(rows, cols)])
    if size is not None:
        segmentation = segmentation[np.ix_(rows, cols)]
    return segmentation, segments, instance_masks


# -- panoptic ------------------------------------------------------------------------------------------------------


def panoptic_segmentation(
    outputs: Any,
    threshold: float = 0.5,
    mask_threshold: float = 0.5,
    overlap_mask_area_threshold: float = 0.8,
    label_ids_to_fuse: Collection[int] | None = None,
    target_sizes: Sequence[Sequence[int]] | np.ndarray | None = None,
    pixel_mask: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """Per image: ``{"segmentation", "segments_info"}``.

    ``segmentation``: ``[H, W]`` int32 segment ids (0: none), or float32 -1 everywhere when no query passes
    ``threshold``. ``segments_info``: ``{"id", "label_id", "was_fused", "score"}`` per segment, in query order.
    """
    fuse = set() if label_ids_to_fuse is None else set(label_ids_to_fuse)
    results = []
    for classes, masks, size, grid in _per_image(outputs, target_sizes, pixel_mask):
        probs = _softmax(classes)
        scores, labels = probs.max(axis=1), probs.argmax(axis=1)
        keep = np.flatnonzero((labels != probs.shape[1] - 1) & (scores > threshold))
        if keep.size == 0:
            results.append({"segmentation": np.full(size or WORKING_SIZE, -1, np.float32), "segments_info": []})
            continue
        is_segment = _overlap_test(overlap_mask_area_threshold)
        owner, segment = _panoptic_assignment(
            masks[keep], scores[keep], mask_threshold, is_segment, size or WORKING_SIZE, grid
        )
        ids = np.zeros(keep.size, np.int32)
        segments: list[dict[str, Any]] = []
        current, fused_ids = 0, {}
        for k in np.flatnonzero(segment):
            query = keep[k]
            label = int(labels[query])
            current = fused_ids[label] if label in fused_ids else current + 1
            ids[k] = current
            was_fused = label in fuse
            score = round(float(scores[query]), 6)
            segments.append({"id": current, "label_id": label, "was_fused": was_fused, "score": score})
            if was_fused:
                fused_ids[label] = current
        results.append({"segmentation": ids[owner], "segments_info": segments})
    return results


def _overlap_test(overlap_mask_area_threshold: float) -> Callable[[int, int], bool]:
    """HF's segment test on a query's pixel counts: it owns pixels, some reach ``mask_threshold``, and the owned
    ones are more than ``overlap_mask_area_threshold`` of those (the ratio in float32, as torch divides).

    For ``owned > 0`` the test can only turn from true to false as ``reached`` grows: float32 rounding and
    division are monotone.
    """

    def is_segment(owned: int, reached: int) -> bool:
        if not (owned > 0 and reached > 0):
            return False
        return float(np.float32(owned) / np.float32(reached)) > overlap_mask_area_threshold

    return is_segment


def _panoptic_assignment(
    masks: np.ndarray,
    scores: np.ndarray,
    mask_threshold: float,
    is_segment: Callable[[int, int], bool],
    size: _Size,
    grid: _WorkingGrid,
) -> tuple[np.ndarray, np.ndarray]:
    """Owner query of every target pixel ``[H, W]`` (int32), and which queries become segments ``[K]`` (bool).

    ``masks``: ``[K, h, w]`` mask logits of the kept queries, ``scores``: ``[K]``. As in semantic segmentation,
    the first decisions are taken per logit window: the sigmoid of a window's extreme logits, weighted by the
    score, bounds the query's weighted probability at every working-grid pixel that reads the window. A cell
    whose four corners read windows where the same query leads by more than ``_TOL`` belongs to that query
    whole; exact weighted probabilities are computed only at the corners of the other cells (a query's mask
    usually saturates away from its border, so those are few), which decide most of them the same way, and
    they are resampled exactly at the target pixels of the cells left.
    """
    num, (h, w) = len(masks), masks.shape[1:]
    cells = _cells(size)
    low, high = grid.window_range(_sigmoid(masks.copy()))  # [K, h * w]
    low *= scores[:, None]
    high *= scores[:, None]
    best, lead, rival = _leaders(low, high, FLOAT32_MIN)
    sure, lowest = _agreeing_cells(cells, grid, best, lead - rival, _TOL)
    points = cells.corners(~sure)
    weighted = _sigmoid(grid.sample(masks, points))  # [K, n], at the working-grid points
    weighted *= scores[:, None]
    owner = cells.certified_argmax(
        weighted,
        weighted,
        np.arange(num, dtype=np.int32),
        FLOAT32_MIN,
        _TOL,
        lambda at, _: weighted[:, np.searchsorted(points, at)],
        decided=(sure, lowest, points),
        exact=True,
    )

    # HF's segment test needs how many pixels each query owns (exact, from the owner map) and how many reach
    # mask_threshold: bounds from the windows often settle the test; otherwise the count is made exact.
    owned = np.bincount(owner.reshape(-1), minlength=num)
    segment = np.zeros(num, bool)
    owning = np.flatnonzero(owned > 0)
    bounds = cells.count_bounds(
        low[owning].reshape(-1, h, w), high[owning].reshape(-1, h, w), mask_threshold, _TOL, grid.windows
    )
    for i, k in enumerate(owning):

        def settled(lo: int, hi: int, k: int = k) -> bool:
            return hi == 0 or (lo > 0 and is_segment(owned[k], lo) == is_segment(owned[k], hi))

        if bounds is None or not settled(bounds[0][i], bounds[1][i]):  # pixel counts made exact where needed
            reached = cells.count_reaching(
                low[k].reshape(h, w),
                high[k].reshape(h, w),
                scores[k],
                mask_threshold,
                _TOL,
                lambda at, k=k: _sigmoid(grid.sample(masks[k : k + 1], at))[0],
                via=grid.windows,
                settled=settled,
            )
        else:
            reached = (int(bounds[0][i]), int(bounds[1][i]))
        segment[k] = is_segment(int(owned[k]), reached[1])
    return owner, segment
