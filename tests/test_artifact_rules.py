"""The artifact contract, rule by rule: every metadata rule has a case where only it fails (no torch, no export).

Expectations are written out here, independently of the parser (not the parser's output compared with itself);
ONNX files are written with the ``onnx`` package's own protobuf classes, not with our reader's knowledge.
"""

from __future__ import annotations

import copy
import json

import onnx
import pytest
from onnx import TensorProto, helper

from m2f_deploy import artifact
from m2f_deploy.artifact import (
    FORMAT_VERSION,
    METADATA_KEY,
    REQUIRED,
    build_metadata,
    check_engine_compatible,
    engine_sidecar_path,
    parse_metadata,
    read_engine_metadata,
    read_onnx_metadata,
    read_onnx_metadata_props,
)
from m2f_deploy.errors import InputError

ARGS = dict(
    id2label={2: "sky", 0: "cat", 1: "dog"},
    num_queries=7,
    preprocessing={"do_resize": False},
    height=64,
    width=96,
    batch=2,
    dynamic_batch=True,
    dynamic_hw=False,
    msda="gather",
    precision="fp16",
    source={"sha256": "ab"},
    exporter={"opset": 17},
    fused_heads=("semantic",),
)
EXPECTED = {
    "format_version": 1,
    "id2label": {"0": "cat", "1": "dog", "2": "sky"},
    "num_labels": 3,
    "num_queries": 7,
    "preprocessing": {"do_resize": False},
    "input": {"name": "pixel_values", "layout": "NCHW float32, normalised", "batch": 2, "height": 64, "width": 96,
              "dynamic_batch": True, "dynamic_hw": False, "hw_multiple": 32},
    "outputs": ["class_queries_logits", "masks_queries_logits"],
    "msda": "gather",
    "precision": "fp16",
    "fused_heads": ["semantic"],
    "source": {"sha256": "ab"},
    "exporter": {"opset": 17},
}  # fmt: skip


def test_constants_are_the_documented_contract():
    assert (METADATA_KEY, FORMAT_VERSION) == ("m2f_deploy", 1)
    assert (artifact.INPUT_NAME, artifact.HW_MULTIPLE) == ("pixel_values", 32)
    assert REQUIRED == ("format_version", "id2label", "num_queries", "preprocessing", "input", "outputs", "msda",
                        "precision", "fused_heads", "source", "exporter")  # fmt: skip
    assert artifact.DEFAULT_PREPROCESSING == {
        "do_resize": True, "size": {"shortest_edge": 800, "longest_edge": 1333}, "size_divisor": 32, "resample": 2,
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225], "ignore_index": None, "do_reduce_labels": False,
    }  # fmt: skip


def test_build_metadata_writes_every_field():
    meta = build_metadata(**ARGS)
    assert meta == EXPECTED
    assert list(meta["id2label"]) == ["0", "1", "2"]  # sorted by id
    assert build_metadata(**{k: v for k, v in ARGS.items() if k != "fused_heads"})["fused_heads"] == []


def test_parse_metadata_against_written_out_expectations():
    meta = parse_metadata(json.dumps(EXPECTED), "m.onnx")
    assert meta["id2label"] == {0: "cat", 1: "dog", 2: "sky"}  # int keys again
    assert {k: v for k, v in meta.items() if k != "id2label"} == {k: v for k, v in EXPECTED.items() if k != "id2label"}


def test_no_entry_and_bad_json_are_named():
    with pytest.raises(InputError) as e:
        parse_metadata(None, "x.onnx")
    assert str(e.value) == "x.onnx: no 'm2f_deploy' metadata entry (not exported by m2f-export)"
    with pytest.raises(InputError, match=r"^x.onnx: 'm2f_deploy' metadata: not valid JSON"):
        parse_metadata("{", "x.onnx")
    with pytest.raises(InputError, match=r"^x.onnx: 'm2f_deploy' metadata: expected a JSON object"):
        parse_metadata("[1]", "x.onnx")


