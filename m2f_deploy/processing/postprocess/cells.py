"""The cell-grid engine: certified argmax and threshold counts of a bilinear upsampling, without computing it.

:class:`CellGrid` describes how a bilinear resize (torch's, ``align_corners=False``) reads its source: every target
pixel is a convex combination of one 2x2 *cell* of source pixels, and many target pixels share a cell. The
post-processes use it to decide an argmax or a threshold once per cell when all four corners agree by a margin (a
convex combination then provably agrees too), and to compute exact values only for the target pixels of the cells
that do not. :func:`leaders` is the per-column leader and runner-up that every such decision starts from.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

import numpy as np

from m2f_deploy.processing.postprocess.common import FLOAT32_MIN
from m2f_deploy.processing.postprocess.resample import Resample1D, bilinear, sample_maps
from m2f_deploy.processing.postprocess.threads import SERIAL, Workers

TOL = 1e-4
"""Decisions taken from bounds need a lead larger than the rounding differences to torch (relative to the scale of
the scores); smaller leads are resolved with exact values."""

# Target pixels resolved per batch when exact values are needed (bounds the memory of the [C, P, 4] gathers).
_CHUNK = 1 << 14
# Elements per [K, P, 4] gather when bounding the channels that lead none of a pixel's corners.
_EXCLUSION_BUDGET = 1 << 22


def leaders(
    lower: np.ndarray, upper: np.ndarray, cap: float | np.ndarray, workers: Workers = SERIAL
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per column of ``[K, n]`` bounds: the channel with the highest ``lower`` (the first on ties), its ``lower``,
    and the highest ``upper`` of the other channels (at least ``cap``); each ``[n]``.

    Row by row, because reductions across rows are much faster than ``argmax(axis=0)``; large bounds in shares of
    columns, on ``workers``' threads.
    """
    n = lower.shape[1]
    best, lead = np.zeros(n, np.int64), np.empty(n, lower.dtype)
    rival = np.broadcast_to(np.asarray(cap, np.float32), (n,)).copy()

    def share(part: slice) -> None:
        low = lower[:, part]
        _leaders_into(low, low if upper is lower else upper[:, part], best[part], lead[part], rival[part])

    workers.run([partial(share, part) for part in workers.shares(n, lower.size)])
    return best, lead, rival


def _leaders_into(lower: np.ndarray, upper: np.ndarray, best: np.ndarray, lead: np.ndarray, rival: np.ndarray) -> None:
    """:func:`leaders` into ``best`` (zeros), ``lead`` and ``rival`` (holding the cap)."""
    lead[...] = lower[0]
    if upper is lower:  # one pass: the runner-up is the second highest
        ahead, other = np.empty(lead.shape, bool), np.empty_like(lead)
        for k in range(1, lower.shape[0]):
            np.greater(lower[k], lead, out=ahead)
            np.copyto(best, k, where=ahead)
            np.maximum(rival, np.minimum(lead, lower[k], out=other), out=rival)  # the lesser is a runner-up
            np.maximum(lead, lower[k], out=lead)
        return
    ahead = np.empty(lead.shape, bool)
    for k in range(1, lower.shape[0]):
        np.greater(lower[k], lead, out=ahead)
        np.copyto(best, k, where=ahead)
        np.maximum(lead, lower[k], out=lead)
    for k in range(upper.shape[0]):
        np.maximum(rival, np.where(best == k, FLOAT32_MIN, upper[k]), out=rival)


