"""Resampling that equals torch's ``interpolate`` (bilinear with ``align_corners=False``, and nearest), in numpy.

Bilinear resampling is separable: one 1-D linear map per axis (:class:`Resample1D`, cached by shape) with a few
taps per output sample. Tap positions and weights are computed exactly as torch computes them in float32, so
results agree with torch to float32 rounding (torch fuses multiply-adds, numpy does not: about 1e-7
relative). Maps are resized tap by tap rather than with matrix products: as fast as a single-threaded BLAS
product, and it does not wake BLAS' thread pool, whose busy-waiting workers slow down everything that follows
on a small machine (on 2 cores, numpy code after a multi-threaded product runs about half as fast).

:class:`CellGrid` describes how a bilinear upsampling reads its source: every target pixel is a convex
combination of one 2x2 *cell* of source pixels, and many target pixels share a cell. Post-processing uses it to
decide an argmax or a threshold once per cell when all four corners agree by a margin (a convex combination
then provably agrees too) and to compute exact values only for the target pixels of the cells that do not.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Callable

import numpy as np

# Target pixels resolved per batch when exact values are needed (bounds the memory of the [C, P, 4] gathers).
_CHUNK = 1 << 14
# Elements per [K, P, 4] gather when bounding the channels that lead none of a pixel's corners.
_EXCLUSION_BUDGET = 1 << 22
# sample_maps gathers pixels' taps directly unless resampling their rows whole reads this many times fewer values.
_DIRECT_SHARE = 0.25
FLOAT32_MIN = float(np.finfo(np.float32).min)


@dataclass(frozen=True, eq=False)
class Resample1D:
    """A linear map from ``n_in`` samples to ``n_out``: ``out[i] = sum_t weights[i, t] * x[index[i, t]]``.

    ``index``: ``[n_out, T]`` int64, ``weights``: ``[n_out, T]`` float32 (unused taps have weight 0).
    """

    index: np.ndarray
    weights: np.ndarray
    n_in: int

    @property
    def n_out(self) -> int:
        return self.index.shape[0]

    @cached_property
    def matrix(self) -> np.ndarray:
        """The map as a dense ``[n_out, n_in]`` float32 matrix."""
        dense = np.zeros((self.n_out, self.n_in), np.float32)
        np.add.at(dense, (np.arange(self.n_out)[:, None], self.index), self.weights)
        return dense

    @classmethod
    def from_matrix(cls, dense: np.ndarray) -> Resample1D:
        """The sparse taps of a dense ``[n_out, n_in]`` map."""
        taps = max(1, int((dense != 0).sum(axis=1).max()))
        # Stable sort of "is zero" puts each row's nonzero columns first, in column order; rows with fewer
        # nonzeros repeat their first column with weight 0.
        order = np.argsort(dense == 0, axis=1, kind="stable")[:, :taps]
        weights = np.take_along_axis(dense, order, axis=1).astype(np.float32)
        return cls(np.where(weights != 0, order, order[:, :1]).astype(np.int64), weights, dense.shape[1])


@lru_cache(maxsize=64)
def bilinear(n_in: int, n_out: int) -> Resample1D:
    """torch's bilinear taps along one axis (``align_corners=False``, no antialiasing), two per output sample."""
    scale = np.float32(n_in) / np.float32(n_out)
    # torch evaluates scale * (i + 0.5) - 0.5 with one rounding (a fused multiply-add): exact in float64, then
    # rounded once to float32.
    src = (np.float64(scale) * (np.arange(n_out, dtype=np.float64) + 0.5) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0))
    i0 = src.astype(np.int64)
    w1 = src - i0.astype(np.float32)
    i1 = np.minimum(i0 + 1, n_in - 1)
    index = np.stack([i0, i1], axis=1)
    weights = np.stack([np.float32(1) - w1, w1], axis=1).astype(np.float32)
    return Resample1D(index, weights, n_in)


