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
