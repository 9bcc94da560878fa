"""Where an ONNX artifact's time goes on onnxruntime CPU: onnxruntime's own profiler, summed per op type and per
module scope (the exporters name nodes ``/model/<module path>/<op>``).

    python benchmarks/profile_ort.py model.onnx [--runs 5] [--threads 2] [--top 25] [--scope-depth 3]

The session has the runtime's options (m2f_deploy.runtime.onnxrt.session_options), so the profile is the one
Segmenter runs; the input is seeded noise of the graph's shape (batch 1 where the batch is dynamic). Times are
kernel times per run, averaged over every run the profiler saw (the warm-up runs too); the median wall time of the
timed runs is printed beside them.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--scope-depth", type=int, default=3, help="module-path components per scope row (default: 3)")
    args = ap.parse_args()

    import onnxruntime

    from m2f_deploy.artifact import INPUT_NAME, read_onnx_metadata
    from m2f_deploy.runtime.onnxrt import session_options

    options = session_options(onnxruntime, args.threads, precision=read_onnx_metadata(args.model)["precision"])
    with tempfile.TemporaryDirectory() as tmp:
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(tmp, "profile")
        session = onnxruntime.InferenceSession(args.model, options, providers=["CPUExecutionProvider"])
        shape = [d if isinstance(d, int) else 1 for d in session.get_inputs()[0].shape]
        feed = {INPUT_NAME: np.random.default_rng(0).standard_normal(shape, dtype=np.float32)}
        for _ in range(args.warmup):
            session.run(None, feed)
        walls = []
        for _ in range(args.runs):
            start = time.perf_counter()
            session.run(None, feed)
            walls.append(time.perf_counter() - start)
        with open(session.end_profiling()) as f:
            events = json.load(f)
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    runs = args.runs + args.warmup  # the profiler saw every run
    by_op, count, by_scope = collections.Counter(), collections.Counter(), collections.Counter()
    for e in nodes:
        by_op[e["args"]["op_name"]] += e["dur"]
        count[e["args"]["op_name"]] += 1
        parts = e["name"][: -len("_kernel_time")].strip("/").split("/")
        by_scope["/".join(parts[: args.scope_depth])] += e["dur"]
    total = sum(by_op.values()) / runs / 1000
    print(f"{args.model}: {shape}, {args.threads} threads, median wall {1000 * np.median(walls):.1f} ms over "
          f"{args.runs} runs, kernels {total:.1f} ms per run\n")  # fmt: skip
    print("| op type | ms per run | share | nodes |\n|---|---|---|---|")
    for op, us in by_op.most_common(args.top):
        print(f"| {op} | {us / runs / 1000:.1f} | {us / runs / 1000 / total:.0%} | {count[op] // runs} |")
    print("\n| scope | ms per run | share |\n|---|---|---|")
    for scope, us in by_scope.most_common(args.top):
        print(f"| {scope} | {us / runs / 1000:.1f} | {us / runs / 1000 / total:.0%} |")


if __name__ == "__main__":
    main()
