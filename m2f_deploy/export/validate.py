"""The validation gate: an exported graph in onnxruntime (CPU) against the PyTorch model.

Checked in order, as a deployment would fail: output names, then shapes, then values (max and
mean abs error per output against per-output tolerances), then what a user sees (semantic
pixel agreement and matched panoptic segments). Run at the export shape and, when axes are
dynamic, at another batch / size, which catches axes silently baked in as constants.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from m2f_deploy.artifact import HW_MULTIPLE, INPUT_NAME, OUTPUT_NAMES, read_onnx_metadata
from m2f_deploy.errors import M2FError
from m2f_deploy.export.agreement import matched_segments, semantic_agreement
from m2f_deploy.modeling import Mask2Former, numpy_logits

# Max abs error allowed per output, by precision ("" = any other output). Not 1e-5: the masked
# attention binarises mask logits at 0, and a logit within float error of 0 lets a query see one
# key more or less. On the random-weight Swin-T at 384x384 that moved a few logits by ~1e-2 in
# fp32 (mean error 1e-4 times smaller) while every segmentation pixel stayed the same.
DEFAULT_TOLERANCES = {
    "fp32": {"class_queries_logits": 2e-2, "masks_queries_logits": 5e-2},
    "fp16": {"class_queries_logits": 0.25, "masks_queries_logits": 1.0},
    # int8 is gated by m2f_deploy.export.int8 on real images (semantic agreement), not by logits of noise inputs
    "int8": {"class_queries_logits": float("inf"), "masks_queries_logits": float("inf")},
}
MIN_SEMANTIC_AGREEMENT = 0.99


class ValidationError(M2FError):
    """The exported graph disagrees with the PyTorch model beyond tolerance."""


@dataclass
class OutputCheck:
    name: str
    max_abs: float
    mean_abs: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.max_abs <= self.tolerance


@dataclass
class CaseReport:
    shape: tuple[int, int, int, int]
    outputs: list[OutputCheck] = field(default_factory=list)
    semantic_agreement: float = float("nan")
    panoptic_matched: tuple[int, int] = (0, 0)
    problem: str | None = None  # a name or shape mismatch: fatal, no numbers to compare

    @property
    def ok(self) -> bool:
        return (
            self.problem is None
            and all(o.ok for o in self.outputs)
            and self.semantic_agreement >= MIN_SEMANTIC_AGREEMENT
        )


@dataclass
class ValidationReport:
    cases: list[CaseReport]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.cases)

    def format(self) -> str:
        lines = ["| input | output | max abs err | mean abs err | tolerance | semantic agreement | panoptic matched | ok |"]
        lines.append("|---|---|---|---|---|---|---|---|")
        for c in self.cases:
            shape = "x".join(map(str, c.shape))
            if c.problem:
                lines.append(f"| {shape} | {c.problem} | | | | | | FAIL |")
                continue
            for o in c.outputs:
                m, n = c.panoptic_matched
                lines.append(
                    f"| {shape} | {o.name} | {o.max_abs:.3g} | {o.mean_abs:.3g} | {o.tolerance:g} "
                    f"| {c.semantic_agreement:.2%} | {m}/{n} | {'ok' if c.ok else 'FAIL'} |"
                )
        return "\n".join(lines)

    def raise_if_failed(self, what: str | os.PathLike) -> None:
        if not self.ok:
            raise ValidationError(
                f"{what}: the exported graph does not match the PyTorch model "
                f"(nothing was written; --no-validate skips this gate):\n{self.format()}"
            )


def session(path: str | os.PathLike, msda: str):
    """An onnxruntime CPU session with the runtime's options; plugin graphs run through the numpy stand-in."""
    import onnxruntime

    from m2f_deploy.runtime.onnxrt import session_options

    options = session_options(onnxruntime, precision=read_onnx_metadata(path)["precision"])
    if msda == "trt_plugin":
        from m2f_deploy.runtime.plugin_standin import standin_session

        return standin_session(path, sess_options=options)
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _cases(meta: dict) -> list[tuple[int, int, int, int]]:
    inp = meta["input"]
    b, h, w = inp["batch"], inp["height"], inp["width"]
    cases = [(b, 3, h, w)]
    if inp["dynamic_batch"] or inp["dynamic_hw"]:
        other_b = b + 1 if inp["dynamic_batch"] else b
        step = inp.get("hw_multiple", HW_MULTIPLE)
        other_h, other_w = (h + step, max(step, w - step)) if inp["dynamic_hw"] else (h, w)
        cases.append((other_b, 3, other_h, other_w))
    return cases


