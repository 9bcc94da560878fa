"""HF's three Mask2Former post-processes in numpy, twice: a literal port (:mod:`.reference`) and a fast path that
gives the same results with much less work (the default).

What HF computes (``transformers`` ``Mask2FormerImageProcessor``): mask logits ``[Q, h, w]`` are first resized
(bilinear) to a fixed 384x384 *working grid*, whatever the input size was, and sigmoid is applied there; then each
task does its own thing (:mod:`.semantic`, :mod:`.instance`, :mod:`.panoptic`; :mod:`.reference` line by line).

How the fast path cuts the work without changing results:

* Queries that cannot pass a threshold are dropped before anything is resized (instance: the class
  probability bounds the final score; panoptic: the score filter comes first anyway).
* Nothing is resized to the target size. A target pixel is a convex combination of a 2x2 cell of working-grid
  pixels, so argmax and threshold decisions are taken once per cell when the corners agree by a margin, and
  exact values are computed only for the target pixels of the other cells (:mod:`.cells`).
* Per logit window: a working-grid value is a convex combination of a small window of logits, so the sigmoid
  of the window's smallest and largest logit bound a query's mask probability there (:mod:`.windows`). The first
  decisions of semantic and panoptic segmentation are taken per window, a cell being decided when the windows
  that its corners read agree by a margin; exact working-grid values are computed only at the pixels that the
  undecided cells read.
* Resampling equals torch's (:mod:`.resample`); threads only when asked for (:mod:`.threads`).

Where both paths differ from HF, on purpose: results are numpy arrays (HF: torch tensors; same dtypes); values
agree with torch to float32 rounding, so a pixel whose two best scores tie to ~1e-7 may go either way; passing
``pixel_mask`` (from ``preprocess``) crops each image's padding away before the first resize (along each axis
that has padding, the logits are upsampled to the padded input, cropped to the image, and that is resized to the
working grid; HF resizes padded logits as they are, which stretches the padding into the result); instance
segments come in a documented order (:mod:`.instance`: score descending; HF's order depends on how torch was
built); NaN or infinite logits are rejected.
"""

from m2f_deploy.processing.postprocess import reference
from m2f_deploy.processing.postprocess.common import WORKING_SIZE, read_outputs
from m2f_deploy.processing.postprocess.instance import instance_segmentation
from m2f_deploy.processing.postprocess.panoptic import panoptic_segmentation
from m2f_deploy.processing.postprocess.semantic import semantic_segmentation
from m2f_deploy.processing.postprocess.threads import Workers

__all__ = [
    "WORKING_SIZE",
    "Workers",
    "instance_segmentation",
    "panoptic_segmentation",
    "read_outputs",
    "reference",
    "semantic_segmentation",
]