def _resampled_leader(
    corners: np.ndarray, weights: np.ndarray, scores_at: Callable[[np.ndarray], np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Leading channel and its score ``[P]`` once scores are resampled from ``corners`` with ``weights`` ``[P, 4]``."""
    points, where = np.unique(corners, return_inverse=True)
    return _corner_leader(scores_at(points), where.reshape(-1, 4), weights)


def _nonzero(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.nonzero`` of a 2-D bool array (through the flat indices: several times faster)."""
    return np.divmod(np.flatnonzero(mask), mask.shape[1])


def _corner_leader(scores: np.ndarray, corners: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Leading channel and its score ``[P]`` at pixels whose corners are the columns ``corners`` ``[P, 4]`` of
    ``scores`` ``[C, n]``, resampled with ``weights`` ``[P, 4]``."""
    corners, weights = corners.T.copy(), weights.T.copy()  # one contiguous row per corner
    resampled = np.take(scores, corners[0], axis=1)
    resampled *= weights[0]
    for c in range(1, len(corners)):
        term = np.take(scores, corners[c], axis=1)
        term *= weights[c]
        resampled += term
    best, lead, _ = leaders(resampled, resampled, FLOAT32_MIN)
    return best, lead


@dataclass(frozen=True, eq=False)
class _AxisCells:
    """Target samples of one axis grouped by the pair of source samples they read.

    ``cell_of``: ``[n_out]`` cell of each target sample; ``lo``/``hi``: ``[n_cells]`` its two source samples (equal
    when no target sample of the cell gives the second one any weight); ``start``/``count``: ``[n_cells]`` the
    contiguous run of target samples in the cell; ``second``: ``[n_cells]`` the second source sample they read,
    weighted or not.
    """

    cell_of: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    start: np.ndarray
    count: np.ndarray
    second: np.ndarray

    def through(self, index_map: np.ndarray) -> _AxisCells:
        """The same cells with their source samples mapped through ``index_map`` (non-decreasing)."""
        return replace(self, lo=index_map[self.lo], hi=index_map[self.hi], second=index_map[self.second])

    def adjacent_counts(self, n: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Target samples per source sample ``a`` ``[n]`` each: in cells reading ``a`` only, and in cells reading
        ``a`` and ``a + 1``; None if some cell reads two samples further apart."""
        gap = self.hi - self.lo
        if gap.size and (gap.min() < 0 or gap.max() > 1):
            return None
        single = np.bincount(self.lo[gap == 0], weights=self.count[gap == 0], minlength=n)
        pair = np.bincount(self.lo[gap == 1], weights=self.count[gap == 1], minlength=n)
        return single.astype(np.float32), pair.astype(np.float32)

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
        return cls(cell_of, lo, hi, start, count, i1[start])


class CellGrid:
    """The 2x2 source cells that torch's bilinear resize from ``src`` ``(h, w)`` to ``dst`` ``(H, W)`` reads.

    Cells are indexed ``[n_row_cells, n_col_cells]``; upsampling has at most ``h * w`` of them, downsampling
    one per target pixel.

    Methods taking ``via = (row_of, col_of)`` read their values from a coarser grid instead, whose row ``row_of[i]``
    and column ``col_of[j]`` stand for source pixel ``(i, j)`` (both non-decreasing): e.g. bounds per logit window,
    where ``row_of`` is the window each source row reads. A cell then combines the coarse pixels of its corners.
    """

    def __init__(self, src: tuple[int, int], dst: tuple[int, int]):
        self.src = (int(src[0]), int(src[1]))
        self.dst = (int(dst[0]), int(dst[1]))
        self.rows = bilinear(self.src[0], self.dst[0])
        self.cols = bilinear(self.src[1], self.dst[1])
        self._r = _AxisCells.of(self.rows)
        self._c = _AxisCells.of(self.cols)
        self._through: dict[int, tuple] = {}  # mapped axes per ``via`` (see reduce)

    def reduce(
        self,
        values: np.ndarray,
        op: np.ufunc,
        rows: slice = slice(None),
        cols: slice = slice(None),
        via: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> np.ndarray:
        """Combine ``values`` ``[..., h, w]`` over the four corners of every cell with ``op`` (e.g. ``np.minimum``).

        Returns ``[..., n_row_cells, n_col_cells]``, or the cells ``[rows, cols]`` only.
        """
        r, c = self._axes(via)
        per_row = op(np.take(values, r.lo[rows], axis=-2), np.take(values, r.hi[rows], axis=-2))
        return op(np.take(per_row, c.lo[cols], axis=-1), np.take(per_row, c.hi[cols], axis=-1))

    def _axes(self, via: tuple[np.ndarray, np.ndarray] | None) -> tuple[_AxisCells, _AxisCells]:
        if via is None:
            return self._r, self._c
        return self._through_via(via)[1:]

    def _through_via(self, via: tuple[np.ndarray, np.ndarray]) -> tuple[tuple, _AxisCells, _AxisCells]:
        cached = self._through.get(id(via))
        if cached is None or cached[0] is not via:  # the cache holds ``via`` itself: its id stays its own
            cached = (via, self._r.through(via[0]), self._c.through(via[1]))
            if len(self._through) >= 8:
                self._through.clear()
            self._through[id(via)] = cached
        return cached

    def expand(self, table: np.ndarray) -> np.ndarray:
        """Per-cell values ``[n_row_cells, n_col_cells]`` copied to every target pixel: ``[H, W]``."""
        return table.take(self._r.cell_of, axis=0).take(self._c.cell_of, axis=1)  # faster than np.ix_

    def count(self, cells: np.ndarray, rows: slice = slice(None), cols: slice = slice(None)) -> int:
        """Number of target pixels in the selected cells of ``cells`` (bool, all cells or ``[rows, cols]``)."""
        per_row = cells @ self._c.count[cols]  # bool @ int -> int
        return int(per_row @ self._r.count[rows])

    def pixels(
        self, cells: np.ndarray, rows: slice = slice(None), cols: slice = slice(None)
    ) -> tuple[np.ndarray, np.ndarray]:
        """Target pixel coordinates ``(ys, xs)`` ``[P]`` of all pixels in the selected cells (bool, all cells or
        ``[rows, cols]``)."""
        r_sel, c_sel = _nonzero(cells)
        starts_r, starts_c = self._r.start[rows][r_sel], self._c.start[cols][c_sel]
        heights, widths = self._r.count[rows][r_sel], self._c.count[cols][c_sel]
        sizes = heights * widths
        owner = np.repeat(np.arange(r_sel.size), sizes)
        offset = np.arange(int(sizes.sum())) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        return starts_r[owner] + offset // widths[owner], starts_c[owner] + offset % widths[owner]

    def corners(self, cells: np.ndarray, rows: slice = slice(None), cols: slice = slice(None)) -> np.ndarray:
        """Flat source indices ``[n]`` (ascending, unique) of the corners of the selected cells (bool, all cells or
        ``[rows, cols]``)."""
        r_sel, c_sel = _nonzero(cells)
        r_sel, c_sel = r_sel + (rows.start or 0), c_sel + (cols.start or 0)
        # every tap a cell's target pixels read, weighted or not (the second tap may carry weight 0)
        src_rows = np.stack([self._r.lo[r_sel], self._r.second[r_sel]])[:, None, :]
        src_cols = np.stack([self._c.lo[c_sel], self._c.second[c_sel]])[None, :, :]
        marked = np.zeros(self.src[0] * self.src[1], bool)
        marked[(src_rows * self.src[1] + src_cols).reshape(-1)] = True
        return np.flatnonzero(marked)

    def cells_reading(
        self, rows: np.ndarray, cols: np.ndarray, via: tuple[np.ndarray, np.ndarray] | None = None
    ) -> tuple[slice, slice]:
        """The (contiguous) ranges of row and column cells that read any of the source ``rows`` / ``cols``."""
        r, c = self._axes(via)
        return r.reading(rows), c.reading(cols)

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
        exact: bool = False,
        workers: Workers = SERIAL,
    ) -> np.ndarray:
        """Argmax over channels of the resized scores, at every target pixel: ``[H, W]`` channel ids (of the dtype
        of ``channels``).

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

        With ``exact``, ``lower`` (``upper`` the same array) holds the exact scores of all channels (no ``cap``):
        step 2 is skipped, and step 3 resamples them at every pixel left, the same way as ``scores_at`` would.
        ``workers``: threads for the leaders of large bounds (see :mod:`.threads`).
        """
        column = None
        if decided is None:
            best, lead, rival = leaders(lower, upper, cap, workers)
            label, margin = best.reshape(self.src), (lead - rival).reshape(self.src)
            lowest, highest = self.reduce(label, np.minimum), self.reduce(label, np.maximum)
            sure = (lowest == highest) & (self.reduce(margin, np.minimum) > tol)
            out = self.expand(np.where(sure, channels[lowest], -1).astype(channels.dtype))
        else:
            best, lead, rival = leaders(lower, upper, cap, workers)
            points = decided[2]
            column = np.full(self.src[0] * self.src[1], -1, np.int32)  # position of each point in points
            column[points] = np.arange(points.size)
            sure, labels = self._settle(best, lead - rival, channels, tol, decided, column)
            out = self.expand(np.where(sure, labels, -1))
            inner = scores_at
            scores_at = lambda p, everything: inner(points[p], everything)
        ys, xs = self.pixels(~sure)
        for start in range(0, ys.size, _CHUNK):
            y, x = ys[start : start + _CHUNK], xs[start : start + _CHUNK]
            corners = self.rows.index[y][:, :, None] * self.src[1] + self.cols.index[x][:, None, :]
            if column is not None:
                corners = column[corners]
            weights = self.rows.weights[y][:, :, None] * self.cols.weights[x][:, None, :]
            corners, weights = corners.reshape(-1, 4), weights.reshape(-1, 4)  # [P, 4] source pixels of each
            if exact:
                out[y, x] = channels[_corner_leader(lower, corners, weights)[0]]
                continue
            corner_leaders = best[corners]  # [P, 4]
            # leader s at corner c: [P, c, s]
            picked = corner_leaders[:, None, :] * lower.shape[1] + corners[:, :, None]
            low = np.einsum("pc,pcs->ps", weights, np.take(lower, picked), dtype=np.float32)
            high = low if upper is lower else np.einsum("pc,pcs->ps", weights, np.take(upper, picked), dtype=np.float32)
            winner = corner_leaders[np.arange(y.size), low.argmax(axis=1)]
            ahead = low.max(axis=1) - tol
            others = np.where(corner_leaders == winner[:, None], FLOAT32_MIN, high).max(axis=1)
            unsure = np.flatnonzero(ahead <= np.maximum(others, (weights * rival[corners]).sum(axis=1)))
            if unsure.size:  # the runner-up bound may be a leader elsewhere: bound the non-leaders exactly
                excluded = self._others_bound(upper, cap, corners[unsure], weights[unsure], corner_leaders[unsure])
                unsure = unsure[ahead[unsure] <= np.maximum(others[unsure], excluded)]
            result = channels[winner]
            if unsure.size:
                result[unsure] = self._exact_argmax(corners[unsure], weights[unsure], channels, cap, tol, scores_at)
            out[y, x] = result
        return out

    def _settle(
        self,
        best: np.ndarray,
        margin: np.ndarray,
        channels: np.ndarray,
        tol: float,
        decided: tuple[np.ndarray, np.ndarray, np.ndarray],
        column: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Step 1 again for the cells that ``decided = (sure, labels, points)`` leaves open, from the leader ``best``
        and its ``margin`` at every point ``[n]`` (``column``: the position of each source pixel in ``points``).
        Returns new ``sure`` and ``labels``."""
        sure, labels, _ = decided
        r_sel, c_sel = _nonzero(~sure)
        rows = np.stack([self._r.lo[r_sel], self._r.hi[r_sel]])[:, None, :]
        cols = np.stack([self._c.lo[c_sel], self._c.hi[c_sel]])[None, :, :]
        at = column[(rows * self.src[1] + cols).reshape(4, -1)]  # [4, cells]
        label, margin = best[at], margin[at]
        now = (label.min(axis=0) == label.max(axis=0)) & (margin.min(axis=0) > tol)
        sure, labels = np.array(sure, bool, order="C"), np.array(labels, channels.dtype, order="C")  # copies
        settled = r_sel[now] * sure.shape[1] + c_sel[now]  # flat indices: faster than pairs of index arrays
        sure.reshape(-1)[settled] = True
        labels.reshape(-1)[settled] = channels[label[0, now]]
        return sure, labels

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
            column = np.take(upper, corners[part], axis=1)  # [K, p, 4]
            pixels = np.arange(column.shape[1])[:, None]
            for s in range(leaders.shape[1]):
                column[leaders[part, s, None], pixels, np.arange(4)] = FLOAT32_MIN
            bound = column.max(axis=0)
            bound = np.maximum(bound, cap if np.isscalar(cap) else cap[corners[part]])  # [p, 4]
            out[part] = (weights[part] * bound).sum(axis=1)
        return out

    def count_bounds(
        self, lower: np.ndarray, upper: np.ndarray, threshold: float, tol: float, via: tuple[np.ndarray, np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """The first bounds of :meth:`count_reaching` (``settled`` aside) for many maps at once, ``(low, high)``
        ``[K]`` int64, from ``lower`` / ``upper`` ``[K, h', w']`` on the ``via`` grid.

        When every cell reads one coarse row or two adjacent ones (likewise columns), a cell's corners are
        ``(a, b)``, possibly with ``a + 1`` and ``b + 1``: the cells are counted by kind (single or pair, per axis)
        on shifted copies of the maps, all maps at once. None when the cells are not of that form.
        """
        _, r, c = self._through_via(via)
        h, w = lower.shape[1:]
        rows, cols = r.adjacent_counts(h), c.adjacent_counts(w)
        if rows is None or cols is None:
            return None
        bounds = []
        for values, op in ((lower >= threshold + tol, np.logical_and), (upper >= threshold - tol, np.logical_or)):
            down = op(values[:, :-1], values[:, 1:])  # rows a and a + 1
            total = np.zeros(len(values), np.float32)
            for maps, row_count in ((values, rows[0]), (down, rows[1][:-1])):
                right = op(maps[:, :, :-1], maps[:, :, 1:])  # columns b and b + 1
                for part, col_count in ((maps, cols[0]), (right, cols[1][:-1])):
                    per_row = np.einsum("khw,w->kh", part.astype(np.float32), col_count)  # no BLAS: see .threads
                    total += np.einsum("kh,h->k", per_row, row_count[: part.shape[1]])
            bounds.append(np.rint(total).astype(np.int64))  # sums of small integers: exact in float32 below 2**24
        return bounds[0], bounds[1]

    def count_reaching(
        self,
        lower: np.ndarray,
        upper: np.ndarray,
        scale: float,
        threshold: float,
        tol: float,
        values_at: Callable[[np.ndarray], np.ndarray],
        via: tuple[np.ndarray, np.ndarray] | None = None,
        settled: Callable[[int, int], bool] | None = None,
    ) -> tuple[int, int]:
        """The number of target pixels where ``resized(values) * scale >= threshold``, as bounds ``(low, high)``.

        ``lower`` / ``upper`` ``[h, w]`` (or on the ``via`` grid) bound ``values * scale`` at every source pixel;
        ``values_at(flat_source_indices [n])`` returns exact ``values`` ``[n]``. Only cells that read a source pixel
        whose bound comes within ``tol`` of the threshold are visited; those whose corners are all above
        ``threshold + tol`` count whole (first by the bounds, then by their corners' exact values), and only
        the target pixels of the cells with corners on both sides are resampled exactly, from the corners' exact
        values. The count is exact (``low == high``) unless ``settled(low, high)`` says earlier that bounds are
        enough.
        """
        reachable = upper >= threshold - tol
        rows, cols = np.flatnonzero(reachable.any(axis=1)), np.flatnonzero(reachable.any(axis=0))
        if rows.size == 0:
            return 0, 0
        r, c = self.cells_reading(rows, cols, via)
        above = self.reduce(lower >= threshold + tol, np.logical_and, r, c, via)
        low = self.count(above, r, c)
        if settled is not None:  # every pixel of the cells visited, a cheap first upper bound
            high = int(self._r.count[r].sum()) * int(self._c.count[c].sum())
            if settled(low, high):
                return low, high
        unsure = self.reduce(reachable, np.logical_or, r, c, via) & ~above
        high = low + self.count(unsure, r, c)
        if low == high or (settled is not None and settled(low, high)):
            return low, high
        # the unsure cells again, with their corners' exact values
        points = self.corners(unsure, r, c)
        values = values_at(points)
        r_sel, c_sel = _nonzero(unsure)
        r_sel, c_sel = r_sel + (r.start or 0), c_sel + (c.start or 0)
        corner_rows = np.stack([self._r.lo[r_sel], self._r.hi[r_sel]])[:, None, :]
        corner_cols = np.stack([self._c.lo[c_sel], self._c.hi[c_sel]])[None, :, :]
        position = np.zeros(self.src[0] * self.src[1], np.int32)
        position[points] = np.arange(points.size)
        scaled = values[position[(corner_rows * self.src[1] + corner_cols).reshape(4, -1)]] * scale
        sizes = self._r.count[r_sel] * self._c.count[c_sel]
        all_above = (scaled >= threshold + tol).all(axis=0)
        mixed = ~all_above & (scaled >= threshold - tol).any(axis=0)
        low += int(sizes[all_above].sum())
        high = low + int(sizes[mixed].sum())
        if low == high or (settled is not None and settled(low, high)):
            return low, high
        # and the target pixels of the cells left, resampled exactly
        left = np.zeros_like(unsure)
        left[r_sel[mixed] - (r.start or 0), c_sel[mixed] - (c.start or 0)] = True
        ys, xs = self.pixels(left, r, c)
        resampled = self.resample_points(values[None], points, ys, xs)[0]
        low += int(np.count_nonzero(resampled * scale >= threshold))
        return low, low

    def resample_points(self, values: np.ndarray, points: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        """Resized values at target pixels ``(ys, xs)`` ``[P]`` from ``values`` ``[N, n]`` known at the flat source
        indices ``points`` ``[n]`` (ascending; they must include every tap the pixels read): ``[N, P]``.

        The same arithmetic, in the same order, as :func:`sample_maps` reading the taps directly.
        """
        out = None
        for t in range(self.rows.index.shape[1]):
            base = self.rows.index[ys, t] * self.src[1]
            line = np.take(values, np.searchsorted(points, base + self.cols.index[xs, 0]), axis=1)
            line *= self.cols.weights[xs, 0]
            for u in range(1, self.cols.index.shape[1]):
                term = np.take(values, np.searchsorted(points, base + self.cols.index[xs, u]), axis=1)
                term *= self.cols.weights[xs, u]
                line += term
            line *= self.rows.weights[ys, t]
            out = line if out is None else np.add(out, line, out=out)
        return out