def validate_onnx(
    model: Mask2Former,
    path: str | os.PathLike,
    *,
    tolerances: dict[str, float] | None = None,
    seed: int = 0,
) -> ValidationReport:
    """Compare the graph at ``path`` with ``model`` on seeded random inputs."""
    from m2f_deploy.processing import ImageProcessor

    path = Path(path)
    meta = read_onnx_metadata(path)
    tol = {**DEFAULT_TOLERANCES[meta["precision"]], **(tolerances or {})}
    sess = session(path, meta["msda"])
    processor = ImageProcessor()
    generator = torch.Generator().manual_seed(seed)
    report = ValidationReport([])
    for shape in _cases(meta):
        case = CaseReport(shape)
        report.cases.append(case)
        x = torch.randn(*shape, generator=generator)
        with torch.no_grad():
            ref = model(x.to(model.device, model.dtype))
        expected = numpy_logits(ref)
        names = [o.name for o in sess.get_outputs()]
        if sorted(names) != sorted(OUTPUT_NAMES):
            case.problem = f"outputs are {names}, expected {list(OUTPUT_NAMES)}"
            continue
        got = dict(zip(names, sess.run(None, {INPUT_NAME: x.numpy()}), strict=True))
        wrong = [f"{k} {got[k].shape} != {expected[k].shape}" for k in OUTPUT_NAMES if got[k].shape != expected[k].shape]
        if wrong:
            case.problem = "shape mismatch: " + "; ".join(wrong)
            continue
        for k in OUTPUT_NAMES:
            err = np.abs(got[k].astype(np.float32) - expected[k])
            case.outputs.append(OutputCheck(k, float(err.max()), float(err.mean()), tol.get(k, tol.get("", 0.0))))
        sizes = [shape[2:]] * shape[0]
        sem_ref = processor.post_process_semantic_segmentation(expected, target_sizes=sizes)
        sem_got = processor.post_process_semantic_segmentation(got, target_sizes=sizes)
        case.semantic_agreement = semantic_agreement(sem_ref, sem_got)
        case.panoptic_matched = matched_segments(
            processor.post_process_panoptic_segmentation(expected, target_sizes=sizes),
            processor.post_process_panoptic_segmentation(got, target_sizes=sizes),
        )
    return report


# -- fused heads: the fused graph against our numpy post-processing of the logits graph ----------------------------
MIN_HEAD_SEMANTIC_AGREEMENT = 0.999
HEAD_SCORE_TOLERANCE = 1e-3
SEMANTIC_TIE = 1e-5
"""A pixel whose two best class scores (numpy) differ by at most this (relative) is a tie within float error: either
class is right there. On the tiny model's noise inputs such pixels are ~0.1 % (gaps of ~5e-9)."""


@dataclass
class HeadCase:
    shape: tuple[int, int, int, int]
    task: str
    semantic_agreement: float = float("nan")  # semantic: share of identical pixels
    semantic_agreement_ties: float = float("nan")  # the same, counting float ties (SEMANTIC_TIE) as agreeing
    # instance / panoptic: segments of the numpy result paired with a fused one of the same label and a score within
    # HEAD_SCORE_TOLERANCE; semantic_agreement is then the share of pixels whose segment has the same label
    matched: tuple[int, int] = (0, 0)
    segments: tuple[int, int] = (0, 0)  # segments found: reference, fused
    max_score_error: float = 0.0  # largest |score difference| of a numpy segment to its nearest fused one

    @property
    def ok(self) -> bool:
        if self.task == "semantic":
            return self.semantic_agreement_ties >= MIN_HEAD_SEMANTIC_AGREEMENT
        return (
            self.matched[0] == self.matched[1]
            and self.segments[0] == self.segments[1]
            and self.semantic_agreement >= MIN_HEAD_SEMANTIC_AGREEMENT
        )


@dataclass
class HeadReport:
    cases: list[HeadCase]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.cases)

    def format(self) -> str:
        lines = ["| input | head | pixel agreement (with float ties) | segments matched | segments (numpy / graph) | max score err | ok |",
                 "|---|---|---|---|---|---|---|"]  # fmt: skip
        for c in self.cases:
            lines.append(
                f"| {'x'.join(map(str, c.shape))} | {c.task} | {c.semantic_agreement:.3%} ({c.semantic_agreement_ties:.3%}) | {c.matched[0]}/{c.matched[1]} "
                f"| {c.segments[0]} / {c.segments[1]} | {c.max_score_error:.2g} | {'ok' if c.ok else 'FAIL'} |"
            )
        return "\n".join(lines)

    def raise_if_failed(self, what: str | os.PathLike) -> None:
        if not self.ok:
            raise ValidationError(
                f"{what}: the fused head does not match the numpy post-processing of the logits graph "
                f"(nothing was written; --no-validate skips this gate):\n{self.format()}"
            )