@pytest.mark.parametrize("key", REQUIRED)
def test_each_required_key_missing_is_refused(key):
    meta = {k: v for k, v in EXPECTED.items() if k != key}
    with pytest.raises(InputError) as e:
        parse_metadata(json.dumps(meta), "m.onnx")
    assert str(e.value) == f"m.onnx: 'm2f_deploy' metadata lacks {key}"


def test_all_missing_keys_are_listed():
    with pytest.raises(InputError) as e:
        parse_metadata(json.dumps({"format_version": 1, "msda": "gather"}), "m.onnx")
    missing = [k for k in REQUIRED if k not in ("format_version", "msda")]
    assert str(e.value) == f"m.onnx: 'm2f_deploy' metadata lacks {', '.join(missing)}"


def _edited(**changes):
    """EXPECTED with top-level keys replaced; ``input_<key>`` replaces (or, with ``...``, drops) an input key."""
    meta = copy.deepcopy(EXPECTED)
    for key, value in changes.items():
        target, key = (meta["input"], key[6:]) if key.startswith("input_") else (meta, key)
        if value is ...:
            del target[key]
        else:
            target[key] = value
    return json.dumps(meta)


LONG = "x" * 100
WRONG_TYPES = [  # (edit, what the one error says after "m.onnx: 'm2f_deploy' metadata: ")
    (dict(format_version="1"), 'format_version must be an integer, got "1"'),
    (dict(format_version=True), "format_version must be an integer, got true"),  # a JSON bool is not a number here
    (dict(num_queries=7.0), "num_queries must be an integer, got 7.0"),
    (dict(id2label=["cat"]), 'id2label must be an object, got ["cat"]'),
    (dict(preprocessing=None), "preprocessing must be an object, got null"),
    (dict(input=[]), "input must be an object, got []"),
    (dict(outputs="logits"), 'outputs must be a list, got "logits"'),
    (dict(msda=1), "msda must be a string, got 1"),
    (dict(precision=["fp16"]), 'precision must be a string, got ["fp16"]'),
    (dict(fused_heads="semantic"), 'fused_heads must be a list, got "semantic"'),
    (dict(fused_heads=["semantic", "depth"]), 'fused_heads lists "depth"; expected semantic, instance or panoptic'),
    (dict(fused_heads=[LONG]), f"fused_heads lists {json.dumps(LONG)[:60]}; expected semantic, instance or panoptic"),
    (dict(num_queries=[LONG]), f"num_queries must be an integer, got {json.dumps([LONG])[:60]}"),
    (dict(input_batch=...), "input lacks batch"),
    (dict(input_dynamic_hw=...), "input lacks dynamic_hw"),
    (dict(input_batch=2.0), "input.batch must be an integer, got 2.0"),
    (dict(input_width=False), "input.width must be an integer, got false"),
    (dict(input_dynamic_batch=1), "input.dynamic_batch must be true or false, got 1"),
    (dict(input_dynamic_hw="no"), 'input.dynamic_hw must be true or false, got "no"'),
    (dict(input_batch=0), "input.batch must be at least 1, got 0"),
    (dict(input_height=-64), "input.height must be at least 1, got -64"),
    (dict(input_width=0), "input.width must be at least 1, got 0"),
    (dict(input_hw_multiple="32"), 'input.hw_multiple must be an integer, got "32"'),
    (dict(input_hw_multiple=0), "input.hw_multiple must be at least 1, got 0"),
    (dict(id2label={"0": "cat", "x": "dog"}), "id2label key 'x' is not a class id (0, 1, ...)"),
    (dict(id2label={"0": "cat", "01": "dog"}), "id2label key '01' is not a class id (0, 1, ...)"),
    (dict(id2label={"0": "cat", "\u0661": "dog"}), "id2label key '\u0661' is not a class id (0, 1, ...)"),  # Arabic 1
    (dict(id2label={"0": "cat", "-1": "dog"}), "id2label key '-1' is not a class id (0, 1, ...)"),
    (dict(id2label={"0": "cat", "1": 5}), "id2label[1] must be a string, got 5"),
    (dict(id2label={"0": [LONG]}), f"id2label[0] must be a string, got {json.dumps([LONG])[:60]}"),
    (dict(id2label={}), "id2label is empty"),
    (dict(id2label={"0": "a", "2": "b", "5": "c"}), "id2label must name classes 0..2; it lacks [1, 3, 4]"),
    (dict(id2label={"0": "a", "9": "b"}), "id2label must name classes 0..1; it lacks [1, 2, 3, 4, 5]"),
    (dict(id2label={"1": "a"}), "id2label must name classes 0..0; it lacks [0]"),
]


