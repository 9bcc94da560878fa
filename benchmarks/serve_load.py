"""Bounded load test of m2f-serve: N concurrent clients x M requests, against in-process Segmenter.predict.

Run it in the serving environment (PyTriton's numpy<2 venv; see the README's "Serving" section):

    python benchmarks/serve_load.py model.onnx --clients 1 8 --requests 12 --rounds 2

Servers are started side by side on 127.0.0.1: with dynamic batching (``--max-batch 8``, one server per
``--queue-delays`` value) and without (``--max-batch 1``), and the measurements alternate between them and the
in-process baselines round by round (this machine's speed drifts: only side-by-side ratios mean anything).
Each request is one image (the shipped samples, in turn); every response is compared with the in-process result
for that image (maps and segments equal), and a mismatch counts as an error. Beside the latencies, each row gives
the CPU time spent per request by the server (its whole process group: m2f-serve, tritonserver, the Python backend
stubs; Linux ``/proc``) or, in process, by this process: what dynamic batching can save is the part of it that is
paid per model call. The in-process row with N clients and "N images per call" is one caller sending N images per
``predict``: the model's own batching gain, without a server. Prints a markdown table.
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


START_TIMEOUT_S = 300
LOGS: dict[int, list[str]] = {}
"""Each server's output (Triton's log and m2f-serve's lines), by process id: its tail is printed on errors."""


def start_server(artifact: str, *flags: str) -> tuple[subprocess.Popen, int]:
    http, grpc, metrics = free_ports(3)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))}
    proc = subprocess.Popen(
        [sys.executable, "-m", "m2f_deploy.cli.serve", artifact, "--port", str(http), "--grpc-port", str(grpc),
         "--metrics-port", str(metrics), *flags],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True,
    )  # fmt: skip
    # m2f-serve's own lines come on stdout, Triton's log on stderr: one pipe each, or their chunks could interleave
    # within a line
    log = LOGS.setdefault(proc.pid, [])
    threading.Thread(target=lambda: [log.append(x) for x in proc.stderr], daemon=True).start()  # never let it fill
    deadline = threading.Timer(START_TIMEOUT_S, lambda: os.killpg(proc.pid, signal.SIGKILL))  # a start that hangs
    deadline.start()
    try:
        for line in proc.stdout:
            log.append(line)
            if line.startswith("serving "):
                threading.Thread(target=lambda: [log.append(x) for x in proc.stdout], daemon=True).start()
                return proc, http
    finally:
        deadline.cancel()
    raise SystemExit(f"m2f-serve {' '.join(flags)} did not start within {START_TIMEOUT_S} s (or exited):\n"
                     + "".join(log[-20:]))


def cpu_seconds(session: int | None) -> float:
    """CPU time (user + system) of every process in the session ``session`` (None: this process)."""
    if session is None:
        t = os.times()
        return t.user + t.system
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[3]) == session:  # field 6 of stat: the session id
            total += int(fields[11]) + int(fields[12])  # utime + stime, in ticks
    return total / tick


def same(a, b, task: str) -> bool:
    if task == "semantic":
        return a.dtype == b.dtype and np.array_equal(a, b)
    return np.array_equal(a["segmentation"], b["segmentation"]) and a["segments_info"] == b["segments_info"]


def run_load(call, clients: int, requests: int, reference: list, task: str, session: int | None = None) -> dict:
    """``clients`` threads, each sending ``requests`` one-image requests through its own ``call()`` factory; the CPU
    time of the process session ``session`` (None: this process) is measured around it."""
    latencies: list[float] = []
    errors = [0]
    first_error: list[str] = []
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
                problem = "" if ok else f"the response for {SAMPLES[i]} differs from the in-process result"
            except Exception as e:  # noqa: BLE001 - any failure is an error of the run
                ok, problem = False, f"{type(e).__name__}: {e}"
            took = time.perf_counter() - start
            with lock:
                latencies.append(took)
                errors[0] += not ok
                if problem and not first_error:
                    first_error.append(problem)
        close()

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    cpu = cpu_seconds(session)
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    cpu = cpu_seconds(session) - cpu
    return {"latencies": latencies, "errors": errors[0], "count": len(latencies), "wall": wall, "cpu": cpu,
            "first_error": first_error[0] if first_error else ""}


