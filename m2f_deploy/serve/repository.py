"""A Triton Inference Server model repository from an artifact (``.onnx`` or TensorRT ``.engine``), no torch.

    DIR/
      m2f_model/        the artifact: onnxruntime_onnx (1/model.onnx) or tensorrt_plan (1/model.plan)
      m2f_preprocess/   Python backend: encoded image bytes -> pixel_values, pixel_mask, original_size
      m2f_postprocess/  Python backend: logits -> segmentation map + segments JSON (our numpy ImageProcessor)
      m2f/              ensemble: image + task in, segmentation + segments_info out
      README.md         how to run it (Triton container, one GPU, Kubernetes)

The model's tensors, dtypes and dims are read from the artifact itself (the ONNX graph's inputs and outputs; an
engine's optimization profile from its sidecar, its tensors from the ONNX it was built from), so graphs with fused
heads or a uint8 input get a right config too. The pre/post-processing ensemble needs the raw logits and a float
``pixel_values`` input; for other graphs only the model is written (with a note in the README).

Every ``config.pbtxt`` is parsed against Triton's own schema (``model_config_pb2`` from tritonclient, with
line:column errors) and checked for what the schema cannot catch (:func:`check_repository`).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from m2f_deploy.artifact import INPUT_NAME, OUTPUT_NAMES, read_engine_metadata, read_onnx_metadata
from m2f_deploy.errors import BackendError, InputError
from m2f_deploy.serve import protocol, triton_python

log = logging.getLogger("m2f_deploy.serve")

DEVICES = ("gpu", "cpu")
DEFAULT_MAX_BATCH = 8
DEFAULT_QUEUE_DELAY_US = 5000
MODEL, PREPROCESS, POSTPROCESS, ENSEMBLE = "m2f_model", "m2f_preprocess", "m2f_postprocess", protocol.MODEL_NAME

# ONNX TensorProto element types -> Triton data types (model_config.proto's DataType)
_ONNX_TYPES = {
    1: "TYPE_FP32", 2: "TYPE_UINT8", 3: "TYPE_INT8", 4: "TYPE_UINT16", 5: "TYPE_INT16", 6: "TYPE_INT32",
    7: "TYPE_INT64", 8: "TYPE_STRING", 9: "TYPE_BOOL", 10: "TYPE_FP16", 11: "TYPE_FP64", 12: "TYPE_UINT32",
    13: "TYPE_UINT64", 16: "TYPE_BF16",
}  # fmt: skip
_ORT_TYPES = {
    "tensor(float)": "TYPE_FP32", "tensor(uint8)": "TYPE_UINT8", "tensor(int8)": "TYPE_INT8",
    "tensor(uint16)": "TYPE_UINT16", "tensor(int16)": "TYPE_INT16", "tensor(int32)": "TYPE_INT32",
    "tensor(int64)": "TYPE_INT64", "tensor(string)": "TYPE_STRING", "tensor(bool)": "TYPE_BOOL",
    "tensor(float16)": "TYPE_FP16", "tensor(double)": "TYPE_FP64", "tensor(uint32)": "TYPE_UINT32",
    "tensor(uint64)": "TYPE_UINT64", "tensor(bfloat16)": "TYPE_BF16",
}  # fmt: skip


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output: its full dims, batch axis included (-1: dynamic)."""

    name: str
    data_type: str
    dims: tuple[int, ...]


@dataclass
class ArtifactIO:
    """What the artifact takes and gives, and how its batch axis behaves."""

    platform: str  # onnxruntime_onnx | tensorrt_plan
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    batch: tuple[int, int]  # (min, max) batch the artifact runs; max -1: unbounded
    opt_batch: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def raw(self) -> bool:
        """Raw logits out and float ``pixel_values`` in: what the pre/post-processing ensemble is written for."""
        names_out = {t.name for t in self.outputs}
        return (
            not self.meta.get("fused_heads")
            and set(OUTPUT_NAMES) <= names_out
            and [t.name for t in self.inputs] == [INPUT_NAME]
            and self.inputs[0].data_type == "TYPE_FP32"
        )


