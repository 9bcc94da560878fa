"""``ImageProcessor``: HF's ``Mask2FormerImageProcessor`` in numpy and Pillow, plus a fixed-canvas mode.

Typical use, the way a runtime with a static-shape engine uses it::

    processor = ImageProcessor.from_pretrained("checkpoint_dir", canvas=(640, 640))  # or canvas= per call
    inputs = processor(images)                   # pixel_values [B, 3, 640, 640], pixel_mask, original_sizes
    outputs = engine(inputs["pixel_values"])     # class_queries_logits, masks_queries_logits
    results = processor.post_process_panoptic_segmentation(
        outputs, target_sizes=inputs["original_sizes"], pixel_mask=inputs["pixel_mask"]
    )

Passing ``pixel_mask`` makes the post-processes crop each image's padding before resizing, so results line up
with the original image (HF resizes the padded logits as they are). Without ``canvas`` and ``pixel_mask``,
every method matches transformers (see ``postprocess`` and ``images`` for the details and the few extensions).
Post-processing runs the fast path unless ``postprocess="reference"`` (a literal port of HF's, slow, the fast
path's oracle); ``threads`` > 1 lets large steps of the fast path use a pool the processor owns (``close()`` it,
or use the processor as a context manager).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from m2f_deploy.artifact import INPUT_NAME  # torch-free
from m2f_deploy.errors import ConfigError, InputError
from m2f_deploy.processing import images as img
from m2f_deploy.processing import postprocess, settings
from m2f_deploy.processing.postprocess import Workers, reference
from m2f_deploy.utils import atomic_write_text, did_you_mean

CONFIG_NAME = "preprocessor_config.json"

_Size = tuple[int, int]
_IdMap = Mapping[int, int]

POSTPROCESS = ("fast", "reference")
"""The post-processing paths: ``fast`` (default) and ``reference`` (HF's, ported literally; see ``postprocess``)."""
RUNTIME_OPTIONS = ("postprocess", "threads")
"""Options that choose how this process runs, not what the checkpoint is: never written by ``to_dict`` or
``save_pretrained``, and ignored when a ``preprocessor_config.json`` holds them (pass them as arguments)."""


class ImageProcessor:
    """Mask2Former pre- and post-processing without torch.

    Construct it with the keys of HF's ``preprocessor_config.json`` (``size``, ``size_divisor``, ``resample``,
    ``do_resize``, ``do_rescale``, ``rescale_factor``, ``do_normalize``, ``image_mean``, ``image_std``,
    ``ignore_index``, ``do_reduce_labels``, ``num_labels``, ``pad_size``; legacy ``max_size``,
    ``size_divisibility``, ``reduce_labels``) and optionally ``canvas=(H, W)``. Unknown keys are kept and
    written back. The options are readable as attributes (``processor.size``) and in ``processor.settings``.

    ``postprocess``: ``"fast"`` (default) or ``"reference"`` (see :data:`POSTPROCESS`). ``threads``: threads the
    fast post-processes may use, a positive whole number or None (= 1, the calling thread only: safe with one
    worker process per core); see ``postprocess.threads`` for when they are used. Neither is a transformers key:
    they are not saved (:data:`RUNTIME_OPTIONS`). A processor with ``threads > 1`` owns a thread pool: call
    :meth:`close` or use it as a context manager.
    """

    def __init__(self, *, postprocess: str = "fast", threads: int | None = None, **options: Any):
        if postprocess not in POSTPROCESS:
            hint = did_you_mean(str(postprocess), POSTPROCESS)
            raise ConfigError(
                f"postprocess={postprocess!r} is not a post-processing path{hint}; "
                f"choose one of {', '.join(POSTPROCESS)}"
            )
        try:
            self.workers = Workers(threads)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        self.postprocess = postprocess
        self.settings = settings.parse(options, error=ConfigError, strict=False)

    def __getattr__(self, name: str) -> Any:
        if name != "settings" and name in settings.Settings.__dataclass_fields__:
            return copy.copy(getattr(self.settings, name))  # a copy: the settings are immutable
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __repr__(self) -> str:
        runtime = f", postprocess={self.postprocess!r}, threads={self.workers.threads}"
        return f"{type(self).__name__}({json.dumps(self.to_dict(), sort_keys=True)}{runtime})"

    def __enter__(self) -> ImageProcessor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the post-processing threads, if any were started (a later call starts them again)."""
        self.workers.close()

    # -- configuration -----------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides: Any) -> ImageProcessor:
        """Load ``preprocessor_config.json`` from a checkpoint folder (or that file's path); ``overrides`` win (and
        may hold ``postprocess`` and ``threads``, which a file cannot set: :data:`RUNTIME_OPTIONS`)."""
        path = Path(path)
        file = path / CONFIG_NAME if path.is_dir() else path
        try:
            options = json.loads(file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"no {CONFIG_NAME} in {path}") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ConfigError(f"cannot read {file}: {err}") from None
        if not isinstance(options, dict):
            raise ConfigError(f"{file} must hold a JSON object, got {type(options).__name__}")
        options = {key: value for key, value in options.items() if key not in RUNTIME_OPTIONS}
        return cls(**{**options, **overrides})

    def to_dict(self) -> dict[str, Any]:
        """The options as a ``preprocessor_config.json`` dictionary that transformers can load."""
        return settings.to_dict(self.settings)

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write ``folder/preprocessor_config.json`` atomically (temporary file, then rename); returns its path."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / CONFIG_NAME
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"
        atomic_write_text(target, text)
        return target

    # -- preprocessing -----------------------------------------------------------------------------------------

    def __call__(
        self, images: Any, segmentation_maps: Any = None, instance_id_to_semantic_id: Any = None, **kwargs: Any
    ) -> dict[str, Any]:
        """Same as :meth:`preprocess`."""
        return self.preprocess(images, segmentation_maps, instance_id_to_semantic_id, **kwargs)

    def preprocess(
        self,
        images: Any,
        segmentation_maps: Any = None,
        instance_id_to_semantic_id: _IdMap | Sequence[_IdMap] | None = None,
        *,
        input_data_format: str | None = None,
        return_tensors: str | None = None,
        **options: Any,
    ) -> dict[str, Any]:
        """Resize, rescale, normalize and pad a batch; encode segmentation maps when given.

        ``images``: a PIL image, an array (``[H, W]``, ``[H, W, C]`` or ``[C, H, W]``, C in 1/3/4; a 4-D array is
        a batch) or a list of them. ``segmentation_maps``: one ``[H, W]`` map per image (class ids, or instance
        ids with ``instance_id_to_semantic_id``: one mapping for all images or one per image). ``options``
        override the processor's options for this call (e.g. ``canvas=(640, 640)``, ``do_resize=False``).

        Returns a dict: ``pixel_values`` ``[B, 3, H, W]`` float32, ``pixel_mask`` ``[B, H, W]`` int64 (1 on
        image pixels, 0 on padding), ``original_sizes`` ``[B, 2]`` int64 (each input's height and width; ours,
        handy as ``target_sizes``), and with segmentation maps ``mask_labels`` (per image ``[N, H, W]``
        float32; padding holds ``ignore_index``, as in HF) and ``class_labels`` (per image ``[N]`` int64).
        """
        _check_return_tensors(return_tensors)
        s = settings.parse(options, self.settings, error=InputError, strict=True) if options else self.settings
        channels_last = img.channels_last_flag(input_data_format)
        pictures = [
            img.to_rgb(item, f"images[{i}]", channels_last)
            for i, item in enumerate(img.flat_list(images, "images", 3))
        ]
        labels = self._label_maps(segmentation_maps, [p.shape[1:] for p in pictures])

        processed, resized_labels = [], []
        for i, picture in enumerate(pictures):
            source = picture.shape[1:]
            size = self._output_size(source, s, i)
            if size != source:
                picture = img.resize_rgb(picture, size, s.resample, f"images[{i}]")
            processed.append(
                img.rescale_and_normalize(
                    picture,
                    s.rescale_factor if s.do_rescale else None,
                    s.image_mean if s.do_normalize else None,
                    s.image_std if s.do_normalize else None,
                )
            )
            if labels is not None:
                name = f"segmentation_maps[{i}]"
                resized_labels.append(labels[i] if size == source else img.resize_label_map(labels[i], size, name))

        padded = s.canvas or s.pad_size or tuple(max(p.shape[i] for p in processed) for i in (1, 2))
        encoded = self._encode(
            processed, resized_labels if labels is not None else None, instance_id_to_semantic_id, s.ignore_index,
            s.do_reduce_labels, padded,
        )
        encoded["original_sizes"] = np.array([p.shape[1:] for p in pictures], dtype=np.int64).reshape(-1, 2)
        return encoded

    def preprocess_uint8(self, images: Any, *, input_data_format: str | None = None) -> dict[str, Any]:
        """For graphs exported with ``m2f-export --input uint8`` (normalisation in the graph): each image resized as
        :meth:`preprocess` resizes it (Pillow, through uint8, as HF does) and copied into a uint8 canvas; no float
        copy is made. Needs a ``canvas``.

        Returns ``images`` ``[B, H, W, 3]`` uint8 (zeros on padding), ``pixel_mask`` ``[B, H, W]`` uint8 (1 on image
        pixels) and ``original_sizes`` ``[B, 2]`` int64. :func:`uint8_table` gives the values the graph maps each
        byte to: the very values :meth:`preprocess` computes.
        """
        s = self.settings
        if s.canvas is None:
            raise InputError("preprocess_uint8 needs a canvas (a static-size graph): ImageProcessor(canvas=(H, W))")
        channels_last = img.channels_last_flag(input_data_format)
        pictures = [
            img.to_rgb(item, f"images[{i}]", channels_last)
            for i, item in enumerate(img.flat_list(images, "images", 3))
        ]
        height, width = s.canvas
        out = np.zeros((len(pictures), height, width, 3), np.uint8)
        pixel_mask = np.zeros((len(pictures), height, width), np.uint8)
        for i, picture in enumerate(pictures):
            name = f"images[{i}]"
            if picture.dtype != np.uint8:
                if picture.dtype.kind not in "iu" or picture.min() < 0 or picture.max() > 255:
                    raise InputError(f"{name}: a uint8 graph takes 8-bit images (0..255), got {picture.dtype}")
                picture = picture.astype(np.uint8)
            size = self._output_size(picture.shape[1:], s, i)
            if size != picture.shape[1:]:
                picture = img.resize_rgb(picture, size, s.resample, name)
            h, w = size
            out[i, :h, :w] = np.moveaxis(picture, 0, -1)
            pixel_mask[i, :h, :w] = 1
        sizes = np.array([p.shape[1:] for p in pictures], dtype=np.int64).reshape(-1, 2)
        return {"images": out, "pixel_mask": pixel_mask, "original_sizes": sizes}

    def uint8_table(self) -> np.ndarray:
        """``[3, 256]`` float32: what :meth:`preprocess` makes of each byte value per channel (rescale, normalize)."""
        s = self.settings
        values = np.broadcast_to(np.arange(256, dtype=np.uint8), (3, 1, 256))
        return img.rescale_and_normalize(
            values, s.rescale_factor if s.do_rescale else None, s.image_mean if s.do_normalize else None,
            s.image_std if s.do_normalize else None,
        )[:, 0]  # fmt: skip

    def encode_inputs(
        self,
        pixel_values_list: Sequence[Any],
        segmentation_maps: Any = None,
        instance_id_to_semantic_id: _IdMap | Sequence[_IdMap] | None = None,
        ignore_index: int | None = None,
        do_reduce_labels: bool = False,
        return_tensors: str | None = None,
        input_data_format: str | None = None,
    ) -> dict[str, Any]:
        """Pad already-processed images to the largest in the batch and encode their segmentation maps (HF 4.x API).

        ``pixel_values_list``: arrays ``[C, H, W]`` (or ``[H, W, C]``, inferred or per ``input_data_format``),
        not resized or normalized here; ``segmentation_maps``: one ``[H, W]`` map per image, at the same size.
        ``ignore_index`` defaults to the processor's. Returns ``pixel_values`` ``[B, C, H, W]`` float32,
        ``pixel_mask`` ``[B, H, W]`` int64 and, with maps, ``mask_labels`` / ``class_labels`` as
        :meth:`preprocess` makes them.
        """
        _check_return_tensors(return_tensors)
        channels_last = img.channels_last_flag(input_data_format)
        values = []
        for i, item in enumerate(pixel_values_list):
            array = np.asarray(item)
            if array.ndim != 3 or array.dtype.kind not in "buif":
                raise InputError(
                    f"pixel_values_list[{i}] must be a real [C, H, W] array, got {array.dtype} {array.shape}"
                )
            values.append(img.to_channels_first(array, f"pixel_values_list[{i}]", channels_last, (1, 3)))
        if not values:
            raise InputError("pixel_values_list is empty")
        labels = self._label_maps(segmentation_maps, [v.shape[1:] for v in values])
        padded = tuple(max(v.shape[i] for v in values) for i in (1, 2))
        ignore = self.settings.ignore_index if ignore_index is None else ignore_index
        return self._encode(values, labels, instance_id_to_semantic_id, ignore, do_reduce_labels, padded)

    @staticmethod
    def _output_size(source: _Size, s: settings.Settings, index: int) -> _Size:
        if s.canvas is not None:
            if s.do_resize:
                return img.fitted_size(source, s.canvas)
            if source[0] > s.canvas[0] or source[1] > s.canvas[1]:
                raise InputError(f"images[{index}] of size {source} does not fit canvas {s.canvas} without resizing")
            return source
        return img.resized_size(source, s.size, s.size_divisor) if s.do_resize else source

    @staticmethod
    def _label_maps(segmentation_maps: Any, sizes: Sequence[_Size]) -> list[np.ndarray] | None:
        if segmentation_maps is None:
            return None
        maps = [
            img.to_label_map(item, f"segmentation_maps[{i}]")
            for i, item in enumerate(img.flat_list(segmentation_maps, "segmentation_maps", 2))
        ]
        if len(maps) != len(sizes):
            raise InputError(f"got {len(maps)} segmentation maps for {len(sizes)} images")
        for i, (labels, size) in enumerate(zip(maps, sizes)):
            if labels.shape != tuple(size):
                raise InputError(f"segmentation_maps[{i}] has size {labels.shape} but its image has {tuple(size)}")
        return maps

    @staticmethod
    def _encode(
        pixel_values: Sequence[np.ndarray],
        labels: Sequence[np.ndarray] | None,
        instance_id_to_semantic_id: _IdMap | Sequence[_IdMap] | None,
        ignore_index: int | None,
        do_reduce_labels: bool,
        padded: _Size,
    ) -> dict[str, Any]:
        """Pad ``[C, h, w]`` arrays to ``padded``; turn label maps into padded binary masks and class ids."""
        height, width = padded
        batch, channels = len(pixel_values), pixel_values[0].shape[0]
        out = np.zeros((batch, channels, height, width), np.float32)
        pixel_mask = np.zeros((batch, height, width), np.int64)
        for i, values in enumerate(pixel_values):
            h, w = values.shape[1:]
            if values.shape[0] != channels:
                raise InputError(f"pixel values {i} has {values.shape[0]} channels, the first has {channels}")
            if h > height or w > width:
                raise InputError(f"image {i} of size {(h, w)} is larger than the padded size {padded}")
            out[i, :, :h, :w] = values
            pixel_mask[i, :h, :w] = 1
        encoded: dict[str, Any] = {INPUT_NAME: out, "pixel_mask": pixel_mask}
        if labels is None:
            return encoded
        per_image = isinstance(instance_id_to_semantic_id, (list, tuple))
        if per_image and len(instance_id_to_semantic_id) != batch:
            count = len(instance_id_to_semantic_id)
            raise InputError(f"instance_id_to_semantic_id has {count} mappings for {batch} images")
        mask_labels, class_labels = [], []
        for i, label_map in enumerate(labels):
            mapping = instance_id_to_semantic_id[i] if per_image else instance_id_to_semantic_id
            name = f"segmentation_maps[{i}]"
            masks, classes = img.binary_masks(label_map, mapping, ignore_index, do_reduce_labels, name)
            fill = 0 if ignore_index is None else ignore_index
            padded_masks = np.full((len(masks), height, width), fill, np.float32)
            padded_masks[:, : masks.shape[1], : masks.shape[2]] = masks
            mask_labels.append(padded_masks)
            class_labels.append(classes)
        encoded["mask_labels"] = mask_labels
        encoded["class_labels"] = class_labels
        return encoded

    # -- post-processing ---------------------------------------------------------------------------------------

    def post_process_semantic_segmentation(
        self,
        outputs: Any,
        target_sizes: Sequence[Sequence[int]] | np.ndarray | None = None,
        return_segmentation_scores: bool = False,
        pixel_mask: np.ndarray | None = None,
    ) -> list[np.ndarray] | list[dict[str, np.ndarray]]:
        """HF's semantic segmentation: per image ``[H, W]`` int64 class ids (``[384, 384]`` without target sizes).

        ``outputs``: a mapping or object with ``class_queries_logits`` ``[B, Q, C+1]`` and ``masks_queries_logits``
        ``[B, Q, h, w]``. ``target_sizes``: ``B`` (height, width) pairs. ``pixel_mask`` ``[B, H, W]`` (from
        :meth:`preprocess`, ours): crop each image's padding first. With ``return_segmentation_scores``: per image
        ``{"segmentation", "segmentation_scores" [C, H, W]}``.
        """
        return self._post("semantic_segmentation", outputs, target_sizes, return_segmentation_scores, pixel_mask)

    def post_process_instance_segmentation(
        self,
        outputs: Any,
        threshold: float = 0.5,
        mask_threshold: float = 0.5,
        overlap_mask_area_threshold: float = 0.8,
        target_sizes: Sequence[Sequence[int]] | np.ndarray | None = None,
        return_coco_annotation: bool = False,
        return_binary_maps: bool = False,
        pixel_mask: np.ndarray | None = None,
    ) -> list[dict[str, Any]]:
        """HF's instance segmentation: per image ``{"segmentation", "segments_info"}``.

        ``segmentation``: ``[H, W]`` float32 segment ids (-1: none), HF's RLE lists with
        ``return_coco_annotation``, or ``[N, H, W]`` float32 masks with ``return_binary_maps``. ``mask_threshold``
        and ``overlap_mask_area_threshold`` are unused, as in HF. ``pixel_mask``: see the semantic method.
        Segments come by score descending (ties: by query, then class), and the highest score wins pixels where
        masks overlap (HF's order depends on how torch was built; the segments and scores are HF's).
        """
        check_thresholds(threshold=threshold, mask_threshold=mask_threshold,
                         overlap_mask_area_threshold=overlap_mask_area_threshold)  # fmt: skip
        return self._post(
            "instance_segmentation", outputs, threshold, mask_threshold, overlap_mask_area_threshold, target_sizes,
            return_coco_annotation, return_binary_maps, pixel_mask,
        )  # fmt: skip

    def post_process_panoptic_segmentation(
        self,
        outputs: Any,
        threshold: float = 0.5,
        mask_threshold: float = 0.5,
        overlap_mask_area_threshold: float = 0.8,
        label_ids_to_fuse: Collection[int] | None = None,
        target_sizes: Sequence[Sequence[int]] | np.ndarray | None = None,
        pixel_mask: np.ndarray | None = None,
    ) -> list[dict[str, Any]]:
        """HF's panoptic segmentation: per image ``{"segmentation", "segments_info"}``.

        ``segmentation``: ``[H, W]`` int32 segment ids (0: none; float32 -1 everywhere when nothing passes
        ``threshold``, as in HF). ``pixel_mask``: see the semantic method.
        """
        check_thresholds(threshold=threshold, mask_threshold=mask_threshold,
                         overlap_mask_area_threshold=overlap_mask_area_threshold)  # fmt: skip
        return self._post(
            "panoptic_segmentation", outputs, threshold, mask_threshold, overlap_mask_area_threshold,
            label_ids_to_fuse, target_sizes, pixel_mask,
        )  # fmt: skip

    def _post(self, task: str, *args: Any) -> Any:
        """Run post-process ``task`` (e.g. ``"semantic_segmentation"``) on the chosen path."""
        if self.postprocess == "reference":
            return getattr(reference, task)(*args)
        return getattr(postprocess, task)(*args, self.workers)


def check_thresholds(error: type[Exception] = InputError, **thresholds: Any) -> None:
    """Each threshold a number in [0, 1]: a score or a share. NaN, a negative value or one above 1 would silently
    keep every segment or none (HF takes them as given), so they raise ``error`` naming the threshold."""
    for name, value in thresholds.items():
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise error(f"{name} must be a number in [0, 1], got {value!r}")
        if not 0 <= value <= 1:  # False for NaN too
            raise error(f"{name} must be in [0, 1], got {value}")


def _check_return_tensors(return_tensors: str | None) -> None:
    if return_tensors not in (None, "np"):
        raise InputError(f"return_tensors={return_tensors!r} is not supported: this processor returns numpy arrays")