@pytest.mark.parametrize(("edit", "message"), WRONG_TYPES, ids=[f"{next(iter(e))}-{i}" for i, (e, _) in enumerate(WRONG_TYPES)])
def test_each_wrong_type_or_value_is_one_error_naming_the_key(edit, message):
    with pytest.raises(InputError) as e:
        parse_metadata(_edited(**edit), "m.onnx")
    assert str(e.value) == f"m.onnx: 'm2f_deploy' metadata: {message}"


def test_what_the_type_rules_accept():
    meta = parse_metadata(_edited(msda="x" * 100, input_hw_multiple=1, fused_heads=["panoptic"]), "m.onnx")
    assert meta["input"]["hw_multiple"] == 1 and meta["fused_heads"] == ["panoptic"]
    meta = parse_metadata(_edited(input_hw_multiple=..., input_batch=1), "m.onnx")  # hw_multiple is optional
    assert "hw_multiple" not in meta["input"] and meta["input"]["batch"] == 1


def test_a_newer_format_version_is_refused_an_equal_or_older_one_read():
    with pytest.raises(InputError) as e:
        parse_metadata(json.dumps({**EXPECTED, "format_version": 2}), "m.onnx")
    assert str(e.value) == ("m.onnx: metadata format 2 is newer than this m2f-deploy understands (1); "
                            "upgrade m2f-deploy")  # fmt: skip
    assert parse_metadata(json.dumps({**EXPECTED, "format_version": 1}), "m")["format_version"] == 1
    assert parse_metadata(json.dumps({**EXPECTED, "format_version": 0}), "m")["format_version"] == 0


# -- reading the entry from ONNX files written by the onnx package -------------------------------------------------
def _model(props: dict[str, str] | None = None, graph: bool = True) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, [1, 3, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 4])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["pixel_values"], ["y"])], "g", [x], [y]))
    if not graph:
        model.ClearField("graph")
    for k, v in (props or {}).items():
        model.metadata_props.add(key=k, value=v)
    return model


def test_read_props_as_onnx_wrote_them(tmp_path):
    path = tmp_path / "m.onnx"
    props = {METADATA_KEY: json.dumps(EXPECTED), "other": "ü", "": "empty key"}
    onnx.save(_model(props), str(path))
    assert read_onnx_metadata_props(path) == props
    assert read_onnx_metadata(path)["id2label"] == {0: "cat", 1: "dog", 2: "sky"}
    onnx.save(_model({"other": "x"}), str(path))
    with pytest.raises(InputError) as e:
        read_onnx_metadata(path)
    assert str(e.value) == f"{path}: no 'm2f_deploy' metadata entry (not exported by m2f-export)"


def test_entries_without_a_key_or_a_value(tmp_path):
    """Protobuf leaves empty strings out: an entry may hold only a value (empty key) or only a key (empty value)."""
    path = tmp_path / "m.onnx"
    body = _model().SerializeToString()
    only_value = bytes([0x72, 0x03, 0x12, 0x01]) + b"v"
    only_key = bytes([0x72, 0x03, 0x0A, 0x01]) + b"k"
    path.write_bytes(body + only_value + only_key)
    assert read_onnx_metadata_props(path) == {"": "v", "k": ""}
    assert onnx.load(str(path)).metadata_props[1].key == "k"  # what onnx reads too


