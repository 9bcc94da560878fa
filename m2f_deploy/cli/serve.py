"""m2f-serve: an artifact served on Triton Inference Server (through PyTriton), until SIGINT or SIGTERM."""

from __future__ import annotations

import sys
from pathlib import Path

from m2f_deploy.cli.common import Parser, run, setup_logging
from m2f_deploy.errors import InputError
from m2f_deploy.serve.protocol import MODEL_NAME, TASKS
from m2f_deploy.serve.server import LOOPBACK, ServeOptions


def build_parser() -> Parser:
    p = Parser(
        prog="m2f-serve",
        description="Serve an exported Mask2Former on Triton Inference Server (HTTP and gRPC, dynamic batching).",
        epilog="Example: m2f-serve model.onnx --max-batch 8  (then: m2f_deploy.serve.Client)",
    )
    p.add_argument("artifact", type=Path, help="an .onnx file from m2f-export, or a TensorRT .engine with its .json")
    p.add_argument("--host", default=LOOPBACK,
                   help=f"address to listen on (default: {LOOPBACK}, this machine only; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default: 8000)")
    p.add_argument("--grpc-port", type=int, default=None, help="gRPC port (default: HTTP port + 1)")
    p.add_argument("--metrics-port", type=int, default=None, help="Prometheus metrics port (default: HTTP port + 2)")
    p.add_argument("--max-batch", type=int, default=8,
                   help="most images per model call (and per request); Triton merges requests up to it (default: 8; "
                        "1: no dynamic batching)")
    p.add_argument("--queue-delay-us", type=int, default=0,
                   help="how long Triton may hold a request to wait for others to merge with, in microseconds "
                        "(default: 0: requests that queued while the model was busy are still merged)")
    p.add_argument("--instances", type=int, default=1, help="model instances, each with its own session (default: 1)")
    p.add_argument("--task", action="append", choices=TASKS, default=None,
                   help="a task to serve (repeatable; default: all three)")
    p.add_argument("--model-name", default=MODEL_NAME, help=f"the model's name on the server (default: {MODEL_NAME})")
    p.add_argument("--backend", default="auto", help="as m2f-predict --backend (default: auto)")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads per instance")
    p.add_argument("--exit-timeout-s", type=int, default=10,
                   help="on SIGINT / SIGTERM, how long Triton waits for in-flight requests and open client "
                        "connections before it exits anyway (default: 10)")
    p.add_argument("-q", "--quiet", action="store_true", help="only errors")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.quiet)
    if not args.artifact.is_file():
        raise InputError(f"{args.artifact}: no such file")
    tasks = tuple(dict.fromkeys(args.task)) if args.task else TASKS
    head = _fused_head(args.artifact)
    if head:  # the graph returns one task's results: serve that task only (Segmenter refuses the others)
        if args.task and set(tasks) - {head}:
            raise InputError(f"--task {', '.join(t for t in tasks if t != head)}: {args.artifact} returns {head} "
                             f"results (exported with --heads {head}); serve --task {head}")  # fmt: skip
        tasks = (head,)
    options = ServeOptions(
        host=args.host, http_port=args.port,
        grpc_port=args.port + 1 if args.grpc_port is None else args.grpc_port,
        metrics_port=args.port + 2 if args.metrics_port is None else args.metrics_port,
        max_batch=args.max_batch, queue_delay_us=args.queue_delay_us, instances=args.instances,
        tasks=tasks, model_name=args.model_name,
        backend=args.backend, threads=args.threads, exit_timeout_s=args.exit_timeout_s,
    ).check()  # fmt: skip
    from m2f_deploy.serve.server import serve

    out = sys.stdout  # Triton's log goes to stderr while it runs (serve's docstring): our lines stay on stdout
    serve(args.artifact, options, ready=lambda message: print(message, file=out, flush=True))
    print("m2f-serve: stopped", file=out, flush=True)
    return 0


def _fused_head(path: Path) -> str | None:
    """The task a fused-head artifact (m2f-export --heads) returns, or None (its metadata read, no session)."""
    from m2f_deploy.artifact import read_engine_metadata, read_onnx_metadata
    from m2f_deploy.runtime.heads import fused_head

    return fused_head(read_engine_metadata(path) if path.suffix == ".engine" else read_onnx_metadata(path))


def entry() -> None:
    sys.exit(run("m2f-serve", main))


if __name__ == "__main__":
    entry()
