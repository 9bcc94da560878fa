"""Soak: many ``Segmenter.predict`` calls on the demo model, with RSS, open file descriptors and threads sampled.

    nice -n 10 .venv/bin/python benchmarks/soak.py                    # 10,000 calls (the issue-16 run)
    .venv/bin/python benchmarks/soak.py --calls 500 --every 50        # a quick look

The shipped demo checkpoint (``checkpoints/shapes-demo``) is exported once by ``m2f-export`` in a child process
(torch never loads in the measured one; ``--msda deform_conv``, its 160x160 size) into a temporary folder, unless
``--artifact`` names an ``.onnx`` already exported. The calls cycle through the three sample images and the three
tasks, through a path, a PIL image and a numpy array in turn, so that every entry point of ``predict`` is exercised.
RSS, descriptors and threads are read from ``/proc/self`` (Linux only) every ``--every`` calls. The growth is
measured from the end of the warm-up (``--warmup`` calls: allocator pools and onnxruntime's arenas fill up there) to
the end, and the goal is < 5 %. Prints a markdown table to paste into an issue; exits 1 when the goal is missed or
descriptors or threads grew.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def sample() -> dict[str, int]:
    """RSS (KiB), threads and open file descriptors of this process, from /proc."""
    status = Path("/proc/self/status").read_text().splitlines()
    fields = dict(line.split(":", 1) for line in status if ":" in line)
    return {
        "rss_kib": int(fields["VmRSS"].split()[0]),
        "threads": int(fields["Threads"]),
        "fds": len(os.listdir("/proc/self/fd")),
    }


def export_demo(folder: Path) -> Path:
    """m2f-export in a child process, so that torch never loads here: the RSS measured is the runtime's."""
    import subprocess

    out = folder / "model.onnx"
    command = [sys.executable, "-m", "m2f_deploy.cli.export", str(REPO / "checkpoints" / "shapes-demo"),
               "--size", "160", "--msda", "deform_conv", "-o", str(out), "-q"]  # fmt: skip
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=10_000, help="predict calls (default 10000)")
    ap.add_argument("--every", type=int, default=500, help="sample every N calls (default 500)")
    ap.add_argument("--warmup", type=int, default=500, help="calls before the baseline sample (default 500)")
    ap.add_argument("--artifact", type=Path, help="an .onnx exported already (default: export the demo checkpoint)")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime and post-processing threads (default 1)")
    args = ap.parse_args(argv)
    if args.calls < 1 or args.every < 1 or not 0 <= args.warmup < args.calls:
        ap.error("need --calls >= 1, --every >= 1 and 0 <= --warmup < --calls")

    from PIL import Image

    from m2f_deploy.runtime import Segmenter

    with tempfile.TemporaryDirectory(prefix="m2f-soak-") as tmp:
        artifact = args.artifact or export_demo(Path(tmp))
        paths = sorted((REPO / "checkpoints" / "samples").glob("*.png"))
        pictures = [Image.open(p).convert("RGB") for p in paths]
        arrays = [np.asarray(p) for p in pictures]
        inputs = [str(p) for p in paths] + pictures + arrays
        tasks = ("panoptic", "semantic", "instance")
        rows, start = [], time.perf_counter()
        with Segmenter(artifact, "cpu", threads=args.threads) as segmenter:
            rows.append((0, sample(), 0.0))
            for call in range(1, args.calls + 1):
                segmenter.predict(inputs[call % len(inputs)], tasks[call % len(tasks)])
                if call % args.every == 0 or call == args.warmup or call == args.calls:
                    rows.append((call, sample(), time.perf_counter() - start))
            description = segmenter.description
    base = next(s for c, s, _ in rows if c == args.warmup)
    last = rows[-1][1]
    peak = max(s["rss_kib"] for c, s, _ in rows if c >= args.warmup)
    growth = 100 * (last["rss_kib"] - base["rss_kib"]) / base["rss_kib"]
    peak_growth = 100 * (peak - base["rss_kib"]) / base["rss_kib"]
    print(f"soak: {args.calls} Segmenter.predict calls, {description}, threads {args.threads}; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"{time.strftime('%Y-%m-%d %H:%M')}; {rows[-1][2]:.0f} s")  # fmt: skip
    print()
    print("| calls | RSS MiB | vs warm-up | fds | threads | s |")
    print("|---|---|---|---|---|---|")
    for call, s, seconds in rows:
        rel = f"{100 * (s['rss_kib'] - base['rss_kib']) / base['rss_kib']:+.2f} %" if call >= args.warmup else ""
        print(f"| {call} | {s['rss_kib'] / 1024:.1f} | {rel} | {s['fds']} | {s['threads']} | {seconds:.0f} |")
    print()
    print(f"RSS growth after warm-up ({args.warmup} calls): {growth:+.2f} % at the end, {peak_growth:+.2f} % at "
          f"peak (goal < 5 %); fds {base['fds']} -> {last['fds']}; threads {base['threads']} -> {last['threads']}")
    ok = peak_growth < 5 and last["fds"] <= base["fds"] and last["threads"] <= base["threads"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
