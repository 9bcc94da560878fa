"""The benchmark's results: per-row statistics, the machine, the markdown table (speed-ups against transformers)
and a bar chart."""

from __future__ import annotations

import os
import platform
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from m2f_deploy.bench.plan import Row
from m2f_deploy.errors import InputError


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default) of already sorted values."""
    return float(np.percentile(np.asarray(sorted_values), q))


def summarize(row: Row, seconds: Sequence[float]) -> Row:
    ms = sorted(1000 * s for s in seconds)
    row.runs = len(ms)
    row.p50_ms, row.p90_ms, row.p99_ms = (percentile(ms, q) for q in (50, 90, 99))
    row.mean_ms = statistics.fmean(ms)
    row.throughput_ips = 1000 * row.batch / row.mean_ms
    return row


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}


def _mode(row: dict[str, Any]) -> str:
    return f"{row['mode']} {row.get('task') or ''}".strip()


def speedups(report: dict[str, Any]) -> dict[int, float]:
    """Row index -> transformers' mean time over the row's (same mode, task and batch), where transformers ran."""
    rows = report["rows"]
    before = {(_mode(r), r["batch"]): r["mean_ms"]
              for r in rows if r["backend"] == "transformers" and r["status"] == "ok"}  # fmt: skip
    return {i: before[(_mode(r), r["batch"])] / r["mean_ms"] for i, r in enumerate(rows)
            if r["status"] == "ok" and (_mode(r), r["batch"]) in before}  # fmt: skip


def format_table(report: dict[str, Any]) -> str:
    """A markdown table of the rows, speed-ups against transformers where it ran."""
    rows = report["rows"]
    speed = speedups(report)
    lines = ["| backend | precision | mode | batch | p50 ms | p90 ms | p99 ms | mean ms | img/s | vs transformers "
             "| roofline | peak host MB | stages ms (pre / inf / post) | on |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for i, r in enumerate(rows):
        if r["status"] != "ok":
            lines.append(f"| {r['backend']} | {r['precision']} | {_mode(r)} | {r['batch']} | "
                         f"{r['status']}: {r['reason']} "
                         "| | | | | | | | | |")  # fmt: skip
            continue
        roof = f"{r['roofline_share']:.0%}" if r["roofline_share"] is not None else ""
        st = r["stages_ms"]
        stages = " / ".join(f"{st[k]:.1f}" for k in ("preprocess", "inference", "postprocess") if k in st)
        lines.append(
            f"| {r['backend']} | {r['precision']} | {_mode(r)} | {r['batch']} | {r['p50_ms']:.1f} | {r['p90_ms']:.1f} "
            f"| {r['p99_ms']:.1f} | {r['mean_ms']:.1f} | {r['throughput_ips']:.2f} | "
            f"{f'{speed[i]:.2f}x' if i in speed else ''} | {roof} | {r['peak_host_mb']:.0f} | {stages} "
            f"| {r['device']} |"
        )
    return "\n".join(lines)


def plot(report: dict[str, Any], path: str | os.PathLike) -> Path:
    """A bar chart (PNG, Pillow only) of the mean latency of every row that ran."""
    from PIL import Image, ImageDraw, ImageFont

    from m2f_deploy.utils import atomic_output

    rows = [r for r in report["rows"] if r["status"] == "ok"]
    if not rows:
        raise InputError("no row ran: nothing to plot")
    font = ImageFont.load_default()
    labels = [f"{r['backend']} {r['precision']} {_mode(r)} b{r['batch']}" for r in rows]
    left, bar, gap, width = 230, 18, 8, 420
    picture = Image.new("RGB", (left + width + 90, 40 + len(rows) * (bar + gap)), "white")
    draw = ImageDraw.Draw(picture)
    draw.text((10, 10), f"mean latency, ms ({report['settings']['source']}, {report['settings']['height']}x"
                        f"{report['settings']['width']})", fill="black", font=font)  # fmt: skip
    longest = max(r["mean_ms"] for r in rows)
    for i, (r, label) in enumerate(zip(rows, labels)):
        y = 35 + i * (bar + gap)
        length = max(1, round(width * r["mean_ms"] / longest))
        draw.text((10, y + 3), label, fill="black", font=font)
        draw.rectangle(
            [left, y, left + length, y + bar], fill=(70, 110, 200) if r["mode"] == "model" else (230, 140, 40)
        )
        draw.text((left + length + 6, y + 3), f"{r['mean_ms']:.1f}", fill="black", font=font)
    path = Path(path)
    with atomic_output(path) as tmp:
        picture.save(tmp, format="PNG")
    return path
