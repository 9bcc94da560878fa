"""Latency benchmarking of every backend present, on one target: an artifact, a checkpoint or a preset (m2f-bench).

Each row is one backend at one batch size: warm-up, then timed runs, p50 / p90 / p99 / mean, throughput, peak host
memory over the row (and peak GPU memory where the backend can say), and for end-to-end rows the stage breakdown
(preprocess / inference / postprocess). A backend that is not present, or cannot run this target, is a row with
status ``skipped`` and the reason, never an error. Rows run one after another in this process; peak memory is
reset between rows where Linux allows it (``/proc/self/clear_refs``).

Backends: ``transformers`` (eager, the "before" column; needs transformers and a checkpoint or preset), ``torch``
(our reference model, eager), ``torch-compile`` (only when asked: compiling takes minutes), and the runtime's
``cpu``, ``cuda``, ``ort-tensorrt`` (onnxruntime providers, ONNX) and ``tensorrt`` (engines). A checkpoint or preset
target is exported to a temporary ONNX file first (fp32, and fp16 with ``fp16=True``).

``plan`` (backends, target, rows), ``runners`` (timing each row; :func:`benchmark`), ``report`` (statistics, table,
plot).
"""

from m2f_deploy.bench.plan import ALL_BACKENDS, DEFAULT_BACKENDS, Row, Target, prepare_target
from m2f_deploy.bench.report import format_table, machine, plot, speedups, summarize
from m2f_deploy.bench.runners import benchmark, run_rows

__all__ = [
    "ALL_BACKENDS",
    "DEFAULT_BACKENDS",
    "Row",
    "Target",
    "benchmark",
    "format_table",
    "machine",
    "plot",
    "prepare_target",
    "run_rows",
    "speedups",
    "summarize",
]