@lru_cache(maxsize=64)
def bilinear_cropped(n_in: int, n_padded: int, n_valid: int, n_out: int) -> Resample1D:
    """Upsample ``n_in`` samples to ``n_padded``, keep the first ``n_valid`` and resample those to ``n_out``.

    This is how logits computed on a padded input are mapped back to the image that the padding surrounds.
    """
    if n_valid == n_padded:
        return bilinear(n_in, n_out)
    upsampled = bilinear(n_in, n_padded).matrix[:n_valid]
    return Resample1D.from_matrix(bilinear(n_valid, n_out).matrix @ upsampled)


@lru_cache(maxsize=64)
def nearest(n_in: int, n_out: int) -> np.ndarray:
    """torch's nearest-neighbour source index for each of ``n_out`` samples: ``[n_out]`` int64."""
    scale = np.float32(n_in) / np.float32(n_out)
    src = np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(src, n_in - 1)


def resize_maps(maps: np.ndarray, rows: Resample1D, cols: Resample1D) -> np.ndarray:
    """Resample a stack of maps ``[N, h, w]`` to ``[N, rows.n_out, cols.n_out]`` float32.

    Gathers along the last axis are the slow ones, so the column pass goes first unless the row pass shrinks
    the maps.
    """
    maps = np.asarray(maps, dtype=np.float32)
    if rows.n_out >= rows.n_in:
        return _along(_along(maps, cols, axis=2), rows, axis=1)
    return _along(_along(maps, rows, axis=1), cols, axis=2)


def _along(values: np.ndarray, taps: Resample1D, axis: int) -> np.ndarray:
    out = np.take(values, taps.index[:, 0], axis=axis)
    shape = [1] * values.ndim
    shape[axis] = taps.n_out
    out *= taps.weights[:, 0].reshape(shape)
    for t in range(1, taps.index.shape[1]):
        term = np.take(values, taps.index[:, t], axis=axis)
        term *= taps.weights[:, t].reshape(shape)
        out += term
    return out


def sample_maps(
    maps: np.ndarray, rows: Resample1D, cols: Resample1D, ys: np.ndarray, xs: np.ndarray
) -> np.ndarray:
    """Values of ``resize_maps(maps, rows, cols)`` at pixels ``(ys[p], xs[p])`` only: ``[N, P]`` float32.

    Either the rows that the pixels lie on are resampled whole (contiguous gathers) and then each pixel's
    columns, or, when the pixels are few for their rows, each pixel's taps are gathered directly.
    """
    maps = np.asarray(maps, dtype=np.float32)
    needed, row_of = np.unique(ys, return_inverse=True)
    taps = rows.index.shape[1] * cols.index.shape[1]
    if needed.size * maps.shape[2] > _DIRECT_SHARE * taps * ys.size:  # gather each pixel's taps (flat takes)
        flat = maps.reshape(len(maps), -1)
        out = None
        for t in range(rows.index.shape[1]):
            base = rows.index[ys, t] * maps.shape[2]
            line = np.take(flat, base + cols.index[xs, 0], axis=1)
            line *= cols.weights[xs, 0]
            for u in range(1, cols.index.shape[1]):
                term = np.take(flat, base + cols.index[xs, u], axis=1)
                term *= cols.weights[xs, u]
                line += term
            line *= rows.weights[ys, t]
            out = line if out is None else np.add(out, line, out=out)
        return out
    lines = _along(maps, Resample1D(rows.index[needed], rows.weights[needed], rows.n_in), axis=1)  # [N, R, w]
    flat = lines.reshape(len(lines), -1)
    base = row_of * lines.shape[2]
    out = np.take(flat, base + cols.index[xs, 0], axis=1) * cols.weights[xs, 0]
    for t in range(1, cols.index.shape[1]):
        out += np.take(flat, base + cols.index[xs, t], axis=1) * cols.weights[xs, t]
    return out


