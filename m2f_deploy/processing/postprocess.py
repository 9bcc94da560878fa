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
* Semantic: a working-grid value is a convex combination of a small window of logits, so the sigmoid of the
  window's smallest and largest logit bound a query's mask probability there. Queries that add little to any
  class anywhere ("minor") and classes that cannot come near the strongest ("weak") enter through such bounds
  only; exact scores are computed at the few pixels where the bounds do not decide. With minor queries (a
  trained model's outputs), the first decision is taken per logit window, from every query's window bounds
  (minor queries: bounds over tiles of windows), and working-grid values of the major queries are computed only
  at the pixels that the undecided target pixels read. Without (e.g. noise), the major queries are resized whole.

Where we differ from HF: results are numpy arrays (HF: torch tensors; same dtypes); values agree with torch to
float32 rounding, so a pixel whose two best scores tie to ~1e-7 may go either way; passing ``pixel_mask`` (from
``preprocess``) crops each image's padding away before the first resize (HF resizes padded logits as they
are, which stretches the padding into the result); NaN or infinite logits are rejected.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping, Sequence
from functools import lru_cache
from typing import Any

import numpy as np

from m2f_deploy.errors import InputError
from m2f_deploy.processing.resize import (
    FLOAT32_MIN,
    CellGrid,
    _leaders,
    Resample1D,
    bilinear,
    bilinear_cropped,
    nearest,
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
# Largest class-score product (multiply-adds) computed without BLAS.
_EINSUM_MAX = 2e8

_Size = tuple[int, int]


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
        if not np.isfinite(array).all():
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
        self.window_of = (self._first_row[:, None] * w + self._first_col[None, :]).reshape(-1)  # [P]

    def window_range(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Smallest and largest logit of every window, ``[K, h * w]`` each (index with ``window_of``).

        A working-grid value lies between the two: it is a convex combination of its window.
        """
        low, high = logits, logits
        for axis, span in ((1, self._row_span), (2, self._col_span)):
            low, high = _spread(low, np.minimum, axis, span), _spread(high, np.maximum, axis, span)
        return low.reshape(len(logits), -1), high.reshape(len(logits), -1)

    def resize(self, logits: np.ndarray) -> np.ndarray:
        """``[K, h, w]`` -> ``[K, 384, 384]``."""
        return resize_maps(logits, self.rows, self.cols)

    def sample(self, logits: np.ndarray, points: np.ndarray) -> np.ndarray:
        """``[K, h, w]`` at flat working-grid indices ``points`` ``[n]`` -> ``[K, n]``."""
        ys, xs = np.divmod(points, WORKING_SIZE[1])
        return sample_maps(logits, self.rows, self.cols, ys, xs)


def _window(taps: Resample1D) -> tuple[np.ndarray, int]:
    """First source sample read by each output sample ``[n_out]``, and the widest span read."""
    first, last = taps.index.min(axis=1), taps.index.max(axis=1)
    return first, int((last - first).max()) + 1


def _spread(values: np.ndarray, op: np.ufunc, axis: int, span: int) -> np.ndarray:
    """``op`` over ``values[i], ..., values[min(i + span - 1, n - 1)]`` along ``axis`` (a new array)."""
    if span <= 1:
        return values
    n = values.shape[axis]
    out = np.empty_like(values)
    index = [slice(None)] * values.ndim

    def at(part: slice) -> tuple:
        index[axis] = part
        return tuple(index)

    op(values[at(slice(0, n - 1))], values[at(slice(1, n))], out=out[at(slice(0, n - 1))])
    out[at(slice(n - 1, n))] = values[at(slice(n - 1, n))]
    for shift in range(2, min(span, n)):
        op(out[at(slice(0, n - shift))], values[at(slice(shift, n))], out=out[at(slice(0, n - shift))])
    return out


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
        yield classes[b], masks[b], sizes[b], _WorkingGrid(masks.shape[2:], regions[b])


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
    sig = _sigmoid(grid.resize(masks)).reshape(len(masks), -1)
    scores = _mix(probs, sig).reshape(-1, *WORKING_SIZE)  # [C, 384, 384]
    if size is not None:
        scores = resize_maps(scores, bilinear(WORKING_SIZE[0], size[0]), bilinear(WORKING_SIZE[1], size[1]))
    return {"segmentation": scores.argmax(axis=0), "segmentation_scores": scores}


def _semantic_labels(probs: np.ndarray, masks: np.ndarray, size: _Size | None, grid: _WorkingGrid) -> np.ndarray:
    num_queries, num_classes = probs.shape
    low, high = grid.window_range(masks)  # [Q, h * w]
    peak = _sigmoid(high.max(axis=1))  # [Q]: no mask probability of a query exceeds this
    reach = probs * peak[:, None]  # [Q, C]: the most a query adds to a class score anywhere
    upper = reach.sum(axis=0)  # [C]: the most a class can score anywhere

    # Minor queries: the longest run of the weakest whose summed reach stays within budget for every class,
    # worth it only when it spares a good share of the queries. Weak classes: far below the strongest.
    weakest_first = np.argsort(reach.sum(axis=1), kind="stable")
    n_minor = int(np.searchsorted(np.cumsum(reach[weakest_first], axis=0).max(axis=1), _BOUND_BUDGET, "right"))
    n_minor = 0 if n_minor < max(1, num_queries // 4) else min(n_minor, num_queries - 1)
    minor, major = np.sort(weakest_first[:n_minor]), np.sort(weakest_first[n_minor:])
    weak = upper < _WEAK_SHARE * upper.max()
    strong = np.flatnonzero(~weak)
    weak_first = np.flatnonzero(weak)[np.argsort(-upper[weak], kind="stable")]
    near, far = weak_first[:_WEAK_WINDOWED], weak_first[_WEAK_WINDOWED:]
    far_cap = upper[far].max(initial=FLOAT32_MIN)
    tol = _TOL * max(1.0, float(upper.max()))
    if not n_minor:  # every query matters somewhere (e.g. noise): window bounds decide little, go exact
        return _semantic_labels_exact(probs, masks, size, grid, strong, near, far_cap, high, tol)

    # 1. Per logit window (every working-grid pixel reads one): bounds on the strong classes' scores from the
    # window's extreme logits (major queries), or from those of a tile of windows (minor queries), and a cap
    # on every weak class.
    h, w = masks.shape[1:]
    starts_r, starts_c = np.arange(0, h, _TILE), np.arange(0, w, _TILE)
    tile_of = ((np.arange(h) // _TILE)[:, None] * starts_c.size + (np.arange(w) // _TILE)[None, :]).reshape(-1)

    def tiled(values: np.ndarray, op: np.ufunc) -> np.ndarray:
        maps = values.reshape(len(values), h, w)
        th, tw = starts_r.size * _TILE, starts_c.size * _TILE
        if (th, tw) != (h, w):
            maps = np.pad(maps, ((0, 0), (0, th - h), (0, tw - w)), mode="edge")
        maps = op.reduce(maps.reshape(len(values), starts_r.size, _TILE, tw), axis=2)
        return op.reduce(maps.reshape(len(values), -1, starts_c.size, _TILE), axis=3).reshape(len(values), -1)

    sig_low, sig_high = _sigmoid(low[major]), _sigmoid(high[major])  # [M, h * w]
    low_w = _mix(probs[np.ix_(major, strong)], sig_low)  # [S, h * w]
    high_w = _mix(probs[np.ix_(major, strong)], sig_high)
    cap_w = _mix(probs[np.ix_(major, near)], sig_high) if near.size else None  # [N, h * w]
    if n_minor:
        tile_low, tile_high = _sigmoid(tiled(low[minor], np.minimum)), _sigmoid(tiled(high[minor], np.maximum))
        low_w += _mix(probs[np.ix_(minor, strong)], tile_low)[:, tile_of]
        high_w += _mix(probs[np.ix_(minor, strong)], tile_high)[:, tile_of]
        if near.size:
            cap_w += _mix(probs[np.ix_(minor, near)], tile_high)[:, tile_of]
    cap_w = np.full(h * w, far_cap, np.float32) if cap_w is None else np.maximum(cap_w.max(axis=0), far_cap)
    best, lead, rival = _leaders(low_w, high_w, cap_w)
    cells = _cells(size or WORKING_SIZE)
    label = best[grid.window_of].reshape(WORKING_SIZE)
    margin = (lead - rival)[grid.window_of].reshape(WORKING_SIZE)
    lowest = cells.reduce(label, np.minimum)
    sure = (lowest == cells.reduce(label, np.maximum)) & (cells.reduce(margin, np.minimum) > tol)
    points = cells.corners(~sure)  # working-grid pixels that the undecided target pixels read

    # 2. At those pixels: exact major queries, the minor ones bounded by their windows' extreme logits; the
    # strongest weak classes are tracked there too, so that only the rest is capped (by a constant).
    tracked = np.union1d(strong, near)
    sig_major = _sigmoid(grid.sample(masks[major], points))  # [M, n]
    lower = _mix(probs[np.ix_(major, tracked)], sig_major)  # [T, n]
    windows, where = np.unique(grid.window_of[points], return_inverse=True)
    weights = probs[np.ix_(minor, tracked)]
    upper_px = lower + _mix(weights, _sigmoid(high[minor][:, windows]))[:, where]
    lower += _mix(weights, _sigmoid(low[minor][:, windows]))[:, where]

    known = {"at": np.empty(0, np.int64), "sig": np.empty((n_minor, 0), np.float32)}  # minor queries sampled

    def scores_at(at: np.ndarray, everything: bool) -> np.ndarray:
        local = np.searchsorted(points, at)
        sig = np.empty((num_queries, at.size), np.float32)
        sig[major] = sig_major[:, local]
        seen = np.minimum(np.searchsorted(known["at"], at), max(known["at"].size - 1, 0))
        if known["at"].size and (known["at"][seen] == at).all():
            sig[minor] = known["sig"][:, seen]
        else:
            sig[minor] = _sigmoid(grid.sample(masks[minor], at))
            known.update(at=at, sig=sig[minor])
        return _mix(probs if everything else probs[:, tracked], sig)

    return cells.certified_argmax(
        lower, upper_px, tracked, far_cap, tol, scores_at, decided=(sure, strong[lowest], points)
    )


def _semantic_labels_exact(
    probs: np.ndarray,
    masks: np.ndarray,
    size: _Size | None,
    grid: _WorkingGrid,
    strong: np.ndarray,
    near: np.ndarray,
    far_cap: float,
    high: np.ndarray,
    tol: float,
) -> np.ndarray:
    """Semantic labels from exact strong-class scores on the whole working grid (no minor queries)."""
    lower = _mix(probs[:, strong], _sigmoid(grid.resize(masks)).reshape(len(masks), -1))  # [S, P]
    cap = FLOAT32_MIN
    if near.size:  # no weak class scores more than its queries' window maxima allow (per window for the
        # strongest few weak classes, anywhere for the rest)
        cap = _mix(probs[:, near], _sigmoid(high.copy())).max(axis=0)
        cap = np.take(np.maximum(cap, far_cap), grid.window_of)

    def scores_at(points: np.ndarray, everything: bool) -> np.ndarray:
        if not everything:
            return lower[:, points]
        return _mix(probs, _sigmoid(grid.sample(masks, points)))

    return _cells(size or WORKING_SIZE).certified_argmax(lower, lower, strong, cap, tol, scores_at)


def _mix(weights: np.ndarray, maps: np.ndarray) -> np.ndarray:
    """``weights.T @ maps``: ``[M, S]``, ``[M, N]`` -> ``[S, N]`` float32.

    Small products go through ``einsum``, which does not wake BLAS' thread pool (see ``resize``); large ones
    are worth it.
    """
    if weights.size * maps.shape[1] <= _EINSUM_MAX:
        return np.einsum("ms,mn->sn", weights, maps)
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
        segmentation, segments, instance_masks = _instance(
            classes, masks, threshold, size, grid, return_binary_maps
        )
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
        owner, owned, reached = _panoptic_assignment(
            _sigmoid(grid.resize(masks[keep])), scores[keep], mask_threshold, size or WORKING_SIZE
        )
        ids = np.zeros(keep.size, np.int32)
        segments: list[dict[str, Any]] = []
        current, fused_ids = 0, {}
        for k, query in enumerate(keep):
            label = int(labels[query])
            if not (owned[k] > 0 and reached[k] > 0):
                continue
            if not float(np.float32(owned[k]) / np.float32(reached[k])) > overlap_mask_area_threshold:
                continue
            current = fused_ids[label] if label in fused_ids else current + 1
            ids[k] = current
            was_fused = label in fuse
            score = round(float(scores[query]), 6)
            segments.append({"id": current, "label_id": label, "was_fused": was_fused, "score": score})
            if was_fused:
                fused_ids[label] = current
        results.append({"segmentation": ids[owner], "segments_info": segments})
    return results


def _panoptic_assignment(
    sig: np.ndarray, scores: np.ndarray, mask_threshold: float, size: _Size
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Owner query of every target pixel ``[H, W]``, pixels owned ``[K]``, pixels reaching ``mask_threshold`` ``[K]``.

    ``sig``: ``[K, 384, 384]`` mask probabilities, ``scores``: ``[K]``.
    """
    num = len(sig)
    weighted = (sig * scores[:, None, None]).reshape(num, -1)  # [K, P]
    cells = _cells(size)
    owner = cells.certified_argmax(
        weighted, weighted, np.arange(num), FLOAT32_MIN, _TOL, lambda points, _: weighted[:, points]
    )
    owned = np.bincount(owner.reshape(-1), minlength=num)
    # a query that owns no pixel is no segment whatever it reaches: count only for the others
    reached = np.zeros(num, np.int64)
    owning = np.flatnonzero(owned > 0)
    reached[owning] = cells.count_at_least(sig[owning], scores[owning], mask_threshold, _TOL)
    return owner, owned, reached
