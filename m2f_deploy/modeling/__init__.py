"""The reference Mask2Former in PyTorch, one file per part (needs torch)."""

from m2f_deploy.modeling.model import Mask2Former, Mask2FormerOutput, numpy_logits
from m2f_deploy.modeling.ms_deform_attn import (
    msda_grid_sample,
    msda_implementation,
    multi_scale_deformable_attention,
)

__all__ = [
    "Mask2Former",
    "Mask2FormerOutput",
    "msda_grid_sample",
    "msda_implementation",
    "multi_scale_deformable_attention",
    "numpy_logits",
]
