"""Reference model vs transformers eager, on CPU, same weights and input.

    python benchmarks/bench_model.py [--preset swin-tiny-coco-panoptic] [--size 384] [--runs 10] [--threads 2]

Writes a random-weight checkpoint with transformers' save_pretrained, loads it into both models,
and prints a markdown table (median / p90 / mean latency, speed-up) plus the parity of the two.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from factory import save_hf_checkpoint  # noqa: E402

from m2f_deploy import load_model  # noqa: E402
from m2f_deploy.presets import PRESETS, preset_config  # noqa: E402


def timeit(fn, x, warmup: int, runs: int) -> list[float]:
    with torch.inference_mode():
        for _ in range(warmup):
            fn(x)
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="swin-tiny-coco-panoptic", choices=list(PRESETS))
    ap.add_argument("--size", type=int, nargs="+", default=[384], help="H [W]")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    h, w = (args.size * 2)[:2]

    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        folder = save_hf_checkpoint(preset_config(args.preset), Path(tmp))
        hf = transformers.Mask2FormerForUniversalSegmentation.from_pretrained(folder).eval()
        ours = load_model(folder)
    x = torch.randn(args.batch, 3, h, w)
    with torch.inference_mode():
        a, b = hf(x), ours(x)
    diff = max((getattr(a, k) - getattr(b, k)).abs().max().item() for k in ("class_queries_logits", "masks_queries_logits"))

    rows = []
    # interleave the two so that machine noise hits both alike
    t_hf, t_ours = [], []
    for _ in range(2):
        t_hf += timeit(hf, x, args.warmup, args.runs // 2)
        t_ours += timeit(ours, x, args.warmup, args.runs // 2)
    for name, t in (("transformers eager", t_hf), ("m2f-deploy reference (eager)", t_ours)):
        t = sorted(t)
        rows.append((name, statistics.median(t), t[int(0.9 * (len(t) - 1))], statistics.mean(t)))

    print(f"{args.preset}, {args.batch}x3x{h}x{w}, {args.threads} threads, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, {platform.processor() or platform.machine()}")
    print(f"max abs diff between the two (both logits): {diff:.2e}\n")
    print("| model | median s | p90 s | mean s | speed-up vs transformers |")
    print("|---|---|---|---|---|")
    for name, med, p90, mean in rows:
        print(f"| {name} | {med:.3f} | {p90:.3f} | {mean:.3f} | {rows[0][1] / med:.2f}x |")


if __name__ == "__main__":
    main()
