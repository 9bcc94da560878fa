"""Mask2Former pre- and post-processing in numpy and Pillow: no torch, same results as transformers.

``ImageProcessor`` is the entry point; ``WORKING_SIZE`` is the fixed grid HF's post-processing resizes mask
logits to before anything else.
"""

from m2f_deploy.processing.image_processor import ImageProcessor
from m2f_deploy.processing.postprocess import WORKING_SIZE

__all__ = ["ImageProcessor", "WORKING_SIZE"]
