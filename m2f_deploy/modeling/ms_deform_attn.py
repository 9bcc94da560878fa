"""Multi-scale deformable attention (MSDA), behind one swappable function.

The reference math is transformers': one bilinear ``grid_sample`` (zeros padding,
``align_corners=False``) per level, weighted and summed. The exporter swaps the implementation
(custom op with a symbolic per flavour) with :func:`msda_implementation`, scoped to the export
call; nothing is registered at import time.

Shapes (TensorRT's ``MultiscaleDeformableAttnPlugin_TRT`` uses the same layout):
    value:               [N, S, M, D]      S = sum of H_l * W_l over the L levels
    spatial_shapes:      L pairs (H_l, W_l)  (Python ints, or traced sizes while exporting)
    sampling_locations:  [N, Lq, M, L, P, 2]  (x, y) in [0, 1]
    attention_weights:   [N, Lq, M, L, P]
    returns:             [N, Lq, M * D]
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch.nn.functional as F
from torch import Tensor

MSDAFunction = Callable[[Tensor, Sequence[tuple], Tensor, Tensor], Tensor]


def msda_grid_sample(
    value: Tensor, spatial_shapes: Sequence[tuple], sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    """The reference: bilinear ``grid_sample`` per level (transformers' math).

    transformers stacks every level's samples and reduces over levels x points at once; here each
    level's weighted samples are summed as they come, which only reorders the additions and
    avoids materialising the [N*M, D, Lq, L*P] stack.
    """
    n, _, m, d = value.shape
    lq = sampling_locations.shape[1]
    grids = 2 * sampling_locations - 1
    # [N, Lq, M, L, P] -> [N*M, 1, Lq, L, P]
    weights = attention_weights.transpose(1, 2).flatten(0, 1).unsqueeze(1)
    out = None
    start = 0
    for level, (h, w) in enumerate(spatial_shapes):
        # [N, H*W, M, D] -> [N*M, D, H, W]
        v = value[:, start : start + h * w].flatten(2).transpose(1, 2).reshape(n * m, d, h, w)
        start = start + h * w
        # [N, Lq, M, P, 2] -> [N*M, Lq, P, 2]
        g = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        sampled = F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)  # [N*M, D, Lq, P]
        term = (sampled * weights[..., level, :]).sum(-1)  # [N*M, D, Lq]
        out = term if out is None else out + term
    return out.view(n, m * d, lq).transpose(1, 2).contiguous()


_implementation: MSDAFunction = msda_grid_sample


def multi_scale_deformable_attention(
    value: Tensor, spatial_shapes: Sequence[tuple], sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    """Dispatch to the current implementation (the reference unless an exporter swapped it)."""
    return _implementation(value, spatial_shapes, sampling_locations, attention_weights)


@contextmanager
def msda_implementation(fn: MSDAFunction) -> Iterator[None]:
    """Use ``fn`` for every MSDA call inside the ``with`` block (not thread-safe; export-time only)."""
    global _implementation
    previous, _implementation = _implementation, fn
    try:
        yield
    finally:
        _implementation = previous
