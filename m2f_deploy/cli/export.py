"""m2f-export: a checkpoint (or an architecture preset) -> a validated ONNX graph (-> a TensorRT engine).

Given an ``.onnx`` file instead of a checkpoint, it builds the TensorRT engine from it (no PyTorch needed).
"""

from __future__ import annotations

import errno
import logging
import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from m2f_deploy.artifact import HW_MULTIPLE
from m2f_deploy.cli.common import Parser, height_width, run, setup_logging
from m2f_deploy.errors import InputError, OutputError

log = logging.getLogger("m2f_deploy.cli")


def build_parser() -> Parser:
    from m2f_deploy.presets import PRESETS

    p = Parser(
        prog="m2f-export",
        description="Export a Mask2Former checkpoint to ONNX and check it against PyTorch.",
        epilog="Example: m2f-export ./mask2former-swin-tiny-coco-panoptic --fp16 -o model.onnx",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("checkpoint", nargs="?",
                     help="Hugging Face checkpoint folder or hub id; or an .onnx file from m2f-export to build an engine")
    src.add_argument("--preset", help=f"an architecture with RANDOM weights, for latency work: {', '.join(PRESETS)}")
    z = p.add_argument_group("original (detectron2) checkpoints: model_final.pkl / .pth")
    z.add_argument("--zoo-config", metavar="NAME",
                   help="the checkpoint's model-zoo config, e.g. coco-panoptic/maskformer2_R50_bs16_50ep (README: "
                        "Model zoo)")
    z.add_argument("--num-queries", type=int, metavar="N", help="with --zoo-config: override its number of queries")
    z.add_argument("--labels", type=Path, metavar="JSON",
                   help="with --zoo-config: override its class names (a JSON list of names, in output order)")
    p.add_argument("-o", "--output", type=Path, help="output .onnx file (default: <checkpoint name>[-fp16].onnx)")
    p.add_argument("--size", type=int, nargs="+", default=[384], metavar=("H", "W"),
                   help=f"export height and width, multiples of {HW_MULTIPLE} (default: 384 384)")
    p.add_argument("--batch", type=int, default=1, help="export batch size (default: 1)")
    p.add_argument("--static-batch", action="store_true", help="fix the batch axis (default: dynamic)")
    p.add_argument("--dynamic-shape", action="store_true", help=f"dynamic height and width (multiples of {HW_MULTIPLE})")
    p.add_argument("--msda", default="grid_sample",
                   help="deformable attention: grid_sample (default), gather (no GridSample), trt_plugin, "
                        "deform_conv (fastest on onnxruntime CPU; static size, opset 19)")
    p.add_argument("--exporter", default="torchscript", help="torchscript (default) or dynamo")
    p.add_argument("--opset", type=int, default=None,
                   help="ONNX opset (default: 17; 18 with --exporter dynamo; 19 for --msda deform_conv)")
    p.add_argument("--fp16", action="store_true", help="fp16 graph with fp32 islands; inputs and outputs stay fp32")
    p.add_argument("--heads", default="raw", choices=("raw", "semantic", "instance", "panoptic"),
                   help="raw (default: the logits), or that post-processing in the graph: it returns maps and "
                        "segment tables, thresholds as inputs (see README 'Fused heads')")
    p.add_argument("--head-size", type=int, nargs=2, metavar=("H", "W"),
                   help="size of a fused head's maps (default: the input size)")
    p.add_argument("--input", default="float32", choices=("float32", "uint8"), dest="input_dtype",
                   help="float32 (default: normalised NCHW pixel_values) or uint8 (NHWC uint8 images + pixel_mask, "
                        "normalised in the graph; static size)")
    # --heads / --input on an .onnx from m2f-export rewrite that graph (no checkpoint needed)
    p.add_argument("--cleanup", default="auto", help="graph clean-up: auto (default), ort, onnxslim, none")
    p.add_argument("--no-validate", action="store_true", help="skip the comparison with PyTorch")
    p.add_argument("--atol", action="append", default=[], metavar="OUTPUT=TOL",
                   help="max abs error allowed for an output, e.g. masks_queries_logits=0.1 (repeatable)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random validation inputs and preset weights")
    p.add_argument("-q", "--quiet", action="store_true", help="only errors")
    q = p.add_argument_group("INT8 (QDQ) quantization")
    q.add_argument("--int8", action="store_true",
                   help="with --calib: an INT8 QDQ graph (from a checkpoint or an fp32 .onnx); without: an INT8 "
                        "TensorRT engine from an already quantized .onnx")
    q.add_argument("--calib", type=Path, metavar="DIR", help="calibration images (a folder) for --int8")
    q.add_argument("--calib-limit", type=int, default=None, metavar="N", help="use the first N calibration images")
    q.add_argument("--calib-method", default="minmax", help="minmax (default), percentile or entropy")
    q.add_argument("--int8-target", choices=("cpu", "tensorrt"), default=None,
                   help="where the INT8 graph runs: cpu (onnxruntime; uint8 activations) or tensorrt (int8 "
                        "symmetric activations); default: tensorrt with --engine, else cpu")
    q.add_argument("--min-agreement", type=float, default=0.95, metavar="SHARE",
                   help="the INT8 gate: least share of semantic pixels equal to fp32 on calibration images (0.95)")
    trt = p.add_argument_group("TensorRT engine (needs TensorRT and a GPU)")
    trt.add_argument("--engine", action="store_true",
                     help="also build a TensorRT engine (<output>.engine + .engine.json); implied for an .onnx input, "
                          "unless --check-tensorrt or --calib is given")
    trt.add_argument("--shapes", nargs=3, metavar=("MIN", "OPT", "MAX"),
                     help="optimization profile as BxCxHxW, e.g. 1x3x384x384 4x3x384x384 8x3x384x384 "
                          "(default: dynamic batch 1..8; dynamic size half to twice the export size)")
    trt.add_argument("--workspace", type=float, metavar="GIB", help="builder workspace limit in GiB (default: TensorRT's)")
    trt.add_argument("--timing-cache", type=Path, metavar="FILE", help="read and update this timing cache")
    trt.add_argument("--plugin-lib", action="append", default=[], metavar="SO",  # str: Path drops a "./"
                     help="load a TensorRT plugin library (repeatable); the built-in MSDA plugin needs none")
    trt.add_argument("--no-fp32-layers", action="store_true",
                     help="TensorRT 10.0-10.11: let fp16/int8 engines run LayerNorm and the cross-attention softmax "
                          "in reduced precision (strongly typed builds take the graph's types)")
    trt.add_argument("--tf32", action="store_true",
                     help="allow TF32 kernels for float32 layers (Ampere and newer; default off: fp32 means fp32)")
    c = p.add_argument_group("static TensorRT check (no TensorRT needed)")
    c.add_argument("--check-tensorrt", action="store_true",
                   help="check every node of the graph (an .onnx, or the one just exported) against TensorRT's "
                        "documented ONNX support (after quantizing, with --calib); print the findings, exit 1 on any "
                        "refusal; builds nothing unless --engine is given")
    c.add_argument("--trt-version", action="append", metavar="X.Y",
                   help="TensorRT version(s) to check for (repeatable; default: 10.3, 10.16, 11.x)")
    c.add_argument("--trt-plugin-version", type=int, choices=(1, 2), default=None,
                   help="--msda trt_plugin: MultiscaleDeformableAttnPlugin_TRT version, 1 (default; TensorRT 10 "
                        "and 11, JetPack 6) or 2 (TensorRT >= 10.11)")
    t = p.add_argument_group("Triton Inference Server model repository (also from an existing .onnx or .engine)")
    t.add_argument("--triton-repo", type=Path, metavar="DIR",
                   help="write a Triton model repository of the result (the engine if one is built) to the new folder "
                        "DIR: the model, pre/post-processing and an ensemble, configs checked against Triton's schema")
    t.add_argument("--triton-instances", type=int, default=None, metavar="N", help="model instances (default: 1)")
    t.add_argument("--triton-device", choices=("gpu", "cpu"), default=None,
                   help="where the model's instances run (default: gpu)")
    t.add_argument("--triton-max-batch", type=int, default=None, metavar="N",
                   help="Triton's max_batch_size (default: the engine profile's max batch; 8 for ONNX)")
    return p


def _triton_options(args):
    """The repository options, or None without --triton-repo (its other flags then are an error)."""
    given = [f"--triton-{n.replace('_', '-')}" for n in ("instances", "device", "max_batch")
             if getattr(args, f"triton_{n}") is not None]  # fmt: skip
    if args.triton_repo is None:
        if given:
            raise InputError(f"{', '.join(given)}: option(s) of the Triton repository without --triton-repo DIR")
        return None
    from m2f_deploy.serve.repository import RepoOptions, check_new_folder

    check_new_folder(args.triton_repo)  # before anything slow
    return RepoOptions(instances=1 if args.triton_instances is None else args.triton_instances,
                       device=args.triton_device or "gpu",
                       max_batch=args.triton_max_batch).check()  # fmt: skip


def _triton_repo(artifact: Path, args, options) -> int:
    from m2f_deploy.serve.repository import write_repository

    print(repository := write_repository(artifact, args.triton_repo, options))
    _WRITTEN.append(str(repository))
    return 0


def _tolerances(items: list[str]) -> dict[str, float]:
    from m2f_deploy.artifact import OUTPUT_NAMES

    out = {}
    for item in items:
        name, _, value = item.partition("=")
        if name not in OUTPUT_NAMES:
            raise InputError(f"--atol {item}: unknown output {name!r} (outputs: {', '.join(OUTPUT_NAMES)})")
        try:
            out[name] = float(value)
        except ValueError:
            raise InputError(f"--atol {item}: {value!r} is not a number") from None
    return out


_WRITTEN: list[str] = []  # what this run has published, for a true message when it is interrupted after that


def main(argv: list[str] | None = None) -> int:
    _WRITTEN.clear()
    try:
        return _main(argv)
    except KeyboardInterrupt:  # SIGINT, or SIGTERM through cli.common.run
        if not _WRITTEN:
            raise  # cli.common.run: "interrupted; nothing was written"
        print(f"m2f-export: interrupted; written (complete): {', '.join(_WRITTEN)}; the steps after it were not "
              "finished", file=sys.stderr)  # fmt: skip
        return 130


def _main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.quiet)
    height, width = height_width(args.size)
    tolerances = _tolerances(args.atol)

    engine_args = dict(
        fp16=args.fp16, int8=args.int8, tf32=args.tf32, shapes=args.shapes, workspace_gib=args.workspace,
        timing_cache=args.timing_cache, plugin_libraries=args.plugin_lib, fp32_layers=not args.no_fp32_layers,
    )  # fmt: skip
    if args.trt_version:
        if not args.check_tensorrt:
            raise InputError("--trt-version is for --check-tensorrt (a build checks for the installed TensorRT)")
        from m2f_deploy.export.trt_support import parse_trt_version

        for version in args.trt_version:
            parse_trt_version(version)  # bad input before anything slow
    if args.trt_plugin_version is not None and args.msda != "trt_plugin":
        raise InputError(f"--trt-plugin-version is for --msda trt_plugin (the plugin's version), not {args.msda}")
    from_onnx = bool(args.checkpoint) and str(args.checkpoint).endswith(".onnx")
    zoo_flags = [f for f, v in (("--zoo-config", args.zoo_config), ("--num-queries", args.num_queries),
                                ("--labels", args.labels)) if v is not None]  # fmt: skip
    if zoo_flags and str(args.checkpoint).endswith((".onnx", ".engine")):  # those routes never read them
        raise InputError(f"{' / '.join(zoo_flags)}: for an original (detectron2) .pkl / .pth checkpoint, not for "
                         f"{args.checkpoint} (an exported graph carries its own classes and queries)")
    triton = _triton_options(args)
    if args.checkpoint and str(args.checkpoint).endswith(".engine"):
        if triton is None:
            raise InputError(f"{args.checkpoint}: an engine is already built; an .engine input is for --triton-repo DIR")
        return _triton_repo(Path(args.checkpoint), args, triton)
    if args.heads == "raw" and args.head_size:
        raise InputError("--head-size is for --heads semantic|instance|panoptic (the size of their maps)")
    if from_onnx and (args.heads != "raw" or args.input_dtype != "float32"):  # rewrite an exported graph
        return _fuse_onnx(args, triton)
    if (args.heads != "raw" or args.input_dtype != "float32") and args.engine:
        raise InputError("--heads / --input uint8 with --engine: engines of such graphs are not built yet (their "
                         "extra inputs need profiles); run the .onnx with backend ort-tensorrt")  # fmt: skip
    calibration = _calibration_images(args)
    # an .onnx input is built into an engine unless it is only checked, quantized or put in a Triton repository
    # (then --engine builds it too)
    build = args.engine or (from_onnx and not args.check_tensorrt and not calibration and triton is None)
    _check_engine_flags(args, build, from_onnx, calibration, height, width)
    if from_onnx:
        onnx_path, engine_output = Path(args.checkpoint), args.output
        if calibration:
            onnx_path = args.output or Path(str(args.checkpoint)[: -len(".onnx")] + "-int8.onnx")
            engine_output = None
            with writing(onnx_path):
                _quantize(Path(args.checkpoint), onnx_path, calibration, args)
            _WRITTEN.append(str(onnx_path))
        if args.check_tensorrt and _check_tensorrt(onnx_path, args.trt_version):
            return 1  # the graph that would be built is the one checked
        engine = _engine_from_onnx(onnx_path, engine_output, engine_args) if build else None
        return _triton_repo(engine or onnx_path, args, triton) if triton else 0
    if args.int8 and not calibration:
        raise InputError("--int8 from a checkpoint needs calibration images: --calib DIR")
    if args.engine:
        from m2f_deploy.export.tensorrt import check_tensorrt

        check_tensorrt()  # before the slow export
    from m2f_deploy.export import export_onnx
    from m2f_deploy.export.onnx_export import check_export_args, check_output_path, default_opset

    zoo = _zoo_config(args)
    name = args.preset or Path(str(args.checkpoint).rstrip("/")).name
    if zoo is not None:
        name = Path(str(args.checkpoint)).stem
    if args.int8 and args.fp16:
        raise InputError("--int8 and --fp16: the INT8 graph is quantized from fp32 (give one of them)")
    head = ("" if args.heads == "raw" else f"-{args.heads}") + ("-uint8" if args.input_dtype == "uint8" else "")
    output = args.output or Path(f"{name}{head}{'-fp16' if args.fp16 else '-int8' if args.int8 else ''}.onnx")
    # check everything that is cheap before the (slow) model load
    check_export_args(height, width, args.batch, args.msda, args.exporter,
                      args.opset or default_opset(args.exporter, args.msda), dynamic_hw=args.dynamic_shape)  # fmt: skip
    from m2f_deploy.export.heads import check_head_args

    check_head_args(args.heads, args.head_size, dynamic_hw=args.dynamic_shape, int8=args.int8)
    if args.input_dtype == "uint8" and (args.dynamic_shape or args.int8):
        raise InputError("--input uint8 needs a static size and is not combined with --int8 yet: "
                         "drop --dynamic-shape / --int8")  # fmt: skip
    check_output_path(output)
    report_stale_temporaries(output.parent)

    if args.preset:
        from m2f_deploy.modeling import Mask2Former
        from m2f_deploy.presets import preset_config

        model = Mask2Former.random(preset_config(args.preset), seed=args.seed)
        log.warning("WARNING: preset %s has RANDOM weights: its outputs mean nothing (latency work only)", args.preset)
    else:
        from m2f_deploy import load_model

        log.info("loading %s ...", args.checkpoint)
        model = load_model(args.checkpoint, zoo_config=zoo)
    fp32_output = output.with_name(f".{output.stem}-fp32.onnx") if calibration else output
    with writing(output):
        export_onnx(
            model, fp32_output, height=height, width=width, batch=args.batch, dynamic_batch=not args.static_batch,
            dynamic_hw=args.dynamic_shape, msda=args.msda, opset=args.opset, fp16=args.fp16,
            exporter=args.exporter, cleanup=args.cleanup, validate=not args.no_validate, tolerances=tolerances,
            seed=args.seed, heads=args.heads, head_size=args.head_size, input_dtype=args.input_dtype,
            **({"trt_plugin_version": args.trt_plugin_version} if args.trt_plugin_version is not None else {}),
        )  # fmt: skip
        if calibration:
            try:
                _quantize(fp32_output, output, calibration, args)
            finally:
                fp32_output.unlink(missing_ok=True)
                fp32_output.with_name(fp32_output.name + ".data").unlink(missing_ok=True)
    print(output)
    _WRITTEN.append(str(output))
    if args.check_tensorrt and _check_tensorrt(output, args.trt_version):
        return 1
    engine = None
    if args.engine:
        from m2f_deploy.export.tensorrt import build_engine

        print(engine := build_engine(output, **engine_args))
        _WRITTEN.append(str(engine))
    return _triton_repo(engine or output, args, triton) if triton else 0


