"""Preprocessing, encode_inputs and configuration of m2f_deploy.processing against transformers.

transformers' ``Mask2FormerImageProcessor`` falls back to its Pillow variant without torchvision; the Pillow
variant is what we match, so that is the reference here.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import transformers
from PIL import Image

from m2f_deploy.errors import ConfigError, InputError
from m2f_deploy.processing import ImageProcessor

transformers.logging.set_verbosity_error()

SMALL = {"size": {"shortest_edge": 160, "longest_edge": 256}}
RNG = np.random.default_rng(0)
IMAGES = [RNG.integers(0, 256, (300, 451, 3), dtype=np.uint8), RNG.integers(0, 256, (123, 77, 3), dtype=np.uint8)]
MAPS = [RNG.integers(0, 6, image.shape[:2]).astype(np.uint8) for image in IMAGES]


def _hf(images, segmentation_maps=None, instance_id_to_semantic_id=None, **options) -> dict:
    processor = transformers.Mask2FormerImageProcessorPil(**options)
    out = processor(images, segmentation_maps=segmentation_maps, instance_id_to_semantic_id=instance_id_to_semantic_id)
    encoded = {"pixel_values": np.stack(out["pixel_values"]), "pixel_mask": np.stack(out["pixel_mask"])}
    if segmentation_maps is not None:
        encoded["mask_labels"] = [np.asarray(m) for m in out["mask_labels"]]
        encoded["class_labels"] = [np.asarray(c) for c in out["class_labels"]]
    return encoded


def _assert_same(ours: dict, theirs: dict) -> None:
    assert ours["pixel_values"].dtype == np.float32 and ours["pixel_mask"].dtype == np.int64
    assert ours["pixel_values"].shape == theirs["pixel_values"].shape
    # identical arithmetic: only float rounding could differ
    np.testing.assert_allclose(ours["pixel_values"], theirs["pixel_values"], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(ours["pixel_mask"], theirs["pixel_mask"])
    if "mask_labels" in theirs:
        assert len(ours["mask_labels"]) == len(theirs["mask_labels"])
        for mine, hf in zip(ours["mask_labels"], theirs["mask_labels"]):
            assert mine.dtype == np.float32
            np.testing.assert_array_equal(mine, hf)
        for mine, hf in zip(ours["class_labels"], theirs["class_labels"]):
            assert mine.dtype == np.int64
            np.testing.assert_array_equal(mine, hf)


@pytest.mark.parametrize(
    "options",
    [
        {},
        SMALL,
        {**SMALL, "resample": 3},
        {"size": {"height": 200, "width": 256}, "size_divisor": 0},
        {"size": {"max_height": 200, "max_width": 150}},
        {"do_resize": False},
        {"do_resize": False, "do_rescale": False, "do_normalize": False},
        {**SMALL, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.2, 0.3, 0.4], "rescale_factor": 1 / 127},
    ],
)
def test_preprocess_matches_transformers(options):
    _assert_same(ImageProcessor(**options)(IMAGES), _hf(IMAGES, **options))


@pytest.mark.parametrize(
    "convert",
    [
        lambda image: Image.fromarray(image),  # PIL
        lambda image: image.astype(np.float32) / 255,  # floats in [0, 1] (HF scales them to 0..255 for Pillow)
        lambda image: image.astype(np.float64),  # floats with integer values
        lambda image: np.moveaxis(image, -1, 0),  # channels first
    ],
    ids=["pil", "float01", "float255", "chw"],
)
def test_input_kinds_match_transformers(convert):
    images = [convert(image) for image in IMAGES]
    _assert_same(ImageProcessor(**SMALL)(images), _hf(images, **SMALL))


def test_single_image_and_batch_array_match_transformers():
    _assert_same(ImageProcessor(**SMALL)(IMAGES[1]), _hf(IMAGES[1], **SMALL))
    batch = np.stack([IMAGES[1], IMAGES[1][::-1]])
    ours = ImageProcessor(**SMALL)(batch)
    assert ours["pixel_values"].shape[0] == 2
    _assert_same(ours, _hf(batch, **SMALL))


@pytest.mark.parametrize(
    "make",
    [
        lambda a: Image.fromarray(a[..., 0]),  # L
        lambda a: Image.fromarray(np.dstack([a, a[..., :1]])),  # RGBA
        lambda a: Image.fromarray(a).convert("P"),
        lambda a: a[..., :1],  # [H, W, 1]
        lambda a: np.dstack([a, a[..., :1]]),  # RGBA array, blended onto white
    ],
    ids=["L", "RGBA", "P", "gray-array", "rgba-array"],
)
def test_non_rgb_images_are_converted_as_transformers_converts_them(make):
    image = make(IMAGES[1])
    _assert_same(ImageProcessor(**SMALL)(image), _hf(image, do_convert_rgb=True, **SMALL))


def test_2d_grayscale_array_is_one_gray_image():
    gray = IMAGES[1][..., 0]
    ours = ImageProcessor(**SMALL)(gray)
    np.testing.assert_array_equal(ours["pixel_values"], ImageProcessor(**SMALL)(gray[..., None])["pixel_values"])


@pytest.mark.parametrize(
    ("options", "mapping"),
    [
        ({**SMALL, "ignore_index": 255}, None),
        ({**SMALL, "ignore_index": 255, "do_reduce_labels": True}, None),
        ({**SMALL, "ignore_index": 0}, [{i: (i * 7) % 5 for i in range(6)}, {i: i % 3 for i in range(6)}]),
        ({**SMALL, "ignore_index": 255, "do_reduce_labels": True}, {i: i + 10 for i in range(7)}),
        ({"do_resize": False, "ignore_index": 3}, None),
    ],
)
def test_segmentation_maps_match_transformers(options, mapping):
    ours = ImageProcessor(**options)(IMAGES, MAPS, mapping)
    theirs = _hf(IMAGES, MAPS, mapping, **options)
    _assert_same(ours, theirs)
    assert all(len(m) > 0 for m in ours["mask_labels"])


def test_a_map_with_only_ignored_pixels_gives_no_masks():
    maps = [np.full(image.shape[:2], 255, np.uint8) for image in IMAGES]
    ours = ImageProcessor(**SMALL, ignore_index=255)(IMAGES, maps)
    _assert_same(ours, _hf(IMAGES, maps, **SMALL, ignore_index=255))
    assert ours["mask_labels"][0].shape == (0, *ours["pixel_values"].shape[2:])


def test_instance_ids_above_255_survive_resizing():
    labels = np.repeat(np.arange(300, dtype=np.int32)[None], 40, axis=0)  # [40, 300], one id per column
    out = ImageProcessor(size={"height": 40, "width": 600}, size_divisor=0)(np.zeros((40, 300, 3), np.uint8), labels)
    assert len(out["class_labels"][0]) == 300 and out["class_labels"][0].max() == 299


def test_encode_inputs_matches_transformers():
    # encode_inputs (HF 4.x API) pads processed pixel values and encodes maps: HF 5 does the same in preprocess
    # when it neither resizes nor rescales nor normalizes.
    values = [np.moveaxis(image, -1, 0).astype(np.float32) / 7 for image in IMAGES]
    plain = {"do_resize": False, "do_rescale": False, "do_normalize": False}
    theirs = _hf(values, MAPS, **plain, ignore_index=255, do_reduce_labels=True)
    ours = ImageProcessor(ignore_index=255).encode_inputs(values, MAPS, do_reduce_labels=True)
    _assert_same(ours, theirs)
    padding = ours["mask_labels"][1][:, -1, -1]  # the second image is padded; HF pads masks with ignore_index
    assert padding.tolist() == [255.0] * len(padding)


# -- fixed canvas --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("canvas", [(320, 320), (256, 384)])
def test_canvas_fits_keeps_aspect_ratio_and_pads(canvas):
    images = IMAGES + [RNG.integers(0, 256, (40, 400, 3), dtype=np.uint8)]
    out = ImageProcessor(**SMALL)(images, canvas=canvas)
    assert out["pixel_values"].shape == (3, 3, *canvas)
    np.testing.assert_array_equal(out["original_sizes"], [image.shape[:2] for image in images])
    for i, image in enumerate(images):
        mask = out["pixel_mask"][i]
        height, width = int(mask.any(axis=1).sum()), int(mask.any(axis=0).sum())
        assert mask.sum() == height * width  # a top-left rectangle
        assert height == canvas[0] or width == canvas[1]  # fitted: one side touches the canvas
        aspect = image.shape[0] / image.shape[1]
        assert abs(height / width - aspect) < 2 * aspect / min(height, width)  # rounding to whole pixels only
        # the image region is what HF makes when resizing to exactly that size
        region = _hf(image, size={"height": height, "width": width}, size_divisor=0)["pixel_values"][0]
        np.testing.assert_allclose(out["pixel_values"][i, :, :height, :width], region, rtol=0, atol=1e-5)
        assert not out["pixel_values"][i, :, height:].any() and not out["pixel_values"][i, :, :, width:].any()


def test_canvas_as_option_equals_canvas_per_call():
    by_option = ImageProcessor(**SMALL, canvas={"height": 256, "width": 384})(IMAGES)
    per_call = ImageProcessor(**SMALL)(IMAGES, canvas=(256, 384))
    for key in ("pixel_values", "pixel_mask", "original_sizes"):
        np.testing.assert_array_equal(by_option[key], per_call[key])


def test_canvas_must_be_a_multiple_of_size_divisor():
    with pytest.raises(ConfigError, match="multiple of size_divisor"):
        ImageProcessor(canvas=(300, 320))
    assert ImageProcessor(canvas=(300, 320), size_divisor=0).canvas == (300, 320)


def test_canvas_without_resizing_pads_only():
    out = ImageProcessor(do_resize=False)(IMAGES[1], canvas=(128, 96))
    assert out["pixel_mask"][0].sum() == 123 * 77
    with pytest.raises(InputError, match="does not fit canvas"):
        ImageProcessor(do_resize=False)(IMAGES[0], canvas=(128, 96))


# -- configuration -------------------------------------------------------------------------------------------------


def test_save_pretrained_is_loadable_by_transformers_and_back(tmp_path):
    options = {**SMALL, "ignore_index": 255, "do_reduce_labels": True, "num_labels": 133, "canvas": (256, 256)}
    ours = ImageProcessor(**options)
    path = ours.save_pretrained(tmp_path)
    assert path == tmp_path / "preprocessor_config.json"
    assert [p.name for p in tmp_path.iterdir()] == ["preprocessor_config.json"]  # no temporary file left
    saved = json.loads(path.read_text())
    assert saved["image_processor_type"] == "Mask2FormerImageProcessor"
    assert saved["canvas"] == {"height": 256, "width": 256}

    hf = transformers.AutoImageProcessor.from_pretrained(tmp_path)
    assert type(hf).__name__.startswith("Mask2FormerImageProcessor")
    assert dict(hf.size) == SMALL["size"] and hf.ignore_index == 255 and hf.do_reduce_labels is True

    again = ImageProcessor.from_pretrained(tmp_path)
    assert again.to_dict() == ours.to_dict()
    without_canvas = ImageProcessor.from_pretrained(tmp_path, canvas=None)
    _assert_same(without_canvas(IMAGES), _hf(IMAGES, **SMALL))


def test_legacy_hub_keys_are_mapped_like_transformers_4():
    legacy = {"size": 160, "max_size": 256, "size_divisibility": 32, "reduce_labels": True, "ignore_index": 255}
    processor = ImageProcessor(**legacy, image_processor_type="Mask2FormerImageProcessor")
    assert processor.size == {"shortest_edge": 160, "longest_edge": 256}
    assert processor.size_divisor == 32 and processor.do_reduce_labels is True
    assert ImageProcessor(size=384).size == {"shortest_edge": 384, "longest_edge": 1333}
    _assert_same(processor(IMAGES, MAPS), _hf(IMAGES, MAPS, **SMALL, do_reduce_labels=True, ignore_index=255))


def test_unknown_keys_are_kept_and_misspellings_flagged():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        processor = ImageProcessor(do_normalise=False, processor_class="Mask2FormerProcessor", custom_thing=3)
    assert [str(w.message) for w in caught] == [
        "unknown preprocessor option 'do_normalise' (did you mean 'do_normalize'?); kept as is"
    ]
    saved = processor.to_dict()
    assert saved["do_normalise"] is False and saved["custom_thing"] == 3 and saved["do_normalize"] is True


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"size": {"shortest_edge": 384}}, "size must be"),
        ({"size": "big"}, "size must be"),
        ({"resample": 9}, "resample"),
        ({"image_mean": [0.5, 0.5]}, "image_mean"),
        ({"image_std": [0.2, 0.0, 0.2]}, "image_std"),
        ({"do_resize": "yes"}, "do_resize must be true or false"),
        ({"size_divisor": -1}, "size_divisor"),
        ({"pad_size": {"height": 10}}, "pad_size"),
    ],
)
def test_invalid_options_raise_config_error(options, message):
    with pytest.raises(ConfigError, match=message):
        ImageProcessor(**options)


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(ConfigError, match="no preprocessor_config.json"):
        ImageProcessor.from_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read"):
        ImageProcessor.from_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        ImageProcessor.from_pretrained(tmp_path)


# -- bad inputs ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (np.zeros((0, 10, 3), np.uint8), r"images\[0\] has no pixels"),
        (np.zeros((10, 10, 5), np.uint8), r"images\[0\] has shape \(10, 10, 5\): cannot find a channel axis"),
        (np.zeros((10, 10, 3), np.complex64), r"images\[0\] has dtype complex64"),
        (np.array([[1, "a"], [2, "b"]], dtype=object), r"images\[0\] has dtype object"),
        ([IMAGES[1], "cat.jpg"], r"images\[1\] is a str"),
        ([], "images is empty"),
        (np.full((10, 10, 3), 300.5, np.float32), r"images\[0\] has fractional values in \[300.5, 300.5\]"),
        (np.full((10, 10, 3), np.nan, np.float32), "NaN"),
        (np.zeros((2, 2, 10, 10, 3), np.uint8), r"images\[0\] has shape \(2, 2, 10, 10, 3\); expected"),
    ],
)
def test_bad_images_raise_input_error(images, message):
    with pytest.raises(InputError, match=message):
        ImageProcessor(**SMALL)(images)


def test_bad_segmentation_maps_and_options_raise_input_error():
    processor = ImageProcessor(**SMALL, ignore_index=255)
    with pytest.raises(InputError, match="got 1 segmentation maps for 2 images"):
        processor(IMAGES, MAPS[:1])
    with pytest.raises(InputError, match=r"segmentation_maps\[1\] has size \(10, 10\) but its image has \(123, 77\)"):
        processor(IMAGES, [MAPS[0], np.zeros((10, 10), np.uint8)])
    with pytest.raises(InputError, match="non-integer"):
        processor(IMAGES[1], MAPS[1] + 0.5)
    with pytest.raises(InputError, match="no entry for instance id 5"):
        processor(IMAGES[1], MAPS[1], {i: 0 for i in range(5)})
    with pytest.raises(InputError, match=r"unknown option 'do_resise' \(did you mean 'do_resize'\?\)"):
        processor(IMAGES, do_resise=False)
    with pytest.raises(InputError, match="return_tensors='pt' is not supported"):
        processor(IMAGES, return_tensors="pt")
    with pytest.raises(ConfigError, match="do_reduce_labels needs ignore_index"):
        ImageProcessor(**SMALL, do_reduce_labels=True)(IMAGES, MAPS)


def test_processor_pickles_and_its_options_cannot_be_changed_by_accident():
    import pickle

    processor = ImageProcessor(**SMALL, canvas=(256, 256))
    processor.size["shortest_edge"] = 1  # a copy
    assert processor.size == SMALL["size"]
    assert pickle.loads(pickle.dumps(processor)).to_dict() == processor.to_dict()