def test_unknown_fixed_width_and_varint_fields_are_skipped(tmp_path):
    """Protobuf lets a writer add fields; the reader skips them by wire type (fixed64: 8 bytes, fixed32: 4)."""
    body = _model({METADATA_KEY: json.dumps(EXPECTED)}).SerializeToString()
    # field 100 fixed64, field 101 fixed32, field 102 a multi-byte varint, all before the real fields
    extra = bytes([0xA1, 0x06]) + b"\x0e" * 8 + bytes([0xAD, 0x06]) + b"\x0e" * 4 + bytes([0xB0, 0x06, 0xFF, 0x01])
    assert onnx.load_from_string(extra + body).metadata_props[0].key == METADATA_KEY  # still a valid model
    path = tmp_path / "m.onnx"
    path.write_bytes(extra + body)
    assert read_onnx_metadata(path)["num_queries"] == 7
    # a fixed32 field last: exactly 4 bytes to skip, not 8 (which would run past the end)
    path.write_bytes(body + bytes([0xAD, 0x06]) + b"\x0e" * 4)
    assert read_onnx_metadata(path)["num_queries"] == 7


def test_file_errors_name_the_file(tmp_path):
    path = tmp_path / "m.onnx"
    with pytest.raises(InputError) as e:
        read_onnx_metadata_props(path)
    assert str(e.value) == f"{path}: no such file"
    with pytest.raises(InputError) as e:
        read_onnx_metadata_props(tmp_path)  # a folder
    assert str(e.value) == f"{tmp_path}: cannot read (Is a directory)"
    body = _model({METADATA_KEY: json.dumps(EXPECTED)}).SerializeToString()
    for cut in (len(body) - 3, len(body) // 2):
        path.write_bytes(body[:cut])
        with pytest.raises(InputError) as e:
            read_onnx_metadata_props(path)
        assert str(e.value) == f"{path}: truncated ONNX file (it ends inside a field; re-export or re-copy it)"
    path.write_bytes(body[:1] + b"\x80")  # a varint cut in the middle
    with pytest.raises(InputError, match="truncated ONNX file"):
        read_onnx_metadata_props(path)
    path.write_bytes(_model(graph=False).SerializeToString())
    with pytest.raises(InputError) as e:
        read_onnx_metadata_props(path)
    assert str(e.value) == f"{path}: not an ONNX model (it holds no graph)"
    path.write_bytes(b"")
    with pytest.raises(InputError, match="holds no graph"):
        read_onnx_metadata_props(path)


@pytest.mark.parametrize(
    "data",
    [
        bytes([0x0B]) + b"junk",  # wire type 3 (start group)
        bytes([0x08]) + b"\xff" * 11,  # a varint longer than 64 bits
        bytes([0x72, 0x02, 0x08, 0x01]),  # a metadata entry holding a varint field
        bytes([0x72, 0x03, 0x0A, 0x01, 0xFF]),  # a metadata key that is not UTF-8
    ],
)
def test_not_onnx(tmp_path, data):
    path = tmp_path / "m.onnx"
    path.write_bytes(_model().SerializeToString() + data)
    with pytest.raises(InputError) as e:
        read_onnx_metadata_props(path)
    assert str(e.value) == f"{path}: not an ONNX model (cannot parse it as one)"


def test_varint_decoding():
    import io

    assert artifact._varint(io.BytesIO(b"").read) is None
    assert artifact._varint(io.BytesIO(b"\x96\x01").read) == 150
    assert artifact._varint(io.BytesIO(b"\xff" * 9 + b"\x01").read) == 2**64 - 1  # ten bytes: the longest allowed
    with pytest.raises(EOFError):
        artifact._varint(io.BytesIO(b"\x96").read)
    with pytest.raises(ValueError) as e:
        artifact._varint(io.BytesIO(b"\xff" * 10 + b"\x01").read)
    assert str(e.value) == "varint too long"
    assert artifact._fields(bytes([0x0A, 0x01]) + b"k" + bytes([0x12, 0x00])) == {1: "k", 2: ""}


# -- engines: sidecar and compatibility ------------------------------------------------------------------------------
TRT = {"version": "10.3.0", "gpu": "Orin", "compute_capability": "8.7", "profile": {}}


def _engine(tmp_path, sidecar: dict | str | None):
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"plan")
    if sidecar is not None:
        engine_sidecar_path(engine).write_text(sidecar if isinstance(sidecar, str) else json.dumps(sidecar))
    return engine