# -- reading the artifact --------------------------------------------------------------------------------------------


def onnx_graph_io(path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The graph's inputs and outputs (initializers excluded): with ``onnx`` where installed, else onnxruntime."""
    try:
        import onnx
    except ImportError:
        onnx = None
    if onnx is not None:
        model = onnx.load(str(path), load_external_data=False)
        init = {i.name for i in model.graph.initializer}

        def spec(v: Any) -> TensorSpec:
            t = v.type.tensor_type
            dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
            return TensorSpec(v.name, _triton_type(_ONNX_TYPES.get(t.elem_type), v.name, path), dims)

        return [spec(v) for v in model.graph.input if v.name not in init], [spec(v) for v in model.graph.output]
    from m2f_deploy.runtime.onnxrt import onnxruntime_module

    ort = onnxruntime_module()
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - e.g. a TensorRT plugin op that onnxruntime lacks
        raise BackendError(f"{path}: cannot read its inputs and outputs without the onnx package ({e})") from None

    def ort_spec(v: Any) -> TensorSpec:
        dims = tuple(d if isinstance(d, int) and d > 0 else -1 for d in v.shape)
        return TensorSpec(v.name, _triton_type(_ORT_TYPES.get(v.type), v.name, path), dims)

    return [ort_spec(v) for v in session.get_inputs()], [ort_spec(v) for v in session.get_outputs()]


def _triton_type(data_type: str | None, name: str, path: Path) -> str:
    if data_type is None:
        raise InputError(f"{path}: tensor {name!r} has a data type Triton cannot serve")
    return data_type


def read_artifact(path: str | os.PathLike) -> ArtifactIO:
    """The artifact's tensors and batch range (an ``.onnx`` file, or an ``.engine`` with its sidecar)."""
    path = Path(path)
    if path.suffix == ".engine":
        return _engine_io(path)
    meta = read_onnx_metadata(path)
    inputs, outputs = onnx_graph_io(path)
    inp = meta["input"]
    batch = (1, -1) if inp["dynamic_batch"] else (inp["batch"], inp["batch"])
    return ArtifactIO("onnxruntime_onnx", inputs, outputs, batch, meta=meta)


def _engine_io(path: Path) -> ArtifactIO:
    meta = read_engine_metadata(path)
    trt = meta["tensorrt"]
    low, opt, high = (list(trt["profile"][k]) for k in ("min", "opt", "max"))
    source = path.with_name(trt.get("onnx", {}).get("file", ""))
    if trt.get("onnx", {}).get("file") and source.is_file():
        inputs, outputs = onnx_graph_io(source)
    else:
        inputs, outputs = _io_from_metadata(meta, path)
    # the profile decides the engine's input dims: an axis whose min and max differ is dynamic
    profiled = tuple(lo if lo == hi else -1 for lo, hi in zip(low, high))
    inputs = [TensorSpec(t.name, t.data_type, profiled) if t.name == meta["input"]["name"] else t for t in inputs]
    if low[0] != high[0]:  # outputs share the batch axis
        outputs = [TensorSpec(t.name, t.data_type, (-1, *t.dims[1:])) for t in outputs]
    return ArtifactIO("tensorrt_plan", inputs, outputs, (low[0], high[0]), opt_batch=opt[0], meta=meta)


def _io_from_metadata(meta: dict[str, Any], path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Without the source ONNX beside the engine: the raw logits' dims follow from the metadata; others cannot."""
    inp = meta["input"]
    unknown = [name for name in meta["outputs"] if name not in OUTPUT_NAMES]
    if unknown or inp["name"] != INPUT_NAME:
        raise InputError(
            f"{path}: cannot tell the dims of {', '.join(unknown) or inp['name']} from the sidecar alone: put the ONNX "
            f"it was built from ({meta['tensorrt'].get('onnx', {}).get('file', '?')}) beside the engine"
        )
    q, c = meta["num_queries"], meta["num_labels"] + 1
    h = -1 if inp["dynamic_hw"] else inp["height"] // 4
    w = -1 if inp["dynamic_hw"] else inp["width"] // 4
    outputs = {"class_queries_logits": (-1, q, c), "masks_queries_logits": (-1, q, h, w)}
    return [TensorSpec(INPUT_NAME, "TYPE_FP32", (-1, 3, -1, -1))], [
        TensorSpec(name, "TYPE_FP32", outputs[name]) for name in meta["outputs"]
    ]


# -- the repository --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RepoOptions:
    """``m2f-export --triton-*``: instances and device of the model, its max batch and the batcher's delay."""

    instances: int = 1
    device: str = "gpu"
    max_batch: int | None = None  # default: the engine profile's max batch, or DEFAULT_MAX_BATCH for ONNX
    queue_delay_us: int = DEFAULT_QUEUE_DELAY_US

    def check(self) -> RepoOptions:
        if self.instances < 1:
            raise InputError(f"--triton-instances {self.instances}: at least 1")
        if self.device not in DEVICES:
            raise InputError(f"--triton-device {self.device!r}: choose one of {', '.join(DEVICES)}")
        if self.max_batch is not None and self.max_batch < 1:
            raise InputError(f"--triton-max-batch {self.max_batch}: at least 1")
        if self.queue_delay_us < 0:
            raise InputError(f"queue delay {self.queue_delay_us}: must be 0 or more")
        return self


def max_batch_size(io: ArtifactIO, options: RepoOptions, where: str) -> int:
    """Triton's ``max_batch_size``: 0 for a static batch (dims then carry the batch), else at most the engine's."""
    low, high = io.batch
    if low == high or low > 1:  # Triton batches from 1 up: a profile starting above 1 cannot take its requests
        if options.max_batch is not None:
            raise InputError(f"--triton-max-batch: {where} runs batch {low}..{high} only, Triton cannot batch it")
        return 0
    if options.max_batch is None:
        return high if high > 0 else DEFAULT_MAX_BATCH
    if high > 0 and options.max_batch > high:
        raise InputError(f"--triton-max-batch {options.max_batch}: {where} runs at most batch {high} (its profile)")
    return options.max_batch


def check_new_folder(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"--triton-repo {out}: exists and is not an empty folder (give a new one)")


def write_repository(
    artifact: str | os.PathLike, out: str | os.PathLike, options: RepoOptions | None = None, *, validate: str = "auto"
) -> Path:
    """Write the model repository of ``artifact`` to the new folder ``out`` (atomically: a temporary folder renamed).

    ``validate``: ``"auto"`` parses every config against Triton's schema when tritonclient is installed (else only
    our own checks run, and a warning says so), ``"always"`` requires it.
    """
    artifact, out = Path(artifact), Path(out)
    options = (options or RepoOptions()).check()
    if not artifact.is_file():
        raise InputError(f"{artifact}: no such file")
    check_new_folder(out)
    io = read_artifact(artifact)
    if io.platform == "tensorrt_plan" and options.device != "gpu":
        raise InputError(f"--triton-device cpu: {artifact.name} is a TensorRT engine, which runs on a GPU only")
    mb = max_batch_size(io, options, artifact.name)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        configs = _write(tmp, artifact, io, options, mb)
        check_repository(tmp, io, schema=validate)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote the Triton model repository %s (%s)", out, ", ".join(configs))
    return out


def _write(root: Path, artifact: Path, io: ArtifactIO, options: RepoOptions, mb: int) -> list[str]:
    written = [MODEL]
    version = root / MODEL / "1"
    version.mkdir(parents=True)
    if io.platform == "tensorrt_plan":
        shutil.copyfile(artifact, version / "model.plan")
    else:
        shutil.copyfile(artifact, version / "model.onnx")
        data = artifact.with_name(artifact.name + ".data")  # external weights keep the name the graph refers to
        if data.is_file():
            shutil.copyfile(data, version / data.name)
    (root / MODEL / "config.pbtxt").write_text(model_config(io, options, mb), encoding="utf-8")
    ensemble = io.raw and mb > 0
    if ensemble:
        for name, step in ((PREPROCESS, "Preprocess"), (POSTPROCESS, "Postprocess")):
            folder = root / name / "1"
            folder.mkdir(parents=True)
            (folder / "model.py").write_text(triton_python.model_py(step), encoding="utf-8")
            (folder / triton_python.METADATA_FILE).write_text(triton_python.metadata_json(io.meta), encoding="utf-8")
        (root / PREPROCESS / "config.pbtxt").write_text(preprocess_config(io, options, mb), encoding="utf-8")
        (root / POSTPROCESS / "config.pbtxt").write_text(postprocess_config(io, options, mb), encoding="utf-8")
        (root / ENSEMBLE / "1").mkdir(parents=True)
        (root / ENSEMBLE / "config.pbtxt").write_text(ensemble_config(io, mb), encoding="utf-8")
        written += [PREPROCESS, POSTPROCESS, ENSEMBLE]
    (root / "README.md").write_text(readme(artifact, io, options, mb, ensemble), encoding="utf-8")
    return written


# -- config.pbtxt text -----------------------------------------------------------------------------------------------


def _dims(spec: TensorSpec, mb: int) -> tuple[int, ...]:
    return spec.dims[1:] if mb > 0 else spec.dims


def _tensor(spec: TensorSpec, dims: tuple[int, ...]) -> str:
    if not dims:  # a batch-only tensor (a fused head's per-image threshold): Triton refuses empty dims, its documented
        # form is dims [1] reshaped to [] (the model sees [B])
        return f'  {{ name: "{spec.name}" data_type: {spec.data_type} dims: [ 1 ] reshape: {{ shape: [ ] }} }}'
    return f'  {{ name: "{spec.name}" data_type: {spec.data_type} dims: [ {", ".join(map(str, dims))} ] }}'


def _tensors(kind: str, specs: list[TensorSpec], mb: int) -> str:
    return f"{kind} [\n" + ",\n".join(_tensor(s, _dims(s, mb)) for s in specs) + "\n]\n"


def _batcher(mb: int, options: RepoOptions, preferred: list[int]) -> str:
    if mb <= 0:
        return ""
    pref = f"  preferred_batch_size: [ {', '.join(map(str, preferred))} ]\n" if preferred else ""
    return f"dynamic_batching {{\n{pref}  max_queue_delay_microseconds: {options.queue_delay_us}\n}}\n"


def model_config(io: ArtifactIO, options: RepoOptions, mb: int) -> str:
    """The artifact's config: platform, max batch, tensors, instances, batcher and the accelerator options."""
    kind = "KIND_GPU" if options.device == "gpu" else "KIND_CPU"
    preferred = sorted({b for b in (io.opt_batch, mb) if b and 1 < b <= mb})
    text = (
        f'name: "{MODEL}"\nplatform: "{io.platform}"\nmax_batch_size: {mb}\n'
        + _tensors("input", io.inputs, mb)
        + _tensors("output", io.outputs, mb)
        + f"instance_group [ {{ count: {options.instances} kind: {kind} }} ]\n"
        + _batcher(mb, options, preferred)
    )
    static_hw = all(d > 0 for d in io.inputs[0].dims[1:])
    if io.platform == "tensorrt_plan" and static_hw:
        # CUDA graphs: captured per batch size by Triton's TensorRT backend; only for a fixed input size
        text += "optimization { cuda { graphs: true } }\n"
    elif io.platform == "onnxruntime_onnx" and options.device == "gpu":
        precision = "FP16" if io.meta.get("precision") == "fp16" else "INT8" if io.meta.get("precision") == "int8" else "FP32"
        text += (
            "optimization { execution_accelerators { gpu_execution_accelerator: [ { name: \"tensorrt\"\n"
            f'  parameters {{ key: "precision_mode" value: "{precision}" }} }} ] }} }}\n'
        )
    return text


def _hw(io: ArtifactIO) -> tuple[int, int]:
    dims = io.inputs[0].dims
    return dims[2], dims[3]


def preprocess_config(io: ArtifactIO, options: RepoOptions, mb: int) -> str:
    h, w = _hw(io)
    return (
        f'name: "{PREPROCESS}"\nbackend: "python"\nmax_batch_size: {mb}\n'
        f'input [ {{ name: "image" data_type: TYPE_STRING dims: [ 1 ] }} ]\n'
        "output [\n"
        f'  {{ name: "{INPUT_NAME}" data_type: TYPE_FP32 dims: [ 3, {h}, {w} ] }},\n'
        f'  {{ name: "pixel_mask" data_type: TYPE_INT64 dims: [ {h}, {w} ] }},\n'
        '  { name: "original_size" data_type: TYPE_INT64 dims: [ 2 ] }\n]\n'
        f"instance_group [ {{ count: {options.instances} kind: KIND_CPU }} ]\n"
    )


def postprocess_config(io: ArtifactIO, options: RepoOptions, mb: int) -> str:
    h, w = _hw(io)
    logits = [s for s in io.outputs if s.name in OUTPUT_NAMES]
    return (
        f'name: "{POSTPROCESS}"\nbackend: "python"\nmax_batch_size: {mb}\n'
        "input [\n"
        + "".join(_tensor(s, _dims(s, mb)) + ",\n" for s in logits)
        + f'  {{ name: "pixel_mask" data_type: TYPE_INT64 dims: [ {h}, {w} ] }},\n'
        '  { name: "original_size" data_type: TYPE_INT64 dims: [ 2 ] },\n'
        '  { name: "task" data_type: TYPE_STRING dims: [ 1 ] },\n'
        + _threshold_inputs()
        + "]\n"
        "output [\n"
        '  { name: "segmentation" data_type: TYPE_INT64 dims: [ -1, -1 ] },\n'
        '  { name: "segments_info" data_type: TYPE_STRING dims: [ 1 ] }\n]\n'
        f"instance_group [ {{ count: {options.instances} kind: KIND_CPU }} ]\n"
    )


def _threshold_inputs() -> str:
    """The post-processing thresholds, optional: a request without one gets transformers' default (Triton passes
    an optional input the client left out to no step, and the Python step sees None)."""
    return ",\n".join(f'  {{ name: "{k}" data_type: TYPE_FP32 dims: [ 1 ] optional: true }}'
                       for k in protocol.THRESHOLDS) + "\n"  # fmt: skip


def _step(model: str, inputs: list[str], outputs: list[str]) -> str:
    maps = "".join(f'    input_map {{ key: "{n}" value: "{n}" }}\n' for n in inputs)
    maps += "".join(f'    output_map {{ key: "{n}" value: "{n}" }}\n' for n in outputs)
    return f'  {{\n    model_name: "{model}"\n    model_version: -1\n{maps}  }}'


def ensemble_config(io: ArtifactIO, mb: int) -> str:
    steps = [
        _step(PREPROCESS, ["image"], [INPUT_NAME, "pixel_mask", "original_size"]),
        _step(MODEL, [INPUT_NAME], list(OUTPUT_NAMES)),
        _step(POSTPROCESS, [*OUTPUT_NAMES, "pixel_mask", "original_size", "task", *protocol.THRESHOLDS],
              ["segmentation", "segments_info"]),
    ]
    return (
        f'name: "{ENSEMBLE}"\nplatform: "ensemble"\nmax_batch_size: {mb}\n'
        "input [\n"
        '  { name: "image" data_type: TYPE_STRING dims: [ 1 ] },\n'
        '  { name: "task" data_type: TYPE_STRING dims: [ 1 ] },\n'
        + _threshold_inputs()
        + "]\n"
        "output [\n"
        '  { name: "segmentation" data_type: TYPE_INT64 dims: [ -1, -1 ] },\n'
        '  { name: "segments_info" data_type: TYPE_STRING dims: [ 1 ] },\n'
        # the preprocessing step's sizes, so that a client sending several images in one request can cut each
        # padded map back to its image
        '  { name: "original_size" data_type: TYPE_INT64 dims: [ 2 ] }\n]\n'
        "ensemble_scheduling {\n  step [\n" + ",\n".join(steps) + "\n  ]\n}\n"
    )


# -- checks ----------------------------------------------------------------------------------------------------------


def model_config_schema() -> Any:
    """Triton's ``ModelConfig`` message (tritonclient ships Triton's model_config.proto, compiled)."""
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError as e:
        raise BackendError(f"Triton's config schema comes with tritonclient ({e}): pip install 'tritonclient[grpc]'") from None
    return model_config_pb2


def parse_config(path: Path) -> Any:
    """``config.pbtxt`` parsed against Triton's schema; a :class:`InputError` with line:column where it does not."""
    from google.protobuf import text_format

    schema = model_config_schema()
    try:
        return text_format.Parse(path.read_text(encoding="utf-8"), schema.ModelConfig())
    except text_format.ParseError as e:
        raise InputError(f"{path}:{e}") from None


def check_repository(root: str | os.PathLike, io: ArtifactIO | None = None, *, schema: str = "always") -> list[str]:
    """Parse every ``config.pbtxt`` under ``root`` against Triton's schema and check what it cannot catch.

    Our checks: the folder name is the model's name and holds a version folder with the file its platform loads;
    preferred batch sizes are within 1..max_batch_size; the model's tensors (names, types, dims) are the
    artifact's (``io``); every ensemble step names a model of the repository and tensors that model has. Returns
    the models checked; raises :class:`InputError` on the first problem. ``schema``: ``"always"`` or ``"auto"``
    (skipped, with a warning, where tritonclient is not installed).
    """
    root = Path(root)
    try:
        model_config_schema()
    except BackendError:
        if schema == "always":
            raise
        log.warning("warning: tritonclient is not installed: the configs were not parsed against Triton's schema")
        return []
    configs = {p.parent.name: parse_config(p) for p in sorted(root.glob("*/config.pbtxt"))}
    if not configs:
        raise InputError(f"{root}: no model folder with a config.pbtxt")
    for folder, config in configs.items():
        where = f"{root / folder / 'config.pbtxt'}"
        if config.name != folder:
            raise InputError(f"{where}: name {config.name!r} is not its folder's name {folder!r}")
        _check_files(root / folder, config, where)
        mb = config.max_batch_size
        preferred = list(config.dynamic_batching.preferred_batch_size)
        if config.HasField("dynamic_batching") and mb <= 0:
            raise InputError(f"{where}: dynamic_batching needs max_batch_size > 0")
        bad = [b for b in preferred if not 1 <= b <= mb]
        if bad:
            raise InputError(f"{where}: preferred_batch_size {bad} outside 1..max_batch_size ({mb})")
        for tensor in [*config.input, *config.output]:
            if not tensor.dims:  # Triton's loader refuses it ("must specify 'dims'"); the schema parses it
                raise InputError(f"{where}: tensor {tensor.name!r} has no dims (a batch-only tensor: dims [ 1 ] "
                                 "reshape { shape: [ ] })")  # fmt: skip
            if any(d == 0 or d < -1 for d in tensor.dims):
                raise InputError(f"{where}: tensor {tensor.name!r} has dims {list(tensor.dims)} (> 0 or -1 only)")
        if folder == MODEL and io is not None:
            _check_against_artifact(config, io, where)
    for folder, config in configs.items():
        if config.platform == "ensemble":
            _check_ensemble(config, configs, f"{root / folder / 'config.pbtxt'}")
    return list(configs)


def _check_files(folder: Path, config: Any, where: str) -> None:
    expected = {"onnxruntime_onnx": "model.onnx", "tensorrt_plan": "model.plan"}.get(config.platform)
    if config.backend == "python":
        expected = "model.py"
    versions = [p for p in folder.iterdir() if p.is_dir() and p.name.isdigit()]
    if not versions:
        raise InputError(f"{where}: no version folder (1/) beside it")
    for v in versions:
        if expected and not (v / expected).is_file():
            raise InputError(f"{where}: {v.name}/{expected} is missing")


def _check_against_artifact(config: Any, io: ArtifactIO, where: str) -> None:
    if config.platform != io.platform:
        raise InputError(f"{where}: platform {config.platform!r}, the artifact needs {io.platform!r}")
    mb = config.max_batch_size
    for kind, have, want in (("input", config.input, io.inputs), ("output", config.output, io.outputs)):
        got = {t.name: t for t in have}
        if set(got) != {s.name for s in want}:
            raise InputError(f"{where}: {kind}s {sorted(got)}, the artifact's are {sorted(s.name for s in want)}")
        schema = model_config_schema()
        for spec in want:
            t = got[spec.name]
            type_name = schema.DataType.Name(t.data_type)
            if type_name != spec.data_type:
                raise InputError(f"{where}: {spec.name} is {type_name}, the artifact's is {spec.data_type}")
            dims = tuple(t.reshape.shape) if t.HasField("reshape") else tuple(t.dims)  # what the model sees
            if dims != _dims(spec, mb):
                raise InputError(
                    f"{where}: {spec.name} has dims {list(dims)}, the artifact's are {list(_dims(spec, mb))} "
                    f"(max_batch_size {mb})"
                )
    low, high = io.batch
    if mb > 0 and (low > 1 or (high > 0 and mb > high)):
        raise InputError(f"{where}: max_batch_size {mb}, the artifact runs batch {low}..{high}")


def _check_ensemble(config: Any, configs: dict[str, Any], where: str) -> None:
    produced = {t.name for t in config.input}
    optional = {t.name for t in config.input if t.optional}
    for step in config.ensemble_scheduling.step:
        model = configs.get(step.model_name)
        if model is None:
            raise InputError(f"{where}: step model {step.model_name!r} is not in the repository")
        if model.max_batch_size != config.max_batch_size:
            raise InputError(f"{where}: {step.model_name} has max_batch_size {model.max_batch_size}, "
                             f"the ensemble {config.max_batch_size}")  # fmt: skip
        ins, outs = {t.name for t in model.input}, {t.name for t in model.output}
        for key, value in step.input_map.items():
            if key not in ins:
                raise InputError(f"{where}: {step.model_name} has no input {key!r}")
            if value not in produced:
                raise InputError(f"{where}: {step.model_name}'s input {key!r} reads {value!r}, which nothing before it gives")
            if value in optional and not next(t for t in model.input if t.name == key).optional:
                # a request leaving the input out would reach the step without it, and fail there
                raise InputError(f"{where}: the optional input {value!r} feeds {step.model_name}'s required "
                                 f"input {key!r}")  # fmt: skip
        missing = ins - set(step.input_map)
        if missing:
            raise InputError(f"{where}: {step.model_name}'s inputs {sorted(missing)} are not mapped")
        for key, value in step.output_map.items():
            if key not in outs:
                raise InputError(f"{where}: {step.model_name} has no output {key!r}")
            produced.add(value)
    missing = {t.name for t in config.output} - produced
    if missing:
        raise InputError(f"{where}: ensemble outputs {sorted(missing)} are produced by no step")


# -- README ----------------------------------------------------------------------------------------------------------


def readme(artifact: Path, io: ArtifactIO, options: RepoOptions, mb: int, ensemble: bool) -> str:
    gpu = options.device == "gpu"
    image = "nvcr.io/nvidia/tritonserver:<yy.mm>-py3"
    what = (
        f"- `{ENSEMBLE}` (ensemble): send `image` (BYTES [1]: an encoded PNG/JPEG file) and `task` (BYTES [1]: "
        "`semantic`, `instance` or `panoptic`, the same for every image of a request); get `segmentation` (INT64 "
        "[H, W], the image's own size; label ids for semantic, segment ids otherwise, -1 where none) and "
        "`segments_info` (BYTES [1], the JSON segment list of "
        "`Segmenter.predict`, `[]` for semantic) and `original_size` (INT64 [2]: height, width). Optional FP32 [1] "
        "inputs `threshold`, `mask_threshold`, `overlap_mask_area_threshold` (numbers in [0, 1]) set the "
        "post-processing's thresholds per image; left out, transformers' defaults (0.5, 0.5, 0.8). Images of one request are padded to the largest: cut each map to its `original_size`.\n"
        f"- `{PREPROCESS}`, `{POSTPROCESS}` (Python backend): m2f-deploy's numpy ImageProcessor.\n"
        if ensemble
        else "- No pre/post-processing ensemble: it is written for graphs with the raw logits, a float `pixel_values` "
        "input and a dynamic batch; this one "
        + ("has fused heads or another input" if not io.raw else "has a static batch")
        + ": send the model's own tensors.\n"
    )
    tensors = "\n".join(f"  - {kind} `{t.name}` {t.data_type} {list(t.dims)}"
                        for kind, specs in (("input", io.inputs), ("output", io.outputs)) for t in specs)  # fmt: skip
    plugins = io.meta.get("tensorrt", {}).get("plugin_libraries") or []
    return f"""# Triton model repository for {artifact.name}

Written by `m2f-export --triton-repo` (m2f-deploy). Models:

- `{MODEL}` ({io.platform}): the artifact, max_batch_size {mb}, {options.instances} instance(s) on the
  {"GPU" if gpu else "CPU"}{", dynamic batching" if mb > 0 else ""}. Tensors (batch axis first, -1 dynamic):
{tensors}
{what}
## One GPU, with the Triton container

    docker run --rm --gpus 1 -p 8000:8000 -p 8001:8001 -p 8002:8002 \\
      -v $PWD/{'<this folder>'}:/models {image} \\
      bash -c "pip install m2f-deploy && tritonserver --model-repository=/models"

Use the container release whose TensorRT {"(" + io.meta["tensorrt"]["version"] + ") " if io.platform == "tensorrt_plan" else ""}matches the
engine: an engine runs only on the TensorRT version and GPU architecture it was built for. {"The engine needs these plugin libraries: " + ", ".join(plugins) + " (tritonserver --backend-config=tensorrt,plugins=...). " if plugins else ""}The Python models
need `pip install m2f-deploy` in the container (numpy and Pillow only; no torch).
Check readiness with `curl localhost:8000/v2/health/ready`; metrics are on port 8002.

## Kubernetes (not run by us: written from Triton's documentation)

Put this folder on a volume (or object storage that `--model-repository` reads), run the container above as a
Deployment with `nvidia.com/gpu: 1` per pod, readiness and liveness probes on `/v2/health/ready` and
`/v2/health/live` (port 8000), and a Service in front of ports 8000/8001. Scale replicas on the metrics
(`nv_inference_queue_duration_us`). Every node's GPU must match the engine's (one repository per GPU kind).
"""


def main(argv: list[str] | None = None) -> int:
    """``python -m m2f_deploy.serve.repository DIR [ARTIFACT]``: check a repository (and its model against ARTIFACT)."""
    import sys

    from m2f_deploy.cli.common import run

    def check(args: list[str] | None) -> int:
        args = sys.argv[1:] if args is None else args
        if not 1 <= len(args) <= 2:
            raise InputError("usage: python -m m2f_deploy.serve.repository DIR [ARTIFACT]")
        io = read_artifact(args[1]) if len(args) == 2 else None
        print("ok:", ", ".join(check_repository(args[0], io)))
        return 0

    return run("m2f_deploy.serve.repository", check, argv)


if __name__ == "__main__":
    raise SystemExit(main())
