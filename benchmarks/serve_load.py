"""Bounded load test of m2f-serve: N concurrent clients x M requests, against in-process Segmenter.predict.

Run it in the serving environment (PyTriton's numpy<2 venv; see the README's "Serving" section):

    python benchmarks/serve_load.py model.onnx --clients 1 8 --requests 12 --rounds 2

Two servers are started side by side on 127.0.0.1, one with dynamic batching (``--max-batch 8
--queue-delay-us 5000``) and one without (``--max-batch 1``), and the measurements alternate between them and
the in-process baseline round by round (this machine's speed drifts: only side-by-side ratios mean anything).
Each request is one image (the shipped samples, in turn); every response is compared with the in-process result
for that image (maps and segments equal), and a mismatch counts as an error. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from m2f_deploy.runtime import Segmenter  # noqa: E402
from m2f_deploy.serve import Client  # noqa: E402

SAMPLES = sorted(str(p) for p in (ROOT / "checkpoints" / "samples").glob("*.png"))


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def start_server(artifact: str, *flags: str) -> tuple[subprocess.Popen, int]:
    http, grpc, metrics = free_ports(3)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))}
    proc = subprocess.Popen(
        [sys.executable, "-m", "m2f_deploy.cli.serve", artifact, "--port", str(http), "--grpc-port", str(grpc),
         "--metrics-port", str(metrics), *flags],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, start_new_session=True,
    )  # fmt: skip
    for line in proc.stdout:
        if line.startswith("serving "):
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
            return proc, http
    raise SystemExit(f"m2f-serve {' '.join(flags)} did not start")


def same(a, b, task: str) -> bool:
    if task == "semantic":
        return a.dtype == b.dtype and np.array_equal(a, b)
    return np.array_equal(a["segmentation"], b["segmentation"]) and a["segments_info"] == b["segments_info"]


def run_load(call, clients: int, requests: int, reference: list, task: str) -> dict:
    """``clients`` threads, each sending ``requests`` one-image requests through its own ``call()`` factory."""
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)

    def worker(k: int) -> None:
        predict, close = call()
        barrier.wait()
        for j in range(requests):
            i = (k + j) % len(SAMPLES)
            start = time.perf_counter()
            try:
                result = predict(SAMPLES[i])
                ok = same(result, reference[i], task)
            except Exception:  # noqa: BLE001 - any failure is an error of the run
                ok = False
            took = time.perf_counter() - start
            with lock:
                latencies.append(took)
                errors[0] += not ok
        close()

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {"latencies": latencies, "errors": errors[0], "count": len(latencies), "wall": wall}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifact")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    p.add_argument("--requests", type=int, default=12, help="requests per client (default: 12)")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds (default: 2)")
    p.add_argument("--task", default="panoptic")
    p.add_argument("--protocol", default="http", choices=("http", "grpc"))
    args = p.parse_args()

    segmenter = Segmenter(args.artifact)
    reference = [segmenter.predict(s, args.task)[0] for s in SAMPLES]
    servers = {
        "served, dynamic batching (max batch 8, 5 ms)": start_server(args.artifact, "--max-batch", "8",
                                                                     "--queue-delay-us", "5000"),
        "served, no dynamic batching (max batch 1)": start_server(args.artifact, "--max-batch", "1",
                                                                  "--queue-delay-us", "0"),
    }  # fmt: skip
    lock = threading.Lock()

    def in_process():
        def predict(path):
            with lock:  # one Segmenter, one caller at a time: what a single process does
                return segmenter.predict(path, args.task)[0]

        return predict, lambda: None

    def served(port: int):
        def factory():
            port_used = port + (1 if args.protocol == "grpc" else 0)
            client = Client(f"127.0.0.1:{port_used}", protocol=args.protocol)
            return (lambda path: client.predict(path, args.task)[0]), client.close

        return factory

    results: dict[tuple[str, int], list[dict]] = {}
    try:
        for name, (_, port) in servers.items():  # warm-up: first calls pay for lazy initialisation
            run_load(served(port), 1, 2, reference, args.task)
        run_load(in_process, 1, 2, reference, args.task)
        for r in range(args.rounds):
            for clients in args.clients:
                runs = [("in-process Segmenter.predict", in_process)] + [(n, served(port)) for n, (_, port) in servers.items()]
                for name, call in runs if r % 2 == 0 else runs[::-1]:
                    out = run_load(call, clients, args.requests, reference, args.task)
                    results.setdefault((name, clients), []).append(out)
                    print(f"round {r + 1} {name} x{clients}: {out['count'] / out['wall']:.2f} req/s", file=sys.stderr)
    finally:
        for proc, _ in servers.values():
            proc.send_signal(signal.SIGTERM)
        for proc, _ in servers.values():
            proc.wait(timeout=60)
        segmenter.close()

    print(f"\n`python benchmarks/serve_load.py {args.artifact} --clients {' '.join(map(str, args.clients))} "
          f"--requests {args.requests} --rounds {args.rounds} --task {args.task} --protocol {args.protocol}`\n")  # fmt: skip
    print("| how | clients | requests | p50 ms | p99 ms | throughput req/s | errors |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for (name, clients), runs in results.items():
        lat = np.array([x for run in runs for x in run["latencies"]]) * 1000
        count = sum(run["count"] for run in runs)
        rate = count / sum(run["wall"] for run in runs)
        errors = sum(run["errors"] for run in runs)
        print(f"| {name} | {clients} | {count} | {np.percentile(lat, 50):.0f} | {np.percentile(lat, 99):.0f} | "
              f"{rate:.2f} | {errors} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