def test_engine_sidecar(tmp_path):
    assert engine_sidecar_path(tmp_path / "m.engine") == tmp_path / "m.engine.json"
    engine = _engine(tmp_path, {**EXPECTED, "tensorrt": TRT})
    meta = read_engine_metadata(engine)
    assert meta["tensorrt"] == TRT and meta["id2label"][2] == "sky"
    with pytest.raises(InputError) as e:
        read_engine_metadata(tmp_path / "none.engine")
    assert str(e.value) == f"{tmp_path / 'none.engine'}: no such file"
    engine_sidecar_path(engine).unlink()
    with pytest.raises(InputError) as e:
        read_engine_metadata(engine)
    assert str(e.value) == (f"{engine}: its sidecar m.engine.json is missing (engines are built with m2f-export "
                            "--engine, which writes both)")  # fmt: skip
    engine_sidecar_path(engine).write_bytes(b"\xff\xfe")
    with pytest.raises(InputError, match=r"m.engine.json: cannot read"):
        read_engine_metadata(engine)


@pytest.mark.parametrize("drop", [None, "version", "gpu", "compute_capability", "profile"])
def test_engine_sidecar_needs_a_complete_tensorrt_section(tmp_path, drop):
    meta = copy.deepcopy(EXPECTED)
    if drop is not None:
        meta["tensorrt"] = {k: v for k, v in TRT.items() if k != drop}
    engine = _engine(tmp_path, meta)
    with pytest.raises(InputError) as e:
        read_engine_metadata(engine)
    assert str(e.value) == (f"{engine_sidecar_path(engine)}: no 'tensorrt' section with version, gpu, "
                            "compute_capability and profile")  # fmt: skip
    engine = _engine(tmp_path, {**EXPECTED, "tensorrt": "10.3"})
    with pytest.raises(InputError, match="no 'tensorrt' section"):
        read_engine_metadata(engine)


def test_engine_sidecar_follows_the_metadata_rules(tmp_path):
    engine = _engine(tmp_path, {**EXPECTED, "format_version": 2, "tensorrt": TRT})
    with pytest.raises(InputError) as e:
        read_engine_metadata(engine)
    assert str(e.value).startswith(f"{engine_sidecar_path(engine)}: metadata format 2 is newer than")


def test_engine_compatibility():
    meta = {"tensorrt": TRT}
    check_engine_compatible(meta, "e", tensorrt_version="10.3.0", gpu="another name", compute_capability="8.7")
    with pytest.raises(InputError) as e:
        check_engine_compatible(meta, "e", tensorrt_version="10.4.0", gpu="Orin", compute_capability="8.7")
    assert str(e.value) == ("e: built with TensorRT 10.3.0, this is TensorRT 10.4.0; rebuild the engine here "
                            "(m2f-export MODEL.onnx --engine)")  # fmt: skip
    with pytest.raises(InputError) as e:
        check_engine_compatible(meta, "e", tensorrt_version="10.3.0", gpu="H200", compute_capability="9.0")
    assert str(e.value) == ("e: built for Orin (compute capability 8.7), this GPU is H200 (9.0); rebuild the engine "
                            "on this GPU (m2f-export MODEL.onnx --engine)")  # fmt: skip
