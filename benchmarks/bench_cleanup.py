"""The export clean-up on the same raw graphs: nodes, op types, time and the validation gate's numbers.

    python benchmarks/bench_cleanup.py [--graphs tiny swin] [--reps 3] [--against 47968b7]

Exports each graph once without clean-up (the tiny test model in the grid_sample / gather / deform_conv flavours
with a dynamic batch, grid_sample with a dynamic size too; ``swin``: the Swin-T preset at 384x384, deform_conv),
then runs the clean-up on copies of it. ``--against REV`` also runs the hand-written static-size pass of that
git revision (``m2f_deploy/export/static_dims.py`` there: it folded in place and returned a count) in the same
loop, alternating with the current one in this process (the machine's speed drifts), and prints the difference
of op types. Every result goes through the validation gate (onnxruntime against the PyTorch model).
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from factory import decisive_model  # noqa: E402

from m2f_deploy.artifact import METADATA_KEY, read_onnx_metadata  # noqa: E402
from m2f_deploy.export import export_onnx  # noqa: E402
from m2f_deploy.export import onnx_export as ox  # noqa: E402
from m2f_deploy.export.validate import validate_onnx  # noqa: E402

TINY = [("grid_sample", False), ("gather", False), ("deform_conv", False), ("grid_sample", True)]


def _graphs(which: list[str], folder: Path):
    """(label, raw path, model) for each graph asked for."""
    if "tiny" in which:
        model = decisive_model()
        for msda, dynamic_hw in TINY:
            label = f"tiny {msda}" + (", dynamic size" if dynamic_hw else "")
            raw = export_onnx(model, folder / f"{label.replace(' ', '_').replace(',', '')}.onnx", height=64, width=96,
                              msda=msda, dynamic_hw=dynamic_hw, cleanup="none", validate=False)  # fmt: skip
            yield label, raw, model
    if "swin" in which:
        from m2f_deploy.modeling import Mask2Former
        from m2f_deploy.presets import preset_config

        model = Mask2Former.random(preset_config("swin-tiny-coco-panoptic"), seed=0)
        raw = export_onnx(model, folder / "swin.onnx", height=384, width=384, msda="deform_conv", cleanup="none",
                          validate=False)  # fmt: skip
        yield "Swin-T 384 deform_conv", raw, model


def _hand_written(rev: str):
    """The clean-up with the static-size pass of git revision ``rev``."""
    source = subprocess.run(["git", "show", f"{rev}:m2f_deploy/export/static_dims.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout  # fmt: skip
    module = types.ModuleType("static_dims_at_" + rev)
    exec(compile(source, f"{rev}:static_dims.py", "exec"), module.__dict__)  # our own file at a commit of ours

    def cleanup(graph: onnx.ModelProto, workdir: Path) -> onnx.ModelProto:
        graph = ox._ort_basic(graph, workdir)
        for _ in range(ox.MAX_FOLD_ROUNDS):
            if not module.fold_static_dims(graph):
                break
            graph = ox._ort_basic(graph, workdir)
        return graph

    return cleanup


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--graphs", nargs="+", default=["tiny"], choices=["tiny", "swin"])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--against", metavar="REV", help="also run the hand-written static-size pass of this revision")
    args = ap.parse_args()
    variants = {"current": lambda graph, workdir: ox._cleanup(graph, "ort", workdir)}
    if args.against:
        variants[f"hand-written ({args.against})"] = _hand_written(args.against)
    print("| graph | clean-up | nodes (raw -> clean) | time s (median) | time / current | class max / mean abs err "
          "| masks max / mean abs err | semantic agreement | ok |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    notes = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for label, raw_path, model in _graphs(args.graphs, folder):
            raw, meta = onnx.load(str(raw_path)), read_onnx_metadata(raw_path)
            times, results = collections.defaultdict(list), {}
            for rep in range(args.reps):  # alternating, the order reversed every other repetition
                for name in list(variants)[:: 1 if rep % 2 == 0 else -1]:
                    graph = onnx.ModelProto()
                    graph.CopyFrom(raw)
                    t0 = time.perf_counter()
                    results[name] = variants[name](graph, folder)
                    times[name].append(time.perf_counter() - t0)
            ops = {name: collections.Counter(n.op_type for n in g.graph.node) for name, g in results.items()}
            for name, graph in results.items():
                del graph.metadata_props[:]
                graph.metadata_props.add(key=METADATA_KEY, value=json.dumps(meta))
                path = folder / "cleaned.onnx"
                ox._save(graph, path)
                report = validate_onnx(model, path)
                err = {o.name: (0.0, 0.0) for o in report.cases[0].outputs}
                for case in report.cases:
                    for o in case.outputs:
                        err[o.name] = (max(err[o.name][0], o.max_abs), max(err[o.name][1], o.mean_abs))
                ratio = statistics.median(t / c for t, c in zip(times[name], times["current"]))
                print(f"| {label} | {name} | {len(raw.graph.node)} -> {len(graph.graph.node)} | "
                      f"{statistics.median(times[name]):.1f} | {ratio:.2f} | "
                      + " | ".join(f"{m:.2g} / {a:.2g}" for m, a in err.values())
                      + f" | {min(c.semantic_agreement for c in report.cases):.4f} | {report.ok} |")  # fmt: skip
                if name != "current":
                    diff = {k: ops[name][k] - ops["current"][k] for k in sorted(ops[name] | ops["current"])}
                    notes.append(f"{label}, {name} minus current: {({k: v for k, v in diff.items() if v})}")
            sys.stdout.flush()
    for note in notes:
        print(note)


if __name__ == "__main__":
    main()
