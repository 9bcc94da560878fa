"""m2f-validate: accuracy of an artifact or a checkpoint on a COCO-format dataset, and agreement with PyTorch.

The dataset is a folder as ``m2f_deploy.data.write_dataset`` writes it (``panoptic.json``, ``instances.json``,
``images/``, ``panoptic/``, ``semantic/``). An artifact runs through the runtime (no PyTorch needed unless a
reference is compared); a checkpoint runs as the PyTorch model with the checkpoint's own preprocessing. Agreement:
the PyTorch reference on the same preprocessed inputs, so that only the export's differences show.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from m2f_deploy.artifact import INPUT_NAME
from m2f_deploy.cli.common import Parser, Progress, run, setup_logging
from m2f_deploy.errors import InputError
from m2f_deploy.runtime import TASKS

log = logging.getLogger("m2f_deploy.cli")


def build_parser() -> Parser:
    p = Parser(
        prog="m2f-validate",
        description="PQ / mIoU / mask AP of an exported model (or a checkpoint) on a COCO-format dataset.",
        epilog="Example: m2f-validate model-fp16.onnx --data synthetic-val --reference ./checkpoint --json acc.json",
    )
    p.add_argument("model", type=Path, help="an .onnx / .engine artifact, or a checkpoint folder (PyTorch)")
    p.add_argument("--data", type=Path, required=True, help="dataset folder (m2f_deploy.data.write_dataset layout)")
    p.add_argument("--task", default="all", choices=("all", *TASKS), help="metrics to compute (default: all)")
    p.add_argument(
        "--reference",
        type=Path,
        help="checkpoint to measure agreement with (default: the artifact's source checkpoint, if found)",
    )
    p.add_argument("--backend", default="auto", help="runtime backend for artifacts (default: auto)")
    p.add_argument("--limit", type=int, default=None, help="only the first N images")
    p.add_argument("--threshold", type=float, default=0.5, help="segment score threshold (default: 0.5)")
    p.add_argument("--json", type=Path, help="write the metrics here")
    p.add_argument("-q", "--quiet", action="store_true", help="only the table and errors")
    return p  # fmt: skip


Predict = Callable[[np.ndarray], tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]  # image -> outputs, inputs


def _artifact_predictor(path: Path, backend: str) -> tuple[Predict, Any, dict[str, Any], dict[int, str]]:
    from m2f_deploy.runtime import Segmenter

    seg = Segmenter(path, backend)

    def predict(image: np.ndarray) -> tuple[dict, dict]:
        inputs = seg.processor.preprocess(image)  # float pixel_values: the reference model's input, sizes and mask
        if seg.uint8:  # a graph exported with --input uint8 takes the image's bytes and their mask
            u8 = seg.processor.preprocess_uint8(image)
            inputs["feed"] = (u8["images"], u8["pixel_mask"])
        else:
            inputs["feed"] = (inputs[INPUT_NAME],)
        return seg.infer(*inputs["feed"]), inputs

    about = {"artifact": str(path), "backend": seg.description, "precision": seg.metadata["precision"]}
    if seg.head:  # a fused head: its outputs, decoded in evaluate()
        about["fused_head"] = seg.head
        predict.segmenter = seg  # type: ignore[attr-defined]
    return predict, seg.processor, about, seg.id2label


def _torch_outputs(model: Any, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
    import torch

    from m2f_deploy.modeling import numpy_logits

    with torch.inference_mode():
        return numpy_logits(model(torch.from_numpy(pixel_values)))


def _checkpoint_predictor(path: Path) -> tuple[Predict, Any, dict[str, Any], dict[int, str]]:
    from m2f_deploy import load_model
    from m2f_deploy.processing import ImageProcessor

    model = load_model(path)
    config = path / "preprocessor_config.json"
    processor = ImageProcessor.from_pretrained(path) if config.is_file() else ImageProcessor()

    def predict(image: np.ndarray) -> tuple[dict, dict]:
        inputs = processor.preprocess(image)
        return _torch_outputs(model, inputs[INPUT_NAME]), inputs

    about = {"checkpoint": str(path), "backend": "PyTorch (reference model)", "precision": "fp32"}
    return predict, processor, about, model.config.id2label


def _reference(args: Any, meta_source: dict[str, Any] | None) -> Any:
    candidate = args.reference or (meta_source or {}).get("checkpoint")
    if candidate is None:
        return None
    candidate = Path(candidate)
    if not (candidate / "config.json").is_file():
        if args.reference:
            raise InputError(f"--reference {candidate}: not a checkpoint folder (no config.json)")
        log.warning(
            "the artifact's source checkpoint %s is not here: no agreement measured (see --reference)", candidate
        )
        return None
    from m2f_deploy import load_model

    return load_model(candidate)


def evaluate(args: Any) -> dict[str, Any]:
    from m2f_deploy import evaluation
    from m2f_deploy.data import load_dataset
    from m2f_deploy.export.agreement import matched_segments, semantic_agreement

    dataset = load_dataset(args.data)
    records = list(dataset)[: args.limit] if args.limit else list(dataset)
    if not records:
        raise InputError(f"{args.data}: the dataset has no images")
    is_artifact = args.model.suffix in (".onnx", ".engine")
    if is_artifact:
        predict, processor, about, model_labels = _artifact_predictor(args.model, args.backend)
        reference = _reference(args, _metadata_source(args.model))
    elif args.model.is_dir():
        predict, processor, about, model_labels = _checkpoint_predictor(args.model)
        reference = None
    else:
        raise InputError(f"{args.model}: neither an .onnx / .engine artifact nor a checkpoint folder")
    labels = dataset.id2label
    if len(model_labels) != len(labels):
        raise InputError(
            f"{args.model}: the model has {len(model_labels)} classes, the dataset {args.data} has {len(labels)}: "
            "it was not trained for this data"
        )
    if set(model_labels) != set(labels):  # as many classes under other ids: every prediction would be misread
        only_model, only_data = sorted(set(model_labels) - set(labels)), sorted(set(labels) - set(model_labels))
        raise InputError(
            f"{args.model}: the model's class ids are not the dataset's ({args.data}): ids {only_model[:8]} only in "
            f"the model, {only_data[:8]} only in the dataset: it was not trained for this data"
        )
    renamed = {k: (model_labels[k], v) for k, v in labels.items() if model_labels[k].lower() != v.lower()}
    if renamed:
        log.warning("class names differ between the model and the dataset (compared by id): %s", renamed)
    tasks = TASKS if args.task == "all" else (args.task,)
    head = about.get("fused_head")
    if head:  # the graph gives one task's results
        if args.task not in ("all", head):
            raise InputError(f"{args.model}: returns {head} results (a fused head), not {args.task}: use --task {head}")
        tasks = (head,)
    stuff = {int(c["id"]) for c in dataset.categories if not c["isthing"]}
    panoptic = evaluation.PanopticEvaluator(dataset.categories)
    semantic = evaluation.SemanticEvaluator(len(labels))
    instance = evaluation.InstanceEvaluator(dataset.instances_json) if "instance" in tasks else None
    agree_pixels: list[float] = []
    agree_segments = [0, 0]
    progress = Progress(len(records), "images", quiet=args.quiet)
    for record in records:
        image = record.image()
        outputs, inputs = predict(image)
        common = {"target_sizes": inputs["original_sizes"], "pixel_mask": inputs["pixel_mask"]}
        if head:
            from m2f_deploy.runtime.heads import decode

            seg = predict.segmenter  # type: ignore[attr-defined]
            outputs = seg.infer(*inputs["feed"], threshold=args.threshold, label_ids_to_fuse=stuff)
            results = {head: decode(seg.metadata, outputs, label_ids_to_fuse=stuff, **common)[0]}
        else:
            needed = set(tasks) | ({"semantic", "panoptic"} if reference is not None else set())
            results = _post(processor, outputs, needed, args.threshold, stuff, common)
        if "panoptic" in tasks:
            panoptic.update(results["panoptic"], record.ground_truth())
        if "semantic" in tasks:
            semantic.update(results["semantic"], record.semantic())
        if instance is not None:
            instance.update(record.image_id, results["instance"])
        if reference is not None:
            ref = _post(processor, _torch_outputs(reference, inputs[INPUT_NAME]), ("semantic", "panoptic"),
                        args.threshold, stuff, common)  # fmt: skip
            if "semantic" in results:
                agree_pixels.append(semantic_agreement([ref["semantic"]], [results["semantic"]]))
            if "panoptic" in results:
                m, n = matched_segments([ref["panoptic"]], [results["panoptic"]])
                agree_segments = [agree_segments[0] + m, agree_segments[1] + n]
        progress.step(record.image_path.name)
    progress.close()
    report: dict[str, Any] = {"model": about, "data": str(args.data), "images": len(records)}
    if "panoptic" in tasks:
        pq = panoptic.compute()
        report.update(PQ=pq.all.pq, SQ=pq.all.sq, RQ=pq.all.rq, PQ_things=pq.things.pq, SQ_things=pq.things.sq,
                      RQ_things=pq.things.rq, PQ_stuff=pq.stuff.pq, SQ_stuff=pq.stuff.sq, RQ_stuff=pq.stuff.rq)  # fmt: skip
    if "semantic" in tasks:
        sem = semantic.compute()
        report.update(mIoU=sem.mean_iou, pixel_accuracy=sem.pixel_accuracy,
                      per_class_IoU={labels[i]: v for i, v in enumerate(sem.per_class_iou)})  # fmt: skip
    if instance is not None:
        ap = instance.compute()
        report.update(AP=ap.ap, AP50=ap.ap50, AP75=ap.ap75)
    if reference is not None:
        report["agreement"] = {
            "semantic_pixels": 100 * float(np.mean(agree_pixels)) if agree_pixels else None,
            "panoptic_segments_matched": agree_segments,
        }
    return report


def _post(processor: Any, outputs: dict, tasks: Any, threshold: float, stuff: set, common: dict) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "panoptic" in tasks:
        out["panoptic"] = processor.post_process_panoptic_segmentation(
            outputs, threshold=threshold, label_ids_to_fuse=stuff, **common
        )[0]
    if "semantic" in tasks:
        out["semantic"] = processor.post_process_semantic_segmentation(outputs, **common)[0]
    if "instance" in tasks:
        out["instance"] = processor.post_process_instance_segmentation(outputs, threshold=threshold, **common)[0]
    return out


def _metadata_source(path: Path) -> dict[str, Any] | None:
    from m2f_deploy.artifact import read_engine_metadata, read_onnx_metadata

    meta = read_engine_metadata(path) if path.suffix == ".engine" else read_onnx_metadata(path)
    return meta.get("source")


def format_report(report: dict[str, Any]) -> str:
    keys = [
        k
        for k in ("PQ", "SQ", "RQ", "PQ_things", "PQ_stuff", "mIoU", "pixel_accuracy", "AP", "AP50", "AP75")
        if k in report
    ]

    def cell(value: float) -> str:
        return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"

    lines = ["| " + " | ".join(keys) + " | agreement with PyTorch |", "|" + "---|" * (len(keys) + 1)]
    agreement = report.get("agreement")
    agree = "n/a (no reference)"
    if agreement:
        m, n = agreement["panoptic_segments_matched"]
        pixels = agreement["semantic_pixels"]
        agree = f"{'n/a' if pixels is None else f'{pixels:.2f}%'} pixels, {m}/{n} segments"
    lines.append("| " + " | ".join(cell(report[k]) for k in keys) + f" | {agree} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.quiet)
    if args.limit is not None and args.limit < 1:
        raise InputError(f"--limit must be at least 1, got {args.limit}")
    if not args.model.exists():
        raise InputError(f"{args.model}: no such file or folder")
    report = evaluate(args)
    print(f"{report['model'].get('artifact') or report['model'].get('checkpoint')} on {report['images']} images of "
          f"{report['data']} ({report['model']['backend']}, {report['model']['precision']})\n")  # fmt: skip
    print(format_report(report))
    if args.json:
        from m2f_deploy.utils import atomic_write_text

        atomic_write_text(args.json, json.dumps(report, indent=1, default=float) + "\n")
        log.info("wrote %s", args.json)
    return 0


def entry() -> None:
    sys.exit(run("m2f-validate", main))


if __name__ == "__main__":
    entry()
