"""Resampling that equals torch's ``interpolate`` (bilinear with ``align_corners=False``, and nearest), in numpy,
and the one matrix product post-processing uses.

Bilinear resampling is separable: one 1-D linear map per axis (:class:`Resample1D`, cached by shape) with a few
taps per output sample. Tap positions and weights are computed exactly as torch computes them in float32, so
results agree with torch to float32 rounding (torch fuses multiply-adds, numpy does not: about 1e-7
relative). Maps are resized tap by tap rather than with matrix products: as fast as a single-threaded BLAS
product, and it does not wake BLAS' thread pool (see :mod:`.threads`). For the same reason :func:`product`
hands BLAS blocks small enough to stay on the calling thread.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property, lru_cache, partial

import numpy as np
from numpy.lib.stride_tricks import as_strided

from m2f_deploy.processing.postprocess.threads import PARALLEL_MIN, SERIAL, Workers

# sample_maps gathers pixels' taps directly unless resampling their rows whole reads this many times fewer values.
_DIRECT_SHARE = 0.25
# Values per temporary when sample_maps gathers taps directly (a few hundred KiB: they stay in cache, and the
# heap does not grow by whole arrays).
_SAMPLE_CHUNK = 1 << 16
# OpenBLAS computes a product of at most 2**18 multiply-adds on the calling thread; larger ones wake its pool.
_BLAS_ONE_THREAD = 1 << 18
# Values per strip in resize_in_strips (about 0.5 MiB: a strip and what is made of it stay in a core's cache).
_STRIP_VALUES = 1 << 17


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
    # e.g. [384, 480] @ [480, 160]: large enough that a plain ``@`` would wake BLAS' threads (see .threads)
    return Resample1D.from_matrix(product(bilinear(n_valid, n_out).matrix, upsampled))


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


def _along(values: np.ndarray, taps: Resample1D, axis: int, out: np.ndarray | None = None) -> np.ndarray:
    out = np.take(values, taps.index[:, 0], axis=axis, out=out, mode="clip")  # in range: "clip" writes out directly
    shape = [1] * values.ndim
    shape[axis] = taps.n_out
    out *= taps.weights[:, 0].reshape(shape)
    for t in range(1, taps.index.shape[1]):
        term = np.take(values, taps.index[:, t], axis=axis)
        term *= taps.weights[:, t].reshape(shape)
        out += term
    return out


def resize_in_strips(
    maps: np.ndarray,
    rows: Resample1D,
    cols: Resample1D,
    each: Callable[[slice, np.ndarray], None],
    workers: Workers = SERIAL,
) -> None:
    """``resize_maps(maps, rows, cols)`` handed over one strip of output rows at a time: ``each(rows_of_strip,
    strip)``, ``strip`` ``[N, rows in the strip, cols.n_out]`` (a new array, free to overwrite).

    The maps are resampled along columns once, then each strip along rows: a strip stays in cache through what
    ``each`` does with it (e.g. a sigmoid and a product), where the whole result (59 MB for 100 maps of 384x384)
    would go through memory at every step. Large resizes run on ``workers``' threads (the first pass on shares of
    the maps, the second strip by strip): ``each`` must then be thread-safe, e.g. write disjoint parts of an array.
    """
    maps = np.asarray(maps, dtype=np.float32)
    across = np.empty((len(maps), maps.shape[1], cols.n_out), np.float32)  # [N, h, W]
    step = max(1, _STRIP_VALUES // max(1, across.shape[0] * across.shape[2]))

    def columns(part: slice) -> None:
        _along(maps[part], cols, axis=2, out=across[part])

    def strip(start: int) -> None:
        part = slice(start, min(start + step, rows.n_out))
        each(part, _along(across, Resample1D(rows.index[part], rows.weights[part], rows.n_in), axis=1))

    shares = workers.shares(len(maps), len(maps) * rows.n_out * cols.n_out)
    workers.run([partial(columns, share) for share in shares])
    starts = range(0, rows.n_out, step)
    if len(shares) > 1:
        workers.run([partial(strip, start) for start in starts])
    else:
        for start in starts:
            strip(start)


def sample_maps(maps: np.ndarray, rows: Resample1D, cols: Resample1D, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Values of ``resize_maps(maps, rows, cols)`` at pixels ``(ys[p], xs[p])`` only: ``[N, P]`` float32.

    Either the rows that the pixels lie on are resampled whole (contiguous gathers) and then each pixel's
    columns, or, when the pixels are few for their rows, each pixel's taps are gathered directly.
    """
    maps = np.asarray(maps, dtype=np.float32)
    rows_read = np.count_nonzero(np.bincount(ys, minlength=rows.n_out)) if ys.size else 0
    taps = rows.index.shape[1] * cols.index.shape[1]
    if rows_read * maps.shape[2] > _DIRECT_SHARE * taps * ys.size:  # gather each pixel's taps (flat takes)
        flat = maps.reshape(len(maps), -1)
        # per tap, for every pixel: its flat offset (row part, column part) and weight (np.take: fast gathers)
        row_at = [np.take(rows.index[:, t], ys) * maps.shape[2] for t in range(rows.index.shape[1])]
        row_w = [np.take(rows.weights[:, t], ys) for t in range(rows.index.shape[1])]
        col_at = [np.take(cols.index[:, u], xs) for u in range(cols.index.shape[1])]
        col_w = [np.take(cols.weights[:, u], xs) for u in range(cols.index.shape[1])]
        out = np.empty((len(maps), ys.size), np.float32)
        step = max(256, _SAMPLE_CHUNK // max(1, len(maps)))
        for start in range(0, ys.size, step):  # in chunks: small temporaries, reused
            part = slice(start, start + step)
            for t in range(len(row_at)):
                line = np.take(flat, row_at[t][part] + col_at[0][part], axis=1)
                line *= col_w[0][part]
                for u in range(1, len(col_at)):
                    term = np.take(flat, row_at[t][part] + col_at[u][part], axis=1)
                    term *= col_w[u][part]
                    line += term
                line *= row_w[t][part]
                if t == 0:
                    out[:, part] = line
                else:
                    out[:, part] += line
        return out
    needed, row_of = np.unique(ys, return_inverse=True)
    lines = _along(maps, Resample1D(rows.index[needed], rows.weights[needed], rows.n_in), axis=1)  # [N, R, w]
    flat = lines.reshape(len(lines), -1)
    base = row_of * lines.shape[2]
    out = np.take(flat, base + cols.index[xs, 0], axis=1) * cols.weights[xs, 0]
    for t in range(1, cols.index.shape[1]):
        out += np.take(flat, base + cols.index[xs, t], axis=1) * cols.weights[xs, t]
    return out


def product(
    left: np.ndarray, right: np.ndarray, out: np.ndarray | None = None, workers: Workers = SERIAL
) -> np.ndarray:
    """``left @ right``: ``[S, M]``, ``[M, N]`` -> ``[S, N]`` float32 (into ``out`` if given, e.g. columns of a larger
    array).

    One batched ``matmul`` over blocks of columns, each small enough that OpenBLAS keeps it on the calling thread
    (see :mod:`.threads`): several times faster than ``einsum``, and BLAS' thread pool stays asleep. The exception,
    when ``workers`` may use threads and the product has at least :data:`.threads.PARALLEL_MIN` output values: one
    whole ``matmul``, on BLAS' own threads (about twice as fast as the blocks: measured 144 ms against 273 ms
    blocked on one thread, 190 ms blocked on two, for ``[133, 100] @ [100, 150000]`` on 2 cores).
    """
    left, right = np.ascontiguousarray(left, np.float32), np.ascontiguousarray(right, np.float32)
    (s, m), n = left.shape, right.shape[1]
    out = np.empty((s, n), np.float32) if out is None else out
    if workers.threads > 1 and s * n >= PARALLEL_MIN:
        return np.matmul(left, right, out=out)
    step = max(1, _BLAS_ONE_THREAD // max(1, s * m))
    whole = n - n % step
    if whole:  # block b of the columns is batch item b
        np.matmul(left, _column_blocks(right, step, whole // step), out=_column_blocks(out, step, whole // step))
    if whole < n:
        np.matmul(left, right[:, whole:], out=out[:, whole:])
    return out


def _column_blocks(matrix: np.ndarray, step: int, count: int) -> np.ndarray:
    """The first ``count * step`` columns of ``matrix`` ``[R, N]`` as ``count`` blocks: a ``[count, R, step]`` view."""
    rows, cols = matrix.strides
    return as_strided(matrix, (count, matrix.shape[0], step), (step * cols, rows, cols))

