"""From mask logits to the 384x384 working grid, and bounds per logit window.

:class:`WorkingGrid` maps one image's mask logits ``[Q, h, w]`` onto the working grid (bilinear, optionally
through the crop of the image's padding) and answers questions about that resize without computing it whole:
every working-grid value is a convex combination of a small *window* of logits, so the window's smallest and
largest logit bound it (and, sigmoid being increasing, their sigmoids bound its sigmoid). The post-processes take
their first decisions per window (:func:`agreeing_cells`), and compute exact values only where those do not decide.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from m2f_deploy.processing.postprocess.cells import CellGrid
from m2f_deploy.processing.postprocess.common import WORKING_SIZE, Region, Size, sigmoid
from m2f_deploy.processing.postprocess.resample import (
    Resample1D,
    bilinear,
    bilinear_cropped,
    product,
    resize_in_strips,
    resize_maps,
    sample_maps,
)
from m2f_deploy.processing.postprocess.threads import SERIAL, Workers


class WorkingGrid:
    """Maps one image's mask logits ``[Q, h, w]`` onto the 384x384 working grid.

    With a valid region, the logits are taken to cover the padded input: along each axis with padding they are
    upsampled to it, cropped to the valid region, and that is resized to the working grid (all in one linear map
    per axis, :func:`.resample.bilinear_cropped`).
    """

    def __init__(self, logits_size: Size, region: Region | None):
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

    def mixed_probabilities(self, weights: np.ndarray, logits: np.ndarray, workers: Workers = SERIAL) -> np.ndarray:
        """``weights.T @ sigmoid(resize(logits))``: ``[K, S]``, ``[K, h, w]`` -> ``[S, 384 * 384]``, computed strip by
        strip (see :func:`.resample.resize_in_strips`): the mask probabilities are never held whole."""
        left, width = np.ascontiguousarray(weights.T, np.float32), WORKING_SIZE[1]
        out = np.empty((left.shape[0], WORKING_SIZE[0] * width), np.float32)

        def each(rows: slice, strip: np.ndarray) -> None:
            product(left, sigmoid(strip).reshape(len(strip), -1), out=out[:, rows.start * width : rows.stop * width])

        resize_in_strips(logits, self.rows, self.cols, each, workers)
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


def agreeing_cells(
    cells: CellGrid, grid: WorkingGrid, best: np.ndarray, margin: np.ndarray, tol: float
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
def working_grid(logits_size: Size, region: Region | None) -> WorkingGrid:
    """The (cached) :class:`WorkingGrid` of logits of ``logits_size`` with an optional valid ``region``."""
    return WorkingGrid(logits_size, region)


@lru_cache(maxsize=32)
def cells_to(target: Size) -> CellGrid:
    """The (cached) cells of the bilinear resize from the working grid to ``target``."""
    return CellGrid(WORKING_SIZE, target)