def compare_head(task: str, reference: list, fused: list, shape: tuple[int, ...] = ()) -> HeadCase:
    """The fused head's results against the numpy post-processing's, image by image (same sizes)."""
    case = HeadCase(tuple(shape), task)  # type: ignore[arg-type]
    if task == "semantic":
        if reference and isinstance(reference[0], dict):  # with scores: ties within float error agree too
            maps = [r["segmentation"] for r in reference]
            shares = []
            for r, got in zip(reference, fused, strict=True):
                scores, got = r["segmentation_scores"], np.asarray(got)
                at = np.take_along_axis(scores, got[None].astype(np.int64), 0)[0]
                best = scores.max(0)
                shares.append(float(np.mean(at >= best - SEMANTIC_TIE * np.maximum(1.0, np.abs(best)))))
            case.semantic_agreement_ties = float(np.mean(shares))
            reference = maps
        case.semantic_agreement = semantic_agreement(reference, fused)
        if np.isnan(case.semantic_agreement_ties):
            case.semantic_agreement_ties = case.semantic_agreement
        return case
    case.segments = (sum(len(r["segments_info"]) for r in reference), sum(len(f["segments_info"]) for f in fused))
    matched = total = 0
    pixels = []
    for ref, got in zip(reference, fused, strict=True):
        pixels.append(float(np.mean(_label_map(ref) == _label_map(got))))
        free = list(got["segments_info"])
        for sr in ref["segments_info"]:  # paired by label and nearest score (instance masks overlap: no IoU)
            total += 1
            same = [sg for sg in free if sg["label_id"] == sr["label_id"]]
            if not same:
                continue
            best = min(same, key=lambda sg: abs(sg["score"] - sr["score"]))
            error = abs(best["score"] - sr["score"])
            if error <= HEAD_SCORE_TOLERANCE:
                matched += 1
                free.remove(best)
            case.max_score_error = max(case.max_score_error, error)
    case.matched = (matched, total)
    case.semantic_agreement = case.semantic_agreement_ties = float(np.mean(pixels)) if pixels else 1.0
    return case


def _label_map(result: dict) -> np.ndarray:
    """A panoptic or instance result's segmentation as labels (-1: no segment): comparable whatever the ids."""
    ids = np.asarray(result["segmentation"]).astype(np.int64)
    table = {int(s["id"]): int(s["label_id"]) for s in result["segments_info"]}
    out = np.full(ids.shape, -1, np.int64)
    for segment_id, label in table.items():
        out[ids == segment_id] = label
    return out


def head_results(meta: dict, processor, outputs: dict, size: tuple[int, int], batch: int, **options) -> list:
    """Our numpy post-processing of logits ``outputs`` at ``size``, as the head of ``meta`` computes it."""
    sizes = [size] * batch
    task = meta["fused_heads"][0]
    if task == "semantic":
        return processor.post_process_semantic_segmentation(outputs, target_sizes=sizes, return_segmentation_scores=True)
    if task == "instance":
        return processor.post_process_instance_segmentation(outputs, threshold=options.get("threshold", 0.5),
                                                            target_sizes=sizes)  # fmt: skip
    return processor.post_process_panoptic_segmentation(
        outputs, options.get("threshold", 0.5), options.get("mask_threshold", 0.5),
        options.get("overlap_mask_area_threshold", 0.8), options.get("label_ids_to_fuse"), target_sizes=sizes,
    )  # fmt: skip


def validate_head(logits_path: str | os.PathLike, fused_path: str | os.PathLike, *, seed: int = 0) -> HeadReport:
    """Run the logits graph and the fused graph on the same seeded inputs; compare the fused head's results with
    our numpy post-processing of the logits (at the head's output size, default thresholds)."""
    from m2f_deploy.processing import ImageProcessor
    from m2f_deploy.runtime.heads import decode, head_inputs

    meta = read_onnx_metadata(fused_path)
    logits_sess, fused_sess = session(logits_path, meta["msda"]), session(fused_path, meta["msda"])
    processor = ImageProcessor()
    size = tuple(meta["heads"]["output_size"])
    generator = torch.Generator().manual_seed(seed)
    report = HeadReport([])
    for shape in _cases(meta):
        x = torch.randn(*shape, generator=generator).numpy()
        logits = dict(zip([o.name for o in logits_sess.get_outputs()], logits_sess.run(None, {INPUT_NAME: x})))
        feeds = {INPUT_NAME: x, **head_inputs(meta, shape[0])}
        fused = dict(zip([o.name for o in fused_sess.get_outputs()], fused_sess.run(None, feeds)))
        reference = head_results(meta, processor, logits, size, shape[0])
        report.cases.append(compare_head(meta["fused_heads"][0], reference, decode(meta, fused), shape))
    return report