def run_batched_in_process(segmenter, batch: int, calls: int, reference: list, task: str) -> dict:
    """One caller, ``calls`` predict calls of ``batch`` images each: counted per image, latency per call."""
    latencies, errors = [], 0
    cpu, start = cpu_seconds(None), time.perf_counter()
    for j in range(calls):
        idx = [(j * batch + k) % len(SAMPLES) for k in range(batch)]
        t0 = time.perf_counter()
        out = segmenter.predict([SAMPLES[i] for i in idx], task)
        latencies += [time.perf_counter() - t0] * batch
        errors += sum(not same(o, reference[i], task) for o, i in zip(out, idx))
    wall, cpu = time.perf_counter() - start, cpu_seconds(None) - cpu
    return {"latencies": latencies, "errors": errors, "count": len(latencies), "wall": wall, "cpu": cpu}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifact")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    p.add_argument("--requests", type=int, default=12, help="requests per client (default: 12)")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds (default: 2)")
    p.add_argument("--task", default="panoptic")
    p.add_argument("--protocol", default="http", choices=("http", "grpc"))
    p.add_argument("--queue-delays", type=int, nargs="+", default=[0, 5000],
                   help="a dynamic-batching server per queue delay, in microseconds (default: 0 5000)")
    args = p.parse_args()

    segmenter = Segmenter(args.artifact, batch_size=max(args.clients))
    reference = [segmenter.predict(s, args.task)[0] for s in SAMPLES]
    servers: dict[str, tuple[subprocess.Popen, int]] = {}
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
    try:  # the servers are started inside: one that fails to start stops those started before it (finally)
        for d in dict.fromkeys(args.queue_delays):  # a delay given twice: one server
            servers[f"served, dynamic batching (max batch 8, queue delay {d} us)"] = start_server(
                args.artifact, "--max-batch", "8", "--queue-delay-us", str(d))  # fmt: skip
        servers["served, no dynamic batching (max batch 1)"] = start_server(args.artifact, "--max-batch", "1",
                                                                             "--queue-delay-us", "0")  # fmt: skip
        for name, (_, port) in servers.items():  # warm-up: first calls pay for lazy initialisation
            run_load(served(port), 1, 2, reference, args.task)
        run_load(in_process, 1, 2, reference, args.task)
        for r in range(args.rounds):
            for clients in args.clients:
                runs = [("in-process Segmenter.predict", lambda c: run_load(in_process, c, args.requests, reference,
                                                                             args.task))]  # fmt: skip
                if clients > 1:
                    runs.append((f"in-process Segmenter.predict, {clients} images per call", lambda c: (
                        run_batched_in_process(segmenter, c, args.requests, reference, args.task))))
                for n, (proc, port) in servers.items():
                    runs.append((n, lambda c, port=port, proc=proc: run_load(
                        served(port), c, args.requests, reference, args.task, session=proc.pid)))
                for name, run in runs if r % 2 == 0 else runs[::-1]:
                    out = run(clients)
                    results.setdefault((name, clients), []).append(out)
                    print(f"round {r + 1} {name} x{clients}: {out['count'] / out['wall']:.2f} req/s", file=sys.stderr)
                    if out.get("first_error"):
                        print(f"  {out['errors']} errors, the first: {out['first_error']}", file=sys.stderr)
                        for proc, _ in servers.values():
                            state = "running" if proc.poll() is None else f"exited with {proc.returncode}"
                            print(f"  server {proc.pid} ({state}), its last lines:\n    "
                                  + "    ".join(LOGS[proc.pid][-8:]), file=sys.stderr)  # fmt: skip
    finally:
        for proc, _ in servers.values():
            proc.send_signal(signal.SIGTERM)
        for proc, _ in servers.values():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:  # a server that does not stop: killed with all it started
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        segmenter.close()

    print(f"\n`python benchmarks/serve_load.py {args.artifact} --clients {' '.join(map(str, args.clients))} "
          f"--requests {args.requests} --rounds {args.rounds} --task {args.task} --protocol {args.protocol} "
          f"--queue-delays {' '.join(map(str, args.queue_delays))}`\n")  # fmt: skip
    print("| how | clients | requests | p50 ms | p99 ms | throughput req/s | CPU ms / request | errors |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for clients in args.clients:
        for (name, c), runs in results.items():
            if c != clients:
                continue
            lat = np.array([x for run in runs for x in run["latencies"]]) * 1000
            count = sum(run["count"] for run in runs)
            rate = count / sum(run["wall"] for run in runs)
            cpu = 1000 * sum(run["cpu"] for run in runs) / count
            errors = sum(run["errors"] for run in runs)
            print(f"| {name} | {clients} | {count} | {np.percentile(lat, 50):.0f} | {np.percentile(lat, 99):.0f} | "
                  f"{rate:.2f} | {cpu:.0f} | {errors} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