_TEMPORARIES = (".m2f-export-*", ".m2f-int8-*", ".m2f-trt-*", ".*.onnx.*.tmp", ".*-fp32.onnx")


@contextmanager
def writing(output: Path) -> Iterator[None]:
    """A file-system failure while the graph is written (a full disk, a quota, a folder made read-only) as one
    :class:`OutputError` naming ``output``; the export's temporary folder is already gone, nothing was published."""
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EACCES, errno.EFBIG):
            raise
        raise OutputError(f"-o {output}: cannot write ({e.strerror}); nothing was written") from None


def report_stale_temporaries(folder: Path) -> list[Path]:
    """Warn about temporary files and folders an export killed by SIGKILL (or a power cut) left in ``folder``:
    they are hidden and can be large. They are reported, not removed: another m2f-export may be using them now."""
    found = sorted({p for pattern in _TEMPORARIES for p in folder.glob(pattern)})
    if found:
        size = sum(f.stat().st_size for p in found for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file())
        log.warning("%s: %d temporary item(s) (%.1f MB) left by an interrupted m2f-export: %s; remove them unless "
                    "another m2f-export is running there", folder, len(found), size / 1e6,
                    ", ".join(p.name for p in found))  # fmt: skip
    return found


def _zoo_config(args):
    """The model-zoo config of a detectron2 checkpoint (with its overrides), or None; checked before the load."""
    if args.zoo_config is None:
        if args.num_queries is not None or args.labels is not None:
            raise InputError("--num-queries and --labels override a --zoo-config (give one)")
        return None
    if args.preset or str(args.checkpoint).endswith(".onnx"):
        raise InputError("--zoo-config is for an original (detectron2) .pkl / .pth checkpoint")
    from m2f_deploy.zoo import zoo_config

    id2label = None
    if args.labels is not None:
        import json

        try:
            names = json.loads(args.labels.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise InputError(f"--labels {args.labels}: not a readable JSON file ({e})") from None
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise InputError(f"--labels {args.labels}: expected a JSON list of class names")
        id2label = dict(enumerate(names))
    return zoo_config(args.zoo_config, num_queries=args.num_queries, id2label=id2label)


# engine-only options: without a build they would be ignored silently
_ENGINE_FLAGS = (("--tf32", "tf32"), ("--plugin-lib", "plugin_lib"), ("--timing-cache", "timing_cache"),
                 ("--workspace", "workspace"), ("--shapes", "shapes"), ("--no-fp32-layers", "no_fp32_layers"))  # fmt: skip


def _check_engine_flags(args, build: bool, from_onnx: bool, calibration: list[Path], height: int, width: int) -> None:
    """One clear error for engine options given without a build; the build's own options (--workspace, --shapes)
    checked before anything slow (an export, a quantization)."""
    given = [flag for flag, name in _ENGINE_FLAGS if getattr(args, name)]
    if from_onnx:  # for an .onnx input these describe the engine (with --calib, --int8 and -o are the quantization's)
        given += ["--fp16"] if args.fp16 else []
        given += [flag for flag, name in (("--int8", "int8"), ("-o", "output")) if getattr(args, name) and not calibration]
    if given and not build:
        why = "--check-tensorrt only checks the graph" if args.check_tensorrt else "no engine is built"
        raise InputError(f"{', '.join(given)}: engine option(s) without an engine build ({why}): add --engine")
    if not build:
        return
    if args.workspace is not None and not (math.isfinite(args.workspace) and args.workspace > 0):
        raise InputError(f"--workspace must be a positive number of GiB, got {args.workspace}")
    if from_onnx and not calibration and args.output is not None and args.output.suffix != ".engine":
        raise InputError(f"-o {args.output}: an engine built from {Path(args.checkpoint).name} is written to a "
                         ".engine file")  # fmt: skip
    if args.shapes:
        from m2f_deploy.export.tensorrt import profile_shapes

        if from_onnx:
            from m2f_deploy.artifact import read_onnx_metadata

            meta = read_onnx_metadata(Path(args.checkpoint))
        else:  # the graph the export will write
            meta = {"input": {"batch": args.batch, "height": height, "width": width, "hw_multiple": HW_MULTIPLE,
                              "dynamic_batch": not args.static_batch, "dynamic_hw": args.dynamic_shape}}  # fmt: skip
        profile_shapes(meta, args.shapes)


def _calibration_images(args) -> list[Path]:
    if args.int8_target and not args.calib:
        raise InputError("--int8-target is for --int8 --calib DIR (it says how the graph is quantized)")
    if args.calib is None:
        return []
    if not args.int8:
        raise InputError("--calib is for --int8 (calibration images of the INT8 quantization)")
    from m2f_deploy.runtime.images import find_images

    images = find_images([args.calib])
    return images[: args.calib_limit] if args.calib_limit else images


def _quantize(fp32: Path, output: Path, images: list[Path], args) -> None:
    from m2f_deploy.cli.common import Progress
    from m2f_deploy.export.int8 import quantize_int8

    progress = Progress(len(images), "calibration images", quiet=args.quiet)
    target = args.int8_target or ("tensorrt" if args.engine else "cpu")
    quantize_int8(fp32, output, images, method=args.calib_method, min_agreement=args.min_agreement, target=target,
                  progress=lambda done, total: progress.step())  # fmt: skip
    progress.close()


def _check_tensorrt(onnx_path: Path, versions: list[str] | None) -> int:
    """Print the static TensorRT check of ``onnx_path``; 1 when it found anything TensorRT would refuse."""
    from m2f_deploy.export.trt_support import check_tensorrt_support

    report = check_tensorrt_support(onnx_path, versions)
    print(report.format())
    return 0 if report.ok else 1


def _fuse_onnx(args, triton) -> int:
    from m2f_deploy.export.heads import fuse_onnx

    if args.engine or args.calib or args.int8:
        raise InputError("--heads / --input on an .onnx: writes the rewritten .onnx only (no --engine, --int8, --calib)")
    from m2f_deploy.export.uint8_input import uint8_onnx

    source = Path(args.checkpoint)
    suffix = ("" if args.heads == "raw" else f"-{args.heads}") + ("-uint8" if args.input_dtype == "uint8" else "")
    output = args.output or source.with_name(f"{source.stem}{suffix}.onnx")
    validate = not args.no_validate
    from m2f_deploy.export.onnx_export import check_output_path

    check_output_path(output)
    with writing(output):
        if args.heads == "raw":
            uint8_onnx(source, output, validate=validate, seed=args.seed)
        elif args.input_dtype == "uint8":
            import tempfile

            with tempfile.TemporaryDirectory(prefix=".m2f-export-", dir=output.parent) as tmpdir:
                fused = fuse_onnx(source, Path(tmpdir) / output.name, args.heads, head_size=args.head_size,
                                  validate=validate, seed=args.seed)  # fmt: skip
                uint8_onnx(fused, output, validate=validate, seed=args.seed)
        else:
            fuse_onnx(source, output, args.heads, head_size=args.head_size, validate=validate, seed=args.seed)
    print(output)
    _WRITTEN.append(str(output))
    if args.check_tensorrt and _check_tensorrt(output, args.trt_version):
        return 1
    return _triton_repo(output, args, triton) if triton else 0


def _engine_from_onnx(onnx_path: Path, output: Path | None, engine_args: dict) -> Path:
    from m2f_deploy.artifact import read_onnx_metadata
    from m2f_deploy.export.tensorrt import build_engine

    if read_onnx_metadata(onnx_path)["fused_heads"]:
        raise InputError(f"{onnx_path}: has a fused head; engines of fused-head graphs are not built yet (their "
                         "threshold inputs need profiles): run it with backend ort-tensorrt")  # fmt: skip

    # build_engine checks its arguments, then the graph against TensorRT's ONNX support, then looks for TensorRT
    print(engine := build_engine(onnx_path, output, **engine_args))
    _WRITTEN.append(str(engine))
    return Path(engine)


def entry() -> None:
    sys.exit(run("m2f-export", main))


if __name__ == "__main__":
    entry()
