"""The order in which ``torch.topk(values, k, sorted=False)`` returns indices on CPU.

HF's instance segmentation walks its top-k (query, class) pairs in that order, and the order decides segment
ids and which instance owns overlapping pixels. torch selects with the C++ standard library (Linux builds:
libstdc++): ``std::partial_sort`` when ``k * 64 <= n`` (so the result is sorted, descending), otherwise
``std::nth_element``, which leaves the k largest in an order that only the algorithm itself defines. Both are
replayed here step by step; the sorted case takes a numpy shortcut when no ties make its order ambiguous.
"""

from __future__ import annotations

import numpy as np


def topk_order(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest of ``values`` ``[n]``, in torch's ``sorted=False`` order: ``[k]`` int64.

    ``values`` must be free of NaN.
    """
    values = np.asarray(values).reshape(-1)
    n = values.size
    if not 0 < k <= n:
        raise ValueError(f"k={k} must be in [1, {n}]")
    if k * 64 <= n:
        if k < n:
            candidates = np.argpartition(values, n - k - 1)[n - k - 1 :]  # the k + 1 largest
        else:
            candidates = np.arange(n)
        if np.unique(values[candidates]).size == candidates.size:  # no ties: one possible sorted order
            return candidates[np.argsort(-values[candidates], kind="stable")][:k].astype(np.int64)
        return np.asarray(_Selection(values).partial_sort(k), dtype=np.int64)
    return np.asarray(_Selection(values).nth_element(k - 1)[:k], dtype=np.int64)


class _Selection:
    """libstdc++'s selection algorithms on a permutation of ``range(n)``, ordered by ``values`` descending.

    ``before(i, j)`` is torch's comparator ``values[i] > values[j]``; the algorithms only ever compare and move.
    """

    def __init__(self, values: np.ndarray):
        self.v = values.astype(np.float64).tolist()
        self.a = list(range(len(self.v)))

    # -- heaps (bits/stl_heap.h) -------------------------------------------------------------------------------
    def _push_heap(self, first: int, hole: int, top: int, item: int) -> None:
        a, v = self.a, self.v
        parent = (hole - 1) // 2
        while hole > top and v[a[first + parent]] > v[item]:
            a[first + hole] = a[first + parent]
            hole = parent
            parent = (hole - 1) // 2
        a[first + hole] = item

    def _adjust_heap(self, first: int, hole: int, length: int, item: int) -> None:
        a, v = self.a, self.v
        top = hole
        child = hole
        while child < (length - 1) // 2:
            child = 2 * (child + 1)
            if v[a[first + child]] > v[a[first + child - 1]]:
                child -= 1
            a[first + hole] = a[first + child]
            hole = child
        if length % 2 == 0 and child == (length - 2) // 2:
            child = 2 * (child + 1)
            a[first + hole] = a[first + child - 1]
            hole = child - 1
        self._push_heap(first, hole, top, item)

    def _make_heap(self, first: int, last: int) -> None:
        length = last - first
        if length < 2:
            return
        for parent in range((length - 2) // 2, -1, -1):
            self._adjust_heap(first, parent, length, self.a[first + parent])

    def _pop_heap(self, first: int, last: int, result: int) -> None:
        item = self.a[result]
        self.a[result] = self.a[first]
        self._adjust_heap(first, 0, last - first, item)

    def _heap_select(self, first: int, middle: int, last: int) -> None:
        a, v = self.a, self.v
        self._make_heap(first, middle)
        for i in range(middle, last):
            if v[a[i]] > v[a[first]]:
                self._pop_heap(first, middle, i)

    def partial_sort(self, k: int) -> list[int]:
        """``std::partial_sort(begin, begin + k, end)``; returns the first ``k``."""
        self._heap_select(0, k, len(self.a))
        for last in range(k - 1, 0, -1):  # std::__sort_heap
            self._pop_heap(0, last, last)
        return self.a[:k]

    # -- introselect (bits/stl_algo.h) -------------------------------------------------------------------------
    def _move_median_to_first(self, result: int, x: int, y: int, z: int) -> None:
        a, v = self.a, self.v
        vx, vy, vz = v[a[x]], v[a[y]], v[a[z]]
        if vx > vy:
            pick = y if vy > vz else (z if vx > vz else x)
        else:
            pick = x if vx > vz else (z if vy > vz else y)
        a[result], a[pick] = a[pick], a[result]

    def _unguarded_partition(self, first: int, last: int, pivot: int) -> int:
        a, v = self.a, self.v
        pv = v[a[pivot]]
        while True:
            while v[a[first]] > pv:
                first += 1
            last -= 1
            while pv > v[a[last]]:
                last -= 1
            if not first < last:
                return first
            a[first], a[last] = a[last], a[first]
            first += 1

    def _insertion_sort(self, first: int, last: int) -> None:
        a, v = self.a, self.v
        for i in range(first + 1, last):
            item = a[i]
            if v[item] > v[a[first]]:
                a[first + 1 : i + 1] = a[first:i]
                a[first] = item
                continue
            j = i
            while v[item] > v[a[j - 1]]:  # std::__unguarded_linear_insert
                a[j] = a[j - 1]
                j -= 1
            a[j] = item

    def nth_element(self, nth: int) -> list[int]:
        """``std::nth_element(begin, begin + nth, end)``; returns the whole permutation."""
        first, last = 0, len(self.a)
        depth = 2 * ((last - first).bit_length() - 1)
        while last - first > 3:
            if depth == 0:
                self._heap_select(first, nth + 1, last)
                self.a[first], self.a[nth] = self.a[nth], self.a[first]
                return self.a
            depth -= 1
            mid = first + (last - first) // 2
            self._move_median_to_first(first, first + 1, mid, last - 1)
            cut = self._unguarded_partition(first + 1, last, first)
            if cut <= nth:
                first = cut
            else:
                last = cut
        self._insertion_sort(first, last)
        return self.a