def _leaders(
    lower: np.ndarray, upper: np.ndarray, cap: float | np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per column of ``[K, n]`` bounds: the channel with the highest ``lower`` (the first on ties), its ``lower``,
    and the highest ``upper`` of the other channels (at least ``cap``); each ``[n]``.

    Row by row, because reductions across rows are much faster than ``argmax(axis=0)``.
    """
    best = np.zeros(lower.shape[1], np.int64)
    lead = lower[0].copy()
    rival = np.broadcast_to(np.asarray(cap, np.float32), lead.shape).copy()
    if upper is lower:  # one pass: the runner-up is the second highest
        for k in range(1, lower.shape[0]):
            ahead = lower[k] > lead
            best[ahead] = k
            np.maximum(rival, np.where(ahead, lead, lower[k]), out=rival)
            np.maximum(lead, lower[k], out=lead)
        return best, lead, rival
    for k in range(1, lower.shape[0]):
        ahead = lower[k] > lead
        best[ahead] = k
        np.maximum(lead, lower[k], out=lead)
    for k in range(upper.shape[0]):
        np.maximum(rival, np.where(best == k, FLOAT32_MIN, upper[k]), out=rival)
    return best, lead, rival


def _resampled_leader(
    corners: np.ndarray, weights: np.ndarray, scores_at: Callable[[np.ndarray], np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Leading channel and its score ``[P]`` once scores are resampled from ``corners`` with ``weights`` ``[P, 4]``."""
    points, where = np.unique(corners, return_inverse=True)
    scores = scores_at(points)[:, where.reshape(-1, 4)]  # [C, P, 4]
    resampled = np.einsum("pc,kpc->kp", weights, scores, dtype=np.float32)
    best, lead, _ = _leaders(resampled, resampled, FLOAT32_MIN)
    return best, lead


@dataclass(frozen=True, eq=False)
class _AxisCells:
    """Target samples of one axis grouped by the pair of source samples they read.

    ``cell_of``: ``[n_out]`` cell of each target sample; ``lo``/``hi``: ``[n_cells]`` its two source samples (equal
    when no target sample of the cell gives the second one any weight); ``start``/``count``: ``[n_cells]`` the
    contiguous run of target samples in the cell.
    """

    cell_of: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    start: np.ndarray
    count: np.ndarray

    def reading(self, samples: np.ndarray) -> slice:
        """The range of cells with a corner among ``samples`` (sorted source indices)."""
        first = int(np.searchsorted(self.hi, samples[0]))  # cells are ordered: lo and hi never decrease
        last = int(np.searchsorted(self.lo, samples[-1], side="right"))
        return slice(first, max(first, last))

    @classmethod
    def of(cls, taps: Resample1D) -> _AxisCells:
        i0, i1 = taps.index[:, 0], taps.index[:, 1]
        lo, start, cell_of, count = np.unique(i0, return_index=True, return_inverse=True, return_counts=True)
        reads_second = np.bincount(cell_of, weights=taps.weights[:, 1] > 0, minlength=lo.size) > 0
        hi = np.where(reads_second, i1[start], lo)
        return cls(cell_of, lo, hi, start, count)


class CellGrid:
    """The 2x2 source cells that torch's bilinear resize from ``src`` ``(h, w)`` to ``dst`` ``(H, W)`` reads.

    Cells are indexed ``[n_row_cells, n_col_cells]``; upsampling has at most ``h * w`` of them, downsampling
    one per target pixel.
    """

    def __init__(self, src: tuple[int, int], dst: tuple[int, int]):
        self.src = (int(src[0]), int(src[1]))
        self.dst = (int(dst[0]), int(dst[1]))
        self.rows = bilinear(self.src[0], self.dst[0])
        self.cols = bilinear(self.src[1], self.dst[1])
        self._r = _AxisCells.of(self.rows)
        self._c = _AxisCells.of(self.cols)

    def reduce(
        self, values: np.ndarray, op: np.ufunc, rows: slice = slice(None), cols: slice = slice(None)
    ) -> np.ndarray:
        """Combine ``values`` ``[..., h, w]`` over the four corners of every cell with ``op`` (e.g. ``np.minimum``).

        Returns ``[..., n_row_cells, n_col_cells]``, or the cells ``[rows, cols]`` only.
        """
        r, c = self._r, self._c
        per_row = op(np.take(values, r.lo[rows], axis=-2), np.take(values, r.hi[rows], axis=-2))
        return op(np.take(per_row, c.lo[cols], axis=-1), np.take(per_row, c.hi[cols], axis=-1))

    def expand(self, table: np.ndarray) -> np.ndarray:
        """Per-cell values ``[n_row_cells, n_col_cells]`` copied to every target pixel: ``[H, W]``."""
        return table[np.ix_(self._r.cell_of, self._c.cell_of)]

    def count(self, cells: np.ndarray, rows: slice = slice(None), cols: slice = slice(None)) -> int:
        """Number of target pixels in the selected cells of ``cells`` (bool, all cells or ``[rows, cols]``)."""
        per_row = cells @ self._c.count[cols]  # bool @ int -> int
        return int(per_row @ self._r.count[rows])

    def pixels(
        self, cells: np.ndarray, rows: slice = slice(None), cols: slice = slice(None)
    ) -> tuple[np.ndarray, np.ndarray]:
        """Target pixel coordinates ``(ys, xs)`` ``[P]`` of all pixels in the selected cells (bool, all cells or
        ``[rows, cols]``)."""
        r_sel, c_sel = np.nonzero(cells)
        starts_r, starts_c = self._r.start[rows][r_sel], self._c.start[cols][c_sel]
        heights, widths = self._r.count[rows][r_sel], self._c.count[cols][c_sel]
        sizes = heights * widths
        owner = np.repeat(np.arange(r_sel.size), sizes)
        offset = np.arange(int(sizes.sum())) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        return starts_r[owner] + offset // widths[owner], starts_c[owner] + offset % widths[owner]

    def corners(self, cells: np.ndarray) -> np.ndarray:
        """Flat source indices ``[n]`` (ascending, unique) of the corners of the selected cells (bool, all cells)."""
        r_sel, c_sel = np.nonzero(cells)
        # every tap a cell's target pixels read, weighted or not (the second tap may carry weight 0)
        rows = np.stack([self._r.lo[r_sel], self.rows.index[self._r.start[r_sel], 1]])[:, None, :]
        cols = np.stack([self._c.lo[c_sel], self.cols.index[self._c.start[c_sel], 1]])[None, :, :]
        marked = np.zeros(self.src[0] * self.src[1], bool)
        marked[(rows * self.src[1] + cols).reshape(-1)] = True
        return np.flatnonzero(marked)

    def cells_reading(self, rows: np.ndarray, cols: np.ndarray) -> tuple[slice, slice]:
        """The (contiguous) ranges of row and column cells that read any of the source ``rows`` / ``cols``."""
        return self._r.reading(rows), self._c.reading(cols)

    def sample(self, maps: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        """Resized values of ``maps`` ``[N, h, w]`` at target pixels ``(ys, xs)``: ``[N, P]``."""
        return sample_maps(maps, self.rows, self.cols, ys, xs)

    def certified_argmax(
        self,
        lower: np.ndarray,
        upper: np.ndarray,
        channels: np.ndarray,
        cap: float | np.ndarray,
        tol: float,
        scores_at: Callable[[np.ndarray, bool], np.ndarray],
        decided: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    ) -> np.ndarray:
        """Argmax over channels of the resized scores, at every target pixel: ``[H, W]`` int64 channel ids.

        At each source pixel the scores of the tracked channels ``channels`` ``[K]`` (ascending ids) lie within
        ``lower`` and ``upper`` (``[K, h * w]``, possibly the same array); every other channel scores at most
        ``cap`` (scalar or ``[h * w]``). ``scores_at(flat_source_indices [n], everything)`` returns exact scores:
        ``[K, n]`` of the tracked channels, or ``[C, n]`` of all channels (ids ``0..C-1``) with ``everything``.
        Ties go to the lowest id, as in torch.

        1. A cell whose four corners have the same leader, each ahead of all others' upper bounds by more than
           ``tol``, has that leader at all its target pixels: a convex combination keeps the lead.
        2. Elsewhere, the bounds of the (at most four) corner leaders are resampled, and so is a bound on all
           other channels. A leader ahead of everything by more than ``tol`` wins.
        3. The pixels left are resampled exactly over the tracked channels; where the best of them is not ahead
           of the resampled ``cap``, over all channels.

        With ``decided`` = ``(sure, labels, points)``, step 1 was done by the caller: ``sure`` ``[n_row_cells,
        n_col_cells]`` bool, ``labels`` the channel id of each sure cell, and ``lower``, ``upper`` (and an array
        ``cap``) hold only the source pixels ``points`` ``[n]`` (ascending flat indices), which must include every
        corner of the cells that are not sure; ``scores_at`` still receives flat source indices.
        """
        column = None
        if decided is None:
            best, lead, rival = _leaders(lower, upper, cap)
            label, margin = best.reshape(self.src), (lead - rival).reshape(self.src)
            lowest, highest = self.reduce(label, np.minimum), self.reduce(label, np.maximum)
            sure = (lowest == highest) & (self.reduce(margin, np.minimum) > tol)
            out = self.expand(np.where(sure, channels[lowest], -1).astype(np.int64))
        else:
            sure, labels, points = decided
            best, lead, rival = _leaders(lower, upper, cap)
            column = np.full(self.src[0] * self.src[1], -1, np.int64)
            column[points] = np.arange(points.size)
            # step 1 again for the cells left, now with the bounds at their corners
            r_sel, c_sel = np.nonzero(~sure)
            rows = np.stack([self._r.lo[r_sel], self._r.hi[r_sel]])[:, None, :]
            cols = np.stack([self._c.lo[c_sel], self._c.hi[c_sel]])[None, :, :]
            at = column[(rows * self.src[1] + cols).reshape(4, -1)]  # [4, cells]
            label, margin = best[at], (lead - rival)[at]
            now = (label.min(axis=0) == label.max(axis=0)) & (margin.min(axis=0) > tol)
            sure, labels = sure.copy(), np.array(labels, np.int64)
            sure[r_sel[now], c_sel[now]] = True
            labels[r_sel[now], c_sel[now]] = channels[label[0, now]]
            out = self.expand(np.where(sure, labels, -1).astype(np.int64))
            inner = scores_at
            scores_at = lambda p, everything: inner(points[p], everything)  # noqa: E731
        ys, xs = self.pixels(~sure)
        for start in range(0, ys.size, _CHUNK):
            y, x = ys[start : start + _CHUNK], xs[start : start + _CHUNK]
            corners = self.rows.index[y][:, :, None] * self.src[1] + self.cols.index[x][:, None, :]
            if column is not None:
                corners = column[corners]
            weights = self.rows.weights[y][:, :, None] * self.cols.weights[x][:, None, :]
            corners, weights = corners.reshape(-1, 4), weights.reshape(-1, 4)  # [P, 4] source pixels of each
            leaders = best[corners]  # [P, 4]
            picked = (leaders[:, None, :], corners[:, :, None])  # leader s at corner c: [P, c, s]
            low = np.einsum("pc,pcs->ps", weights, lower[picked], dtype=np.float32)
            high = low if upper is lower else np.einsum("pc,pcs->ps", weights, upper[picked], dtype=np.float32)
            winner = leaders[np.arange(y.size), low.argmax(axis=1)]
            ahead = low.max(axis=1) - tol
            others = np.where(leaders == winner[:, None], FLOAT32_MIN, high).max(axis=1)
            unsure = np.flatnonzero(ahead <= np.maximum(others, (weights * rival[corners]).sum(axis=1)))
            if unsure.size:  # the runner-up bound may be a leader elsewhere: bound the non-leaders exactly
                excluded = self._others_bound(upper, cap, corners[unsure], weights[unsure], leaders[unsure])
                unsure = unsure[ahead[unsure] <= np.maximum(others[unsure], excluded)]
            result = channels[winner]
            if unsure.size:
                result[unsure] = self._exact_argmax(
                    corners[unsure], weights[unsure], channels, cap, tol, scores_at
                )
            out[y, x] = result
        return out

    @staticmethod
    def _exact_argmax(
        corners: np.ndarray,
        weights: np.ndarray,
        channels: np.ndarray,
        cap: float | np.ndarray,
        tol: float,
        scores_at: Callable[[np.ndarray, bool], np.ndarray],
    ) -> np.ndarray:
        """Channel ids ``[P]`` at target pixels with source ``corners`` / ``weights`` ``[P, 4]``, from exact scores."""
        best, lead = _resampled_leader(corners, weights, lambda points: scores_at(points, False))
        result = channels[best]
        if not np.isscalar(cap) or cap > FLOAT32_MIN:
            bound = (weights * (cap if np.isscalar(cap) else cap[corners])).sum(axis=1)
            open_ = np.flatnonzero(lead <= bound + tol)  # a channel outside the tracked ones may win here
            if open_.size:
                result[open_] = _resampled_leader(corners[open_], weights[open_], lambda p: scores_at(p, True))[0]
        return result

    @staticmethod
    def _others_bound(
        upper: np.ndarray, cap: float | np.ndarray, corners: np.ndarray, weights: np.ndarray, leaders: np.ndarray
    ) -> np.ndarray:
        """Per target pixel ``[P]``: a resampled upper bound on every channel that leads none of its corners.

        Over ``[K, P, 4]`` gathers, in chunks of about ``_EXCLUSION_BUDGET`` elements.
        """
        out = np.empty(len(corners), np.float32)
        step = max(1, _EXCLUSION_BUDGET // (4 * upper.shape[0]))
        for start in range(0, len(corners), step):
            part = slice(start, start + step)
            column = upper[:, corners[part]]  # [K, p, 4]
            pixels = np.arange(column.shape[1])[:, None]
            for s in range(leaders.shape[1]):
                column[leaders[part, s, None], pixels, np.arange(4)] = FLOAT32_MIN
            bound = column.max(axis=0)
            bound = np.maximum(bound, cap if np.isscalar(cap) else cap[corners[part]])  # [p, 4]
            out[part] = (weights[part] * bound).sum(axis=1)
        return out

    def count_at_least(self, maps: np.ndarray, scale: np.ndarray, threshold: float, tol: float) -> np.ndarray:
        """For each map ``k``: the number of target pixels where ``resized(maps[k]) * scale[k] >= threshold``.

        ``maps`` ``[K, h, w]``, ``scale`` ``[K]`` (positive); returns ``[K]`` int64. Only cells that read a source
        pixel within ``tol`` of the threshold or above are visited; those whose corners are all above
        ``threshold + tol`` count whole, and only the target pixels of cells with corners on both sides are
        resampled.
        """
        counts = np.zeros(len(maps), np.int64)
        for k, (values, factor) in enumerate(zip(maps, scale)):
            scaled = values * factor
            reachable = scaled >= threshold - tol
            rows, cols = np.flatnonzero(reachable.any(axis=1)), np.flatnonzero(reachable.any(axis=0))
            if rows.size == 0:
                continue
            r, c = self.cells_reading(rows, cols)
            above = self.reduce(scaled >= threshold + tol, np.logical_and, r, c)
            unsure = self.reduce(reachable, np.logical_or, r, c) & ~above
            counts[k] = self.count(above, r, c)
            if unsure.any():
                ys, xs = self.pixels(unsure, r, c)
                counts[k] += int(np.count_nonzero(self.sample(maps[k : k + 1], ys, xs)[0] * factor >= threshold))
        return counts
