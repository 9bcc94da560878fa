"""One-shot GPU check: everything a GPU machine can tell us, in one command, in under 8 minutes, resumable.

    python benchmarks/gpu_check.py [--out gpu_check] [--size 384] [--runs 20] [--budget 420]
    python benchmarks/gpu_check.py --cpu-smoke --out /tmp/smoke      # a tiny model on CPU, seconds (what CI runs)

Wherever CUDA is present, on the Swin-T COCO-panoptic architecture (random weights written by transformers itself,
so both implementations load the same checkpoint):

- parity: our PyTorch reference against transformers on CUDA in fp32 (TF32 off), and fp16 / bf16 agreement
  (each model in half precision against its own fp32: max abs logit error and the share of equal semantic pixels);
- exported graphs (fp32, fp16, INT8 QDQ for TensorRT), run where installed: onnxruntime's CUDA and TensorRT
  providers, native TensorRT engines built by ``m2f-export``'s own code; each compared with the fp32 reference;
- latency, batch 1: every runnable row above in ONE process, alternated round by round (the machine's speed drifts),
  plus ``torch.compile`` of the reference.

Each finished row is appended to ``OUT/results.jsonl`` at once; a re-run skips the rows already done (``--redo``
starts over), so a run cut short by the time budget or the machine going away continues where it stopped. At the
end ``OUT/results.md`` holds a table ready for benchmarks/RESULTS.md, with the machine. A row that cannot run here
says why (no CUDA, no TensorRT, no onnxruntime CUDA provider, out of time) rather than disappearing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np

OUTPUTS = ("class_queries_logits", "masks_queries_logits")
FP32_TOLERANCE = 1e-3  # ours vs transformers on the same device, TF32 off


class Skip(Exception):
    """A row that cannot run here; the message says why."""


class Journal:
    """``results.jsonl``: one JSON object per finished row, written as soon as it is known."""

    def __init__(self, path: Path, redo: bool):
        self.path = path
        self.rows: dict[str, dict[str, Any]] = {}
        if redo:
            path.unlink(missing_ok=True)
        if path.is_file():
            for line in path.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    self.rows[row["key"]] = row

    def done(self, key: str) -> bool:
        return self.rows.get(key, {}).get("status") == "ok"

    def record(self, row: dict[str, Any]) -> None:
        self.rows[row["key"]] = row
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        what = row.get("reason") or row.get("error") or ", ".join(f"{k}={v}" for k, v in row.get("metrics", {}).items())
        print(f"[{row['status']:>7}] {row['key']}: {what}", flush=True)


class Check:
    """The shared state of a run: the device, the models, the input, the fp32 reference outputs, the artifacts."""

    def __init__(self, args: argparse.Namespace):
        import torch

        self.args, self.torch = args, torch
        self.out: Path = args.out
        self.journal = Journal(self.out / "results.jsonl", args.redo)
        self.deadline = time.monotonic() + args.budget
        self.cuda = torch.cuda.is_available()
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.size = (args.size, args.size)
        self.runners: dict[str, Callable[[], Any]] = {}  # latency rows, filled as rows pass
        if self.cuda:  # fp32 means fp32: TF32 would blur the parity of the two implementations
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        self._cache: dict[str, Any] = {}

    # -- shared pieces, made once per run (files on disk are reused across runs) ---------------------------------
    def config(self) -> Any:
        from m2f_deploy.config import Mask2FormerConfig
        from m2f_deploy.presets import preset_config
        from m2f_deploy.testing.configs import tiny_config_dict

        if self.args.cpu_smoke:  # the tests' tiny model, with two decoder layers: seconds on a CPU
            return Mask2FormerConfig.from_dict(tiny_config_dict(decoder_layers=2))
        return preset_config(self.args.preset)

    def checkpoint(self) -> Path:
        """Random weights saved by transformers' own ``save_pretrained``: both implementations read this folder."""
        folder = self.out / "checkpoint"
        if not (folder / "config.json").is_file():
            import torch
            from transformers import Mask2FormerConfig as HFConfig
            from transformers import Mask2FormerForUniversalSegmentation

            torch.manual_seed(0)
            hf = Mask2FormerForUniversalSegmentation(HFConfig(**self.config().to_dict())).eval()
            with torch.no_grad():
                for p in hf.parameters():
                    p.add_(torch.randn_like(p) * 0.02)
            hf.save_pretrained(folder)
        return folder

    def has_transformers(self) -> bool:
        try:
            import transformers  # noqa: F401
        except ImportError:
            return False
        return True

    def ours(self, dtype: Any = None, device: Any = None) -> Any:
        key = f"ours-{dtype}-{device}"
        if key not in self._cache:
            from m2f_deploy import load_model
            from m2f_deploy.modeling import Mask2Former

            dtype = dtype or self.torch.float32
            device = device or self.device
            if self.has_transformers():
                model = load_model(self.checkpoint(), device=device, dtype=dtype)
            else:  # no transformers here: our random weights (the parity rows say they were skipped)
                model = Mask2Former.random(self.config(), seed=0).to(device=device, dtype=dtype).eval()
            self._cache[key] = model
        return self._cache[key]

    def theirs(self, dtype: Any = None) -> Any:
        key = f"theirs-{dtype}"
        if key not in self._cache:
            if not self.has_transformers():
                raise Skip("transformers is not installed")
            from transformers import Mask2FormerForUniversalSegmentation

            model = Mask2FormerForUniversalSegmentation.from_pretrained(self.checkpoint()).eval()
            self._cache[key] = model.to(device=self.device, dtype=dtype or self.torch.float32)
        return self._cache[key]

    def x(self) -> np.ndarray:
        return np.random.default_rng(0).standard_normal((1, 3, *self.size)).astype(np.float32)

    def run_torch(self, model: Any, dtype: Any = None) -> dict[str, np.ndarray]:
        torch = self.torch
        x = torch.from_numpy(self.x()).to(self.device, dtype or torch.float32)
        with torch.no_grad():
            out = model(x)
        return {k: getattr(out, k).float().cpu().numpy() for k in OUTPUTS}

    def reference(self) -> dict[str, np.ndarray]:
        """Our model in fp32 on the device: what every other row is compared with."""
        if "reference" not in self._cache:
            self._cache["reference"] = self.run_torch(self.ours())
        return self._cache["reference"]

    def timed(self, fn: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            result = fn()
            if self.cuda:
                self.torch.cuda.synchronize()
            return result

        return run


# -- comparisons ---------------------------------------------------------------------------------------------------
def semantic(out: dict[str, np.ndarray]) -> np.ndarray:
    """Per-pixel class ids as the semantic post-process computes them (without the resize)."""
    logits = out["class_queries_logits"].astype(np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs = (probs / probs.sum(-1, keepdims=True))[..., :-1]
    masks = 1 / (1 + np.exp(-out["masks_queries_logits"].astype(np.float64)))
    return np.einsum("bqc,bqhw->bchw", probs, masks).argmax(1)


def compare(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> dict[str, float]:
    metrics = {f"max_abs_{k.split('_')[0]}": float(np.abs(got[k] - want[k]).max()) for k in OUTPUTS}
    metrics["semantic_agreement"] = round(float((semantic(got) == semantic(want)).mean()), 5)
    return metrics


# -- the rows ------------------------------------------------------------------------------------------------------
def row(check: Check, key: str, fn: Callable[[], dict[str, Any]], *, needs_cuda: bool = True,
        budgeted: bool = True, min_left: float = 0.0) -> None:
    """Run one row and record it. ``min_left``: seconds of budget the row needs to start (an engine build, a
    compile), so that the whole run stays within its budget plus one short row."""
    if check.journal.done(key):
        print(f"[   done] {key} (earlier run)", flush=True)
        if key != "latency" and not check.journal.done("latency") and time.monotonic() < check.deadline - min_left:
            try:  # rebuild its runner for the latency row (artifacts are on disk; the numbers are not re-recorded)
                fn()
            except Exception:
                pass
        return
    base = {"key": key, "device": str(check.device), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    try:
        if needs_cuda and not check.cuda and not check.args.cpu_smoke:
            raise Skip("no CUDA device (torch.cuda.is_available() is False)")
        if budgeted and time.monotonic() > check.deadline - min_left:
            spent = "spent" if time.monotonic() > check.deadline else f"too short for this row (needs {min_left:.0f} s)"
            raise Skip(f"time budget ({check.args.budget:.0f} s) {spent}: re-run to continue from here")
        start = time.monotonic()
        metrics = fn()
        check.journal.record({**base, "status": "ok", "seconds": round(time.monotonic() - start, 1),
                              "metrics": metrics})  # fmt: skip
    except Skip as e:
        check.journal.record({**base, "status": "skipped", "reason": str(e)})
    except Exception as e:  # one row failing must not stop the others: its error is the result
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        check.journal.record({**base, "status": "failed", "error": f"{type(e).__name__}: {message}"})
        if check.args.verbose:
            traceback.print_exc()


def environment(check: Check) -> dict[str, Any]:
    torch = check.torch
    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(0) if check.cuda else None,
                            "cpu": platform.processor() or platform.machine(), "cpu_smoke": check.args.cpu_smoke}  # fmt: skip
    for module in ("onnxruntime", "tensorrt", "polygraphy", "transformers", "onnx"):
        try:
            info[module] = __import__(module).__version__
        except ImportError:
            info[module] = None
    if info["onnxruntime"]:
        import onnxruntime

        info["ort_providers"] = onnxruntime.get_available_providers()
    return info


def parity_fp32(check: Check) -> dict[str, Any]:
    theirs = check.theirs()
    metrics = compare(check.run_torch(theirs), check.reference())
    metrics["pass"] = max(metrics["max_abs_class"], metrics["max_abs_masks"]) <= FP32_TOLERANCE
    return metrics


def agreement(check: Check, dtype_name: str) -> dict[str, Any]:
    torch = check.torch
    dtype = getattr(torch, dtype_name)
    if not check.cuda and dtype is torch.float16:
        raise Skip("fp16 on CPU is not a deployment target")
    metrics = {f"ours_{k}": v for k, v in compare(check.run_torch(check.ours(dtype), dtype), check.reference()).items()}
    if check.has_transformers():
        theirs32 = check.run_torch(check.theirs())
        metrics.update({f"transformers_{k}": v
                        for k, v in compare(check.run_torch(check.theirs(dtype), dtype), theirs32).items()})  # fmt: skip
    x = torch.from_numpy(check.x()).to(check.device, dtype)
    model = check.ours(dtype)
    check.runners[f"eager {dtype_name}"] = check.timed(lambda: model(x))
    return metrics


def export(check: Check, precision: str) -> Path:
    """The graph of ``precision`` (fp32, fp16, int8 QDQ for TensorRT), exported once into OUT."""
    from m2f_deploy.export import export_onnx

    path = check.out / f"model-{precision}.onnx"
    if path.is_file():
        return path
    model = check.ours(check.torch.float32, "cpu")
    h, w = check.size
    if precision in ("fp32", "fp16"):
        return export_onnx(model, path, height=h, width=w, fp16=precision == "fp16")
    from PIL import Image

    from m2f_deploy.data import generate_sample
    from m2f_deploy.export.int8 import quantize_int8

    calib = check.out / "calib"
    calib.mkdir(exist_ok=True)
    images = []
    for i in range(2 if check.args.cpu_smoke else 8):
        images.append(calib / f"{i}.png")
        Image.fromarray(generate_sample((0, i), (h, w)).image).save(images[-1])
    # random weights: the INT8 gate's agreement means little; its number is reported by the parity row instead
    return quantize_int8(export(check, "fp32"), path, images, min_agreement=0.0, target="tensorrt")


def onnxruntime_row(check: Check, backend: str, precision: str) -> dict[str, Any]:
    try:
        import onnxruntime
    except ImportError:
        raise Skip("onnxruntime is not installed") from None
    from m2f_deploy.runtime import Segmenter
    from m2f_deploy.runtime.onnxrt import PROVIDERS

    if PROVIDERS[backend] not in onnxruntime.get_available_providers():
        raise Skip(f"onnxruntime {onnxruntime.__version__} has no {PROVIDERS[backend]} "
                   f"(it has {', '.join(onnxruntime.get_available_providers())}): pip install onnxruntime-gpu")  # fmt: skip
    seg = Segmenter(export(check, precision), backend=backend)
    x = check.x()
    metrics = compare(seg.infer(x), check.reference())
    check.runners[f"onnxruntime {backend} {precision}"] = lambda: seg.infer(x)
    return metrics


def tensorrt_row(check: Check, precision: str) -> dict[str, Any]:
    try:
        import tensorrt
    except ImportError:
        raise Skip("TensorRT is not installed (pip install 'm2f-deploy[gpu]')") from None
    from m2f_deploy.export.tensorrt import build_engine
    from m2f_deploy.runtime import Segmenter

    engine = check.out / f"model-{precision}-trt{tensorrt.__version__}.engine"
    if not engine.is_file():
        onnx_path = export(check, "int8" if precision == "int8" else "fp32" if precision == "fp32" else "fp16")
        build_engine(onnx_path, engine, timing_cache=check.out / "timing.cache")
    seg = Segmenter(engine)
    x = check.x()
    metrics = compare(seg.infer(x), check.reference())
    metrics["tensorrt"] = tensorrt.__version__
    check.runners[f"TensorRT {precision}"] = lambda: seg.infer(x)
    return metrics


def compiled(check: Check) -> dict[str, Any]:
    if check.args.cpu_smoke:
        raise Skip("torch.compile is not part of the CPU smoke run (minutes, needs a C++ compiler)")
    torch = check.torch
    model = torch.compile(check.ours())
    x = torch.from_numpy(check.x()).to(check.device)
    start = time.monotonic()
    with torch.no_grad():
        out = model(x)
    seconds = time.monotonic() - start
    got = {k: getattr(out, k).float().cpu().numpy() for k in OUTPUTS}
    check.runners["torch.compile fp32"] = check.timed(lambda: model(x))
    return {**compare(got, check.reference()), "compile_seconds": round(seconds, 1)}


def latency(check: Check) -> list[dict[str, Any]]:
    """Every runner, alternated: ``rounds`` passes over all of them, ``runs`` timed calls each in total."""
    torch = check.torch
    if check.has_transformers():
        theirs = check.theirs()
        x = torch.from_numpy(check.x()).to(check.device)
        check.runners.setdefault("transformers eager fp32", check.timed(lambda: theirs(x)))
    if "eager float32" not in check.runners:
        model, x32 = check.ours(), torch.from_numpy(check.x()).to(check.device)
        check.runners["eager float32"] = check.timed(lambda: model(x32))
    runs, rounds = check.args.runs, max(1, min(check.args.runs, 4))
    times: dict[str, list[float]] = {name: [] for name in check.runners}
    with torch.no_grad():
        for run in check.runners.values():  # warm-up
            run()
        for r in range(rounds):
            for name, run in check.runners.items():
                for _ in range(runs // rounds + (r < runs % rounds)):
                    start = time.perf_counter()
                    run()
                    times[name].append(time.perf_counter() - start)
    base = times.get("transformers eager fp32")
    rows = []
    for name, seconds in times.items():
        median = float(np.median(seconds)) * 1e3
        metrics = {"median_ms": round(median, 3), "runs": len(seconds)}
        if base:
            metrics["speedup_vs_transformers"] = round(float(np.median(base)) * 1e3 / median, 2)
        rows.append({"variant": name, **metrics})
    return rows


def markdown(check: Check) -> str:
    rows = check.journal.rows
    env = rows.get("environment", {}).get("metrics", {})
    lines = [f"GPU check ({'CPU smoke run, tiny model' if env.get('cpu_smoke') else check.args.preset}, "
             f"{check.size[0]}x{check.size[1]}, batch 1): {env.get('gpu') or 'no GPU'}; torch {env.get('torch')} "
             f"CUDA {env.get('cuda')}; onnxruntime {env.get('onnxruntime')}; TensorRT {env.get('tensorrt')}",
             "", "| check | status | max abs class / masks | semantic agreement | median ms | note |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for key, r in rows.items():
        if key == "environment":
            continue
        m = r.get("metrics", {})
        if key == "latency" and r["status"] == "ok":
            for v in m.get("variants", []):
                note = f"{v['speedup_vs_transformers']}x transformers" if "speedup_vs_transformers" in v else ""
                lines.append(f"| latency: {v['variant']} | ok | | | {v['median_ms']:.2f} | {note} |")
            continue
        diffs = agree = ""
        for prefix in ("", "ours_"):
            if f"{prefix}max_abs_class" in m:
                diffs = f"{m[prefix + 'max_abs_class']:.2e} / {m[prefix + 'max_abs_masks']:.2e}"
                agree = f"{m[prefix + 'semantic_agreement']:.4f}"
                break
        note = r.get("reason") or r.get("error") or ""
        if "pass" in m:
            note = f"{'pass' if m['pass'] else 'FAIL'} (<= {FP32_TOLERANCE})"
        if "transformers_semantic_agreement" in m:
            note = f"transformers: {m['transformers_max_abs_class']:.2e} / {m['transformers_max_abs_masks']:.2e}, " \
                   f"{m['transformers_semantic_agreement']:.4f}"  # fmt: skip
        if "compile_seconds" in m:
            note = f"compiled in {m['compile_seconds']} s"
        lines.append(f"| {key} | {r['status']} | {diffs} | {agree} | | {note} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options, checked (a bad one is argparse's one-line usage error, before anything slow), defaults filled."""
    from m2f_deploy.artifact import HW_MULTIPLE

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("gpu_check"), help="results folder (default: gpu_check)")
    ap.add_argument("--preset", default="swin-tiny-coco-panoptic")
    ap.add_argument("--size", type=int, default=None, help="square input size (default 384; 64 with --cpu-smoke)")
    ap.add_argument("--runs", type=int, default=None, help="timed runs per latency row (default 20; 3 smoke)")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds; rows after it are left for a re-run")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny model; the rows that can run on CPU run there")
    ap.add_argument("--redo", action="store_true", help="forget earlier results in --out")
    ap.add_argument("--verbose", action="store_true", help="tracebacks of failed rows")
    args = ap.parse_args(argv)
    if args.runs is not None and args.runs < 1:
        ap.error(f"--runs {args.runs}: at least 1 timed run")
    if args.size is not None and (args.size <= 0 or args.size % HW_MULTIPLE):
        ap.error(f"--size {args.size}: a positive multiple of {HW_MULTIPLE}")
    if not (math.isfinite(args.budget) and args.budget >= 0):
        ap.error(f"--budget {args.budget}: seconds, a finite number >= 0")
    args.size = args.size if args.size is not None else (64 if args.cpu_smoke else 384)
    args.runs = args.runs if args.runs is not None else (3 if args.cpu_smoke else 20)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    check = Check(args)
    if check.cuda and args.cpu_smoke:
        print("note: --cpu-smoke on a CUDA machine runs the tiny model on the GPU", flush=True)
    row(check, "environment", lambda: environment(check), needs_cuda=False, budgeted=False)
    row(check, "parity: ours vs transformers fp32", lambda: parity_fp32(check))
    row(check, "agreement: bfloat16 vs fp32", lambda: agreement(check, "bfloat16"))
    row(check, "agreement: float16 vs fp32", lambda: agreement(check, "float16"))
    row(check, "torch.compile fp32 vs eager", lambda: compiled(check), min_left=0 if args.cpu_smoke else 150)
    ort_rows = [("cpu", "fp32")] if args.cpu_smoke else []
    ort_rows += [("cuda", "fp32"), ("cuda", "fp16"), ("ort-tensorrt", "fp32"), ("ort-tensorrt", "fp16")]
    for backend, precision in ort_rows:
        row(check, f"onnxruntime {backend} {precision}", lambda b=backend, p=precision: onnxruntime_row(check, b, p),
            needs_cuda=backend != "cpu")  # fmt: skip
    for precision in ("fp32", "fp16", "int8"):
        row(check, f"TensorRT engine {precision}", lambda p=precision: tensorrt_row(check, p),
            min_left=0 if args.cpu_smoke else 180)  # fmt: skip
    # latency last, over every runner the rows above made in this process (a resumed run rebuilds them cheaply)
    row(check, "latency", lambda: {"variants": latency(check)})
    table = markdown(check)
    (check.out / "results.md").write_text(table, encoding="utf-8")
    print("\n" + table, flush=True)
    skipped = [k for k, r in check.journal.rows.items() if r["status"] != "ok"]
    print(f"{len(check.journal.rows) - len(skipped)} rows ok, {len(skipped)} skipped or failed "
          f"(results: {check.out / 'results.jsonl'}, table: {check.out / 'results.md'})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
